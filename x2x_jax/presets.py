"""Mesh presets for the TPU slices people rent: the paper recipe's step settings per slice.

    python train.py --config configs/ix2x_v1.py --preset v5e-256          # train with the preset's settings
    python train.py --config configs/ix2x_v1.py --compile-only v5e-256    # compile it here first (x2x_jax.aot)
    python benchmarks/tpu_aot.py --search v5e-8                            # (re)choose a preset by compiling

A preset fixes what the step's speed and memory depend on — images per chip, the FSDP group size, the remat
policy — and leaves the effective batch to the config (accumulation = effective batch / (images per chip x
chips)). Slice names are Cloud TPU's (v5e-256 = 256 chips; v5p-N and v4-N count TensorCores, two per chip).

Each preset records what it rests on (`basis`): a compile of it (its report in benchmarks/results/tpu_aot/), or,
until one has run, the reasoning behind it. The intended choice is by `benchmarks/tpu_aot.py --search`: the
fastest compiler estimate among the candidates that fits the chip's HBM with >= 10 % headroom; no search has run
yet. Where two candidates' estimates cannot rank them (v5e-8: XLA counts 18 % more FLOPs for one of two programs of
the same arithmetic), the estimate with the interconnect time added decides, and then the compile time. Nothing
here was run on a TPU.
"""

from __future__ import annotations

import dataclasses

from x2x_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    topology: str  # jax.experimental.topologies name
    per_device_batch: int
    mesh_fsdp: int  # FSDP group size inside a slice; data parallel across groups
    remat: str  # layers.REMAT_POLICIES
    basis: str
    gather_params: str = "per_use"  # train.gather_params: per_use (plain FSDP) | once (training/step.py GatherOnce)
    num_slices: int = 1  # multi-slice: data parallel across this many slices of `topology` (DCN)

    @property
    def generation(self) -> str:
        return self.topology.split(":")[0]

    @property
    def where(self) -> str:
        return self.topology + (f" x {self.num_slices}" if self.num_slices > 1 else "")


