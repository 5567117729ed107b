"""Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) for TPU targets.

`layers.attention` is the one place that picks an attention implementation: it calls `splash_attention` only when
the module's static `attention` field asks for it (the UNet's, set from the target by `targets.default_attention`)
*and* `splash_applies` says the kernel takes the case; everything else takes the einsum attention
(`layers.dot_product_attention`). The decisions, per case, from the compiled programs' estimates for v5e and v6e
(benchmarks/tpu_attention.py, figures in docs/performance.md "TPU attention"):

- Sequence lengths: the kernel for queries and keys that are multiples of 128 (its blocks must divide them and be
  multiples of the 128 TPU lanes) and at least MIN_TOKENS = 1024: SD1.5's self-attention at 64x64 and 32x32
  latents (4096 and 1024 tokens; fwd+bwd roofline per chip on v5e 3.1 vs 7.8 ms and 0.30 vs 0.59 ms: its backward
  never moves score blocks through HBM). At 16x16 (256 tokens) the einsum attention stays: the forward ties and
  its backward wins (0.095 vs 0.116 ms; compute-bound there, and splash recomputes the scores in both of its
  backward kernels: 18 matmul units of T x S x D to the einsum backward's 14). Cross-attention over the 77 text
  keys, the mid-block's 64 tokens and token counts of other resolutions that are not multiples of 128 take the
  einsum attention too (no key padding + masking: those softmaxes are small). Forward-only programs (the edit)
  follow the same rule: there the two tie within what the estimates resolve (XLA turns the einsum forward into its
  own fused TPU attention kernel).
- Head widths: 40, 80, 160 go to the kernel *unpadded*. A TPU stores an array's minor dimension in 128-lane tiles
  anyway (bf16[..., 40] compiles with layout T(8,128)(2,1)), Mosaic pads the kernel's blocks to whole lanes, and
  splash pads the value width itself (since jax 0.7.1). Zero-padding to 128 / 256 before the call computes the same
  and costs more: roofline +0 to +25 %, and on v6e twice the temp for the 64x64 backward (97 vs 49 MiB). Widths
  above MAX_HEAD_DIM fall back (none in SD; wider blocks were never compiled).
- The VAE's single head of 512 (4096 tokens at 512 px) is not routed: it runs forward only (a frozen encoder, the
  edit's decoder), where the einsum attention ties on v5e (0.35 ms), is ahead on v6e (0.082 vs 0.102 ms) and
  needs no temp (splash: 6 MiB). The kernel itself handles that width (tested in the interpreter, compiled).
- Blocks: the largest of Q_BLOCKS / KV_BLOCKS that divides the sequence. The kernel re-reads every key/value block
  once per query block, so large query blocks keep a 4096-token layer compute-bound; 1024 x 512 blocks compile
  for v5e and v6e within Mosaic's default scoped VMEM, up to width 512.
- Batch: the kernel runs per example (vmap). XLA cannot partition a Mosaic kernel ("Mosaic kernels cannot be
  automatically partitioned. Please wrap the call in a shard_map"), so under a context mesh (`jax.set_mesh`, which
  the training loop and `aot` enter around the programs they trace over a mesh) it runs per device in a
  `shard_map`: the batch split over every mesh axis when it divides evenly (the train step's micro-batch is split
  that way already), else replicated (every chip attends for the whole batch, as a replicated program does).
- Gradients: splash's own custom VJP (a dK/dV kernel and a dQ kernel recomputing the probabilities from the saved
  log-sum-exp; the probabilities are never stored).
- Numerics: scores, softmax and P·V accumulate in fp32 inside the kernel; the einsum attention casts P to v's dtype
  before P·V. Equal in fp32 (tests/models/test_tpu_attention.py), within bf16 rounding otherwise.
- Interpret mode (`interpret=True`, chosen from the target by `targets.splash_attention_kind`): the same kernel run
  by the Pallas interpreter on a non-TPU target, for the tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

LANES = 128  # the smallest splash block; sequences must be multiples of it
MIN_TOKENS = 1024  # shorter sequences: the einsum attention (see the module doc)
Q_BLOCKS = (1024, 512, 256, 128)
KV_BLOCKS = (512, 256, 128)
MAX_HEAD_DIM = 512


def splash_applies(q_len: int, kv_len: int, head_dim: int) -> bool:
    """Whether the splash kernel takes this case (see the module doc); False: the einsum attention does."""
    return (q_len % LANES == 0 and kv_len % LANES == 0 and min(q_len, kv_len) >= MIN_TOKENS
            and head_dim <= MAX_HEAD_DIM)


def _block(n: int, candidates: tuple[int, ...]) -> int:
    return next(b for b in candidates if n % b == 0)


def _kernel(heads: int, q_len: int, kv_len: int, interpret: bool):
    """A splash multi-head kernel over (heads, T, D) queries and (heads, S, D) keys/values, no mask."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    bq, bkv = _block(q_len, Q_BLOCKS), _block(kv_len, KV_BLOCKS)
    blocks = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                               block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    mask = splash.MultiHeadMask([splash.FullMask((q_len, kv_len))] * heads)
    return splash.make_splash_mha_single_device(mask, block_sizes=blocks, interpret=interpret)


def splash_attention(q, k, v, scale: float, interpret: bool = False):
    """softmax(q kᵀ · scale) v by the splash kernel: (B, T, heads, D) queries, (B, S, heads, D) keys/values ->
    (B, T, heads, D). T and S must be multiples of 128 (`layers.attention` calls it where `splash_applies`);
    `interpret` runs it in the Pallas interpreter."""
    b, t, heads, _ = q.shape
    kernel = _kernel(heads, t, k.shape[1], interpret)

    def attend(q, k, v):  # heads-first (b, heads, T, D) -> (b, heads, T, D)
        return jax.vmap(kernel)(q, k, v)

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        spec = P(mesh.axis_names) if b % mesh.size == 0 else P()
        attend = jax.shard_map(attend, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    q = q * jnp.asarray(scale, q.dtype)  # as the einsum attention scales: on q, in q's dtype
    out = attend(*(x.transpose(0, 2, 1, 3) for x in (q, k, v)))
    return out.transpose(0, 2, 1, 3)
