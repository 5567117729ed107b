"""Einsum vs Pallas splash attention for SD1.5's attention shapes, compiled for a TPU topology on this CPU host.

  python benchmarks/tpu_attention.py [--topology v5e:2x2] [--batch-per-chip 2]

Needs libtpu (`pip install -e '.[tpu]'`); nothing runs on a TPU. For each shape — the UNet's self-attention at
64x64 / 32x32 / 16x16 latents (4096 / 1024 / 256 tokens, 8 heads of 40 / 80 / 160) and the VAE's mid-block
attention at 512 px (4096 tokens, one head of 512) — and for the forward pass and forward + backward (the VJP
with a given output gradient), it compiles the einsum attention (`layers.dot_product_attention`) and the splash
kernel (`tpu_attention.splash_attention`; for widths that are not multiples of 128 also on inputs zero-padded to
whole lanes: the padding decision) in bf16 over the topology's chips, the batch split over them, and prints per
chip (`*`: the implementation the models use there — layers.attention's choice for the UNet, einsum for the VAE):

- temp: the compiler's temp buffer assignment for the program (exact for that executable);
- xla est: the compiler's own time estimate, `cost_analysis()["optimal_seconds"]`, printed as it comes. For
  einsum it is taken from the same attention compiled without query blocking (XLA counts a loop body once); for
  splash XLA cannot see into the Pallas kernel (it reports -1 s and -1 FLOPs for it). libtpu 0.0.42 returns
  negative values for most programs here, einsum included: the figure is unusable, the roofline is what counts;
- roofline: max(MXU FLOPs / peak, HBM bytes / bandwidth). MXU FLOPs: the matmuls counted from the jaxpr (every
  loop iteration and kernel grid point; x2x_jax.flops) at the 128-lane width the TPU computes them at (a width-40
  head costs a 128-wide one: its operands are stored and multiplied in 128-lane tiles). Bytes: einsum — XLA's
  bytes accessed of the unblocked program (XLA's TPU compiler turns the forward's score/softmax/value chain into
  its own fused attention kernel, whose cost it does report; the blocked program also re-reads K and V per block);
  splash — XLA's bytes accessed (everything around the kernel: layout copies, dO·O) plus the kernel's own HBM
  traffic (`splash_bytes`: operands at the 128-lane width, K / V re-read per query block, Q / dO re-read per key
  block in the dK/dV kernel).

All times are ESTIMATES for the target chip from the compiled programs, not measurements.
"""

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from x2x_jax import aot, targets  # noqa: E402
from x2x_jax.flops import count_flops  # noqa: E402
from x2x_jax.models import tpu_attention  # noqa: E402
from x2x_jax.models.layers import dot_product_attention  # noqa: E402

SHAPES = (  # name, tokens, heads, head width
    ("unet 64x64", 4096, 8, 40),
    ("unet 32x32", 1024, 8, 80),
    ("unet 16x16", 256, 8, 160),
    ("vae 64x64", 4096, 1, 512),
)
MIB = 2**20


def lanes(d: int) -> int:
    return -(-d // 128) * 128


def xla_ms(seconds: float) -> str:
    """XLA's optimal_seconds as printed: negative values (garbage) and missing ones say so."""
    return "n/a" if not np.isfinite(seconds) else f"{seconds * 1e3:.3f}" if seconds > 0 else f"neg ({seconds:.0f} s)"


def splash_bytes(n: int, t: int, d: int, backward: bool) -> float:
    """HBM bytes the splash kernels move for n = batch x heads sequences of t tokens (bf16 operands stored at the
    128-lane width; fp32 log-sum-exp and dO·O rows stored 128 lanes wide, as splash keeps them)."""
    bq, bkv = tpu_attention._block(t, tpu_attention.Q_BLOCKS), tpu_attention._block(t, tpu_attention.KV_BLOCKS)
    row, stat = t * lanes(d) * 2, t * 128 * 4  # one bf16 (t, d) array; one fp32 per-token statistic
    fwd = 2 * row + (t // bq) * 2 * row + (stat if backward else 0)  # Q, O once; K, V per query block
    if not backward:
        return n * fwd
    dkv = 2 * row + 2 * row + (t // bkv) * (2 * row + 2 * stat)  # K, V in, dK, dV out; Q, dO, lse, di per block
    dq = 2 * row + 2 * stat + row + (t // bq) * 2 * row  # Q, dO, lse, di in, dQ out; K, V per query block
    return n * (fwd + dkv + dq)


def program(kind: str, backward: bool, d: int, pad: bool = False, block=None):
    def attend(q, k, v):  # the kernel itself, whatever tpu_attention.splash_applies would choose
        if kind == "einsum":
            return dot_product_attention(q, k, v, d**-0.5, block)
        if pad:  # zero-pad the head width to whole lanes, slice after: q·k and the first d output columns unchanged
            q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, lanes(d) - d))) for x in (q, k, v))
            return tpu_attention.splash_attention(q, k, v, d**-0.5)[..., :d]
        return tpu_attention.splash_attention(q, k, v, d**-0.5)

    if not backward:
        return attend
    return lambda q, k, v, d_out: jax.vjp(attend, q, k, v)[1](d_out)