PRESETS = {p.name: p for p in (
    Preset("v5e-8", "v5e:2x4", 4, 8, "none",
           "compiled 2026-12-01 (benchmarks/results/tpu_aot/v5e-8.json): 10.85 of 16 GiB per chip, estimated 5.88 s "
           "per 1024-image step (roofline), 43 GB of interconnect traffic per chip per step, 594 s to compile here; "
           "gather_params=per_use (v5e-8_gather_per_use.json): 9.54 GiB, 5.46 s, 189 GB, 1,107 s. Gather once is "
           "kept: the two roofline figures rest on XLA FLOP counts that differ by 18 % for the same arithmetic, "
           "with the interconnect time added it is the faster (6.10 vs 6.40 s), and it compiles within 10 min",
           "once"),
    Preset("v5e-64", "v5e:8x8", 4, 8, "none",
           "compiled 2026-12-07 (benchmarks/results/tpu_aot/v5e-64.json): 9.58 of 16 GiB per chip, compiler estimate "
           "0.68 s per 1024-image step (23.6 img/s per chip, MFU 55.7 %; 51.1 % with its 12.1 GB of interconnect "
           "traffic not overlapped), 840 s to compile here; accumulation 4, weights gathered once per step; the only "
           "candidate compiled", "once"),
    Preset("v5e-256", "v5e:16x16", 4, 8, "none",
           "compiled 2026-12-01 (benchmarks/results/tpu_aot/v5e-256.json): 7.45 of 16 GiB per chip, estimated 0.19 s "
           "per 1024-image step (compiler, communication not priced: 6.5 GB of weight all-gathers per chip)"),
    Preset("v5p-8", "v5p:2x2x1", 16, 4, "none",
           "compiled 2026-12-07 (benchmarks/results/tpu_aot/v5p-8.json): 22.71 of 95 GiB per chip, compiler estimate "
           "3.68 s per 1024-image step (69.6 img/s per chip, MFU 70.6 %), 738 s to compile here; 16 images/chip as "
           "v5p-128, accumulation 16, weights gathered once per step; the only candidate compiled", "once"),
    Preset("v5p-128", "v5p:4x4x4", 16, 8, "none",
           "compiled 2026-12-07 (benchmarks/results/tpu_aot/v5p-128.json): 19.27 of 95 GiB per chip, compiler "
           "estimate 0.24 s per 1024-image step (67.8 img/s per chip, MFU 68.7 %; 66.2 % with its 5.5 GB of "
           "interconnect traffic not overlapped), 443 s to compile here; 16 images/chip as MLPerf's SD runs (no "
           "accumulation); the only candidate compiled"),
    Preset("v6e-8", "v6e:2x4", 8, 8, "none",
           "compiled 2026-12-07 (benchmarks/results/tpu_aot/v6e-8.json): 14.09 of 32 GiB per chip, roofline estimate "
           "1.79 s per 1024-image step (71.7 img/s per chip, MFU 36.4 %), 2,029 s to compile on a shared host; 8 "
           "images/chip, accumulation 16, weights gathered once per step; the only candidate compiled", "once"),
    Preset("v6e-256", "v6e:16x16", 4, 8, "none",
           "compiled 2026-12-07 (benchmarks/results/tpu_aot/v6e-256.json): 7.35 of 32 GiB per chip, roofline "
           "estimate 0.09 s per 1024-image step (46.3 img/s per chip, MFU 23.5 %), 1,312 s to compile on a shared "
           "host; accumulation 1 (weights gathered per use); the only candidate compiled"),
    Preset("v4-8", "v4:2x2x1", 8, 4, "none",
           "compiled 2026-12-07 (benchmarks/results/tpu_aot/v4-8.json): 14.94 of 32 GiB per chip (one megacore "
           "device per chip), compiler estimate 6.49 s per 1024-image step (39.4 img/s per chip, MFU 66.8 %), 800 s "
           "to compile here (21.7 GiB host); 8 images/chip, accumulation 32, weights gathered once per step; the only "
           "candidate compiled (16/chip, as v5p-8, would likely fit too)", "once"),
    Preset("v5e-256x2", "v5e:16x16", 2, 8, "none",
           "compiled 2026-12-08 (benchmarks/results/tpu_aot/v5e-256x2.json): 5.82 of 16 GiB per chip, roofline "
           "estimate 0.19 s per 1024-image step (10.3 img/s per chip, MFU 24.4 %; the cross-slice gradient all-reduce "
           "over DCN not priced), 2,212 s to compile on a shared host; 2 slices x 256 chips x 2 images = the recipe's "
           "1024 (4 per chip would be 2048), FSDP 8 inside each slice, no accumulation; the only candidate compiled",
           num_slices=2),
)}


def get(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r}: not one of {', '.join(PRESETS)}")
    return PRESETS[name]


def resolve_target(target: str, num_slices: int = 1) -> tuple[str, int, Preset | None]:
    """--compile-only TARGET [--num-slices N]: a preset name (-> its topology, its slice count, the preset) or a
    topology name (-> it, N, None). A preset's own slice count may be repeated, not changed."""
    if target not in PRESETS:
        return target, num_slices, None
    p = PRESETS[target]
    if num_slices not in (1, p.num_slices):
        raise ConfigError(f"--num-slices {num_slices}: the preset {p.name} is for {p.num_slices} slice(s) of "
                          f"{p.topology}; give a topology name to choose the slice count")
    return p.topology, p.num_slices, p


def apply(config, preset: Preset):
    """A copy of `config` with the preset's step settings (the effective batch stays the config's)."""
    c = config.copy_and_resolve_references()
    c.train.per_device_batch = preset.per_device_batch
    c.train.mesh_data, c.train.mesh_fsdp = -1, preset.mesh_fsdp
    c.train.remat = preset.remat
    c.train.gather_params = preset.gather_params
    if c.train.get("effective_batch"):
        c.train.accum_steps = -1
    return c


def for_generation(generation: str) -> list[Preset]:
    """The presets for a chip generation ("v5e", ...), for the hint of a program that does not fit."""
    return [p for p in PRESETS.values() if p.generation == generation]
