"""The devices a program is compiled *for* (its target), which need not be the host's.

Every backend decision in x2x-jax (compute dtype, unrolled accumulation, attention kernel) is taken from the
target devices — the mesh a program is sharded over — and never from `jax.default_backend()`, so that an
ahead-of-time compile on this CPU host for a TPU topology builds the program a TPU host would run.

TPU topologies without a TPU: with `libtpu` installed (`pip install -e '.[tpu]'`),
`jax.experimental.topologies.get_topology_desc` gives abstract devices of a named slice ("v5e:16x16",
"v5p:4x4x8", "v6e:2x4", "v6e:1" for one chip); `jit(...).lower(...).compile()` over a mesh of them yields the
TPU executable's memory and cost analysis. Nothing here runs on a TPU.
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import numpy as np

from x2x_jax.errors import ConfigError

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Public per-chip figures: HBM capacity, dense bf16 peak, HBM bandwidth, bidirectional inter-chip interconnect
    (ICI) bandwidth (None where not used here)."""

    name: str
    hbm_bytes: int
    peak_bf16_flops: float
    hbm_bytes_per_s: float
    ici_bytes_per_s: float | None = None


# device_kind -> figures (Google Cloud TPU and NVIDIA data sheets). Order matters: "tpu v5" is also in "tpu v5 lite".
CHIPS = (
    ("tpu v5 lite", Chip("v5e", 16 * GIB, 197e12, 819e9, 400e9)),
    ("tpu v5e", Chip("v5e", 16 * GIB, 197e12, 819e9, 400e9)),
    ("tpu v6 lite", Chip("v6e", 32 * GIB, 918e12, 1640e9, 800e9)),
    ("tpu v5", Chip("v5p", 95 * GIB, 459e12, 2765e9, 1200e9)),
    ("tpu v4", Chip("v4", 32 * GIB, 275e12, 1228e9)),
    ("h200", Chip("h200", 141 * GIB, 989e12, 4.8e12)),
    ("h100", Chip("h100", 80 * GIB, 989e12, 3.35e12)),
    ("a100", Chip("a100", 80 * GIB, 312e12, 2.0e12)),
)


def devices_of(target) -> list:
    """A Mesh, a sequence of devices or one device -> the list of devices."""
    if hasattr(target, "devices") and isinstance(target.devices, np.ndarray):  # a Mesh
        return list(target.devices.flat)
    if isinstance(target, (list, tuple, np.ndarray)):
        return list(np.asarray(target, dtype=object).flat)
    return [target]


def platform(target=None) -> str:
    """'cpu' | 'gpu' | 'tpu' of the target (a Mesh or devices); None: this process's default devices."""
    devices = jax.devices() if target is None else devices_of(target)
    name = devices[0].platform.lower()
    return "gpu" if name in ("cuda", "rocm", "gpu") else name


def chip(target=None) -> Chip | None:
    """The chip figures of the target's devices, None where unknown (CPU)."""
    kind = (jax.devices() if target is None else devices_of(target))[0].device_kind.lower()
    return next((c for key, c in CHIPS if key in kind), None)


def default_compute_dtype(target=None):
    """bfloat16 on accelerators, float32 on CPU (measured faster there, and what the parity tests use)."""
    import jax.numpy as jnp

    return jnp.float32 if platform(target) == "cpu" else jnp.bfloat16


def default_attention(target=None) -> str:
    """The UNet's attention implementation (its static `attention` field; x2x_jax.models.layers.attention) for the
    target: "splash", the Pallas TPU kernel wherever models/tpu_attention.py's rules let it (>= 1024-token
    self-attention: fwd+bwd roofline 2.5x-3.8x faster than einsum on v5e / v6e for SD1.5's 64x64 level), on TPUs;
    "einsum", the blocked einsum attention with its written-out backward (measured best on CPU), everywhere else
    (GPUs keep it until a cuDNN path is compared). The VAE keeps einsum on every target (forward-only: no gain).
    Figures: benchmarks/tpu_attention.py, docs/performance.md "TPU attention"."""
    return "splash" if platform(target) == "tpu" else "einsum"


def splash_attention_kind(target=None) -> str:
    """The splash kernel as the target runs it: compiled ("splash") for a TPU, run by the Pallas interpreter
    ("splash_interpret") for any other target — how the tests check its numerics on CPU."""
    return "splash" if platform(target) == "tpu" else "splash_interpret"


# ------------------------------------------------------------------------------------------- TPU topologies

_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){0,2})$")


def _prepare_libtpu_env(name: str) -> None:
    # libtpu takes a lock file per host and, without TPU metadata, complains about the accelerator type and worker
    # hostnames; none of that matters for compiling.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    generation = name.split(":")[0]
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", {"v5e": "v5litepod-8", "v6e": "v6e-8"}.get(generation,
                                                                                           f"{generation}-8"))


def topology_devices(name: str, num_slices: int = 1) -> list:
    """Abstract (compile-only) devices of a TPU slice such as "v5e:16x16", "v5p:4x4x8", "v6e:1" (one chip), times
    `num_slices` slices (their devices carry `slice_index`). ConfigError for a bad name or without libtpu."""
    m = _TOPOLOGY.match(name.strip())
    if not m:
        raise ConfigError(f"--compile-only {name!r}: expected a TPU topology like v5e:16x16, v5p:4x4x8, v6e:2x4 or "
                          "v6e:1 (generation v4 | v5e | v5p | v6e)")
    if num_slices < 1:
        raise ConfigError(f"--num-slices must be >= 1, got {num_slices}")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ConfigError(f"--compile-only {name}: the TPU compiler is not installed; pip install -e '.[tpu]' "
                          "(libtpu, ~210 MB)") from None
    _prepare_libtpu_env(name)
    from jax.experimental import topologies

    dims = [int(d) for d in m.group(2).split("x")]
    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    if m.group(1) in ("v4", "v5p"):  # one device per chip (both TensorCores), as TPU VMs run them; libtpu's default
        kwargs["chip_config_name"] = "megacore"  # for v4 is a device per TensorCore (half the chip's HBM)
    layout = name
    if int(np.prod(dims)) == 1:  # one chip: a single-chip host
        layout = f"{m.group(1)}:{'x'.join(['1'] * (3 if m.group(1) in ('v4', 'v5p') else 2))}"
        kwargs["chips_per_host_bounds"] = [1, 1, 1]
    try:
        return list(topologies.get_topology_desc(topology_name=layout, platform="tpu", **kwargs).devices)
    except Exception as e:  # libtpu rejects layouts it does not know with a runtime error
        raise ConfigError(f"--compile-only {name}: libtpu cannot lay out this topology "
                          f"({' '.join(str(e).split())[:200]})") from e