def measure(mesh, kind, backward, b, t, h, d, pad=False, block=None):
    spec = NamedSharding(mesh, P(mesh.axis_names))
    args = [jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16, sharding=spec)] * (4 if backward else 3)
    fn = program(kind, backward, d, pad, block)
    with jax.set_mesh(mesh):
        compiled = jax.jit(fn).lower(*args).compile()
    cost = aot.cost_of(compiled)
    return {"temp": compiled.memory_analysis().temp_size_in_bytes, "xla_s": cost["optimal_seconds"],
            "xla_bytes": cost["bytes accessed"], "flops": count_flops(fn, *args) / mesh.size}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--topology", default="v5e:2x2")
    ap.add_argument("--batch-per-chip", type=int, default=2)
    args = ap.parse_args()
    devices = targets.topology_devices(args.topology)
    mesh, chip = Mesh(np.asarray(devices), ("data",)), targets.chip(devices)
    b = args.batch_per_chip * len(devices)
    print(f"{args.topology}: {len(devices)} x {devices[0].device_kind}, bf16, batch {args.batch_per_chip} per chip; "
          f"per-chip figures; times are ESTIMATES (peak {chip.peak_bf16_flops / 1e12:.0f} TFLOP/s, "
          f"HBM {chip.hbm_bytes_per_s / 1e9:.0f} GB/s), not measurements")
    print(f"{'shape':<11} {'tokens x heads x width':>22} {'pass':<8} {'attention':<11} {'temp MiB':>9} "
          f"{'xla est ms':>10} {'roofline ms':>11} {'MXU GFLOP':>9} {'HBM GB':>6}")
    for name, t, h, d in SHAPES:
        n = args.batch_per_chip * h
        for backward in (False, True):
            rows = [("einsum", measure(mesh, "einsum", backward, b, t, h, d),
                     measure(mesh, "einsum", backward, b, t, h, d, block=t)),  # unblocked: XLA's cost sees all
                    ("splash", measure(mesh, "splash", backward, b, t, h, d), None)]
            if d % 128:
                rows.append(("splash+pad", measure(mesh, "splash", backward, b, t, h, d, pad=True), None))
            default = "splash" if name.startswith("unet") and tpu_attention.splash_applies(t, t, d) else "einsum"
            for label, m, whole in rows:
                if label == "einsum":
                    xla_s, nbytes = whole["xla_s"], whole["xla_bytes"]
                else:
                    xla_s, nbytes = m["xla_s"], m["xla_bytes"] + splash_bytes(n, t, d, backward)
                mxu = m["flops"] * (1 if label == "splash+pad" else lanes(d) / d)  # padded: counted at lanes
                roof = max(mxu / chip.peak_bf16_flops, nbytes / chip.hbm_bytes_per_s)
                mark = "*" if label == default else ""
                print(f"{name:<11} {f'{t} x {h} x {d}':>22} {'fwd+bwd' if backward else 'fwd':<8} {label + mark:<11} "
                      f"{m['temp'] / MIB:9.1f} {xla_ms(xla_s):>10} {roof * 1e3:11.3f} {mxu / 1e9:9.1f} "
                      f"{nbytes / 1e9:6.2f}", flush=True)


if __name__ == "__main__":
    main()
