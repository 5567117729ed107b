"""What train.py runs: multi-host set-up, then one stage or the synthetic default's two stages.

Stage "guidance" trains the learned guidance-map predictor into WORKDIR/guidance (export: WORKDIR/guidance/export)
from the frozen model `guidance.model_from`. Stage "latents" writes the UNet stage's latent cache
(`data.latent_cache`, see training/latent_cache.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

from x2x_jax.errors import ConfigError


def init_distributed(coordinator: str | None, num_processes: int, process_id: int) -> None:
    """coordinator "auto": `jax.distributed.initialize()` finds the processes itself (Cloud TPU VMs, SLURM, and the
    other clusters JAX detects); otherwise an explicit host:port with --num_processes / --process_id."""
    if coordinator == "auto":
        jax.distributed.initialize()
        return
    if num_processes > 1:
        if not coordinator:
            raise ConfigError("multi-host: --num_processes > 1 needs --coordinator host:port")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)


def stage_config(config, stage: str):
    """A copy of `config` for one stage; `config.vae_stage` / `config.guidance_stage` (if present) override
    train.* for the VAE / guidance stage."""
    c = config.copy_and_resolve_references()
    c.unlock()
    c.stage = stage
    overrides = f"{stage}_stage"
    if stage in ("vae", "guidance") and overrides in c:
        for k, v in c[overrides].items():
            c.train[k] = v
    return c


def run(config, workdir: str | None, *, coordinator=None, num_processes=1, process_id=0, config_path=None):
    from x2x_jax.training.loop import train

    init_distributed(coordinator, num_processes, process_id)
    if workdir is None:
        name = Path(config_path).stem if config_path else "run"
        workdir = os.path.join("runs", name)
    if not config.data.data_dir:
        config = config.copy_and_resolve_references()
        config.data.data_dir = os.path.abspath(os.path.join(workdir, "data"))
    if config.stage == "all":  # the synthetic default: VAE first, then the UNet on the frozen VAE
        train(stage_config(config, "vae"), os.path.join(workdir, "vae"))
        unet_cfg = stage_config(config, "unet")
        unet_cfg.model.vae_from = os.path.join(workdir, "vae", "export")
        summary = train(unet_cfg, os.path.join(workdir, "unet"))
    elif config.stage == "latents":
        from x2x_jax.training import latent_cache

        summary = {"latent_cache": str(latent_cache.run_stage(config))}
    elif config.stage == "guidance":
        from x2x_jax.training import guidance

        summary = guidance.train(stage_config(config, "guidance"), os.path.join(workdir, "guidance"))
    else:
        summary = train(config, workdir)
    if jax.process_index() == 0:
        print({k: v for k, v in summary.items()})
    return summary


def compile_only(config, workdir: str | None, topology: str, num_slices: int = 1, *, config_path=None) -> dict:
    """--compile_only: AOT-compile the UNet stage's train step for a TPU topology (x2x_jax.aot), print the report
    and write it to WORKDIR/compile_only/train_step_<topology>[_x<slices>].json; ConfigError when it does not fit
    the chip's HBM with 10 % headroom."""
    from x2x_jax import aot, presets

    if workdir is None:
        workdir = os.path.join("runs", Path(config_path).stem if config_path else "run")
    unet_config = stage_config(config, "unet") if config.stage == "all" else config
    target = topology
    topology, preset = presets.resolve_target(target)
    if preset is not None:
        unet_config = presets.apply(unet_config, preset)
    r = aot.compile_train_step(unet_config, topology, num_slices)
    if preset is not None:
        r["preset"] = preset.name
    name = target.replace(":", "_") + (f"_x{num_slices}" if num_slices > 1 else "")
    path = aot.write(r, Path(workdir) / "compile_only" / f"train_step_{name}.json")
    print(aot.summary(r))
    print(f"wrote {path}")
    aot.check_fits(r, path)
    return r
