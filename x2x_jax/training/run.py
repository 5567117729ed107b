"""What train.py runs: multi-host set-up, then one stage or the synthetic default's three stages.

Stage "guidance" trains the learned guidance-map predictor into WORKDIR/guidance (export: WORKDIR/guidance/export)
from the frozen model `guidance.model_from`. Stage "latents" writes the UNet stage's latent cache
(`data.latent_cache`, see training/latent_cache.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

from x2x_jax.errors import ConfigError
from x2x_jax.training import latent_cache, stages
from x2x_jax.training.loop import train


def init_distributed(coordinator: str | None, num_processes: int, process_id: int) -> None:
    """coordinator "auto": `jax.distributed.initialize()` finds the processes itself (Cloud TPU VMs, SLURM, and the
    other clusters JAX detects); otherwise an explicit host:port with --num-processes / --process-id."""
    if coordinator == "auto":
        jax.distributed.initialize()
        return
    if num_processes > 1:
        if not coordinator:
            raise ConfigError("multi-host: --num-processes > 1 needs --coordinator host:port")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)


def stage_config(config, stage: str):
    """A copy of `config` for one stage; `config.vae_stage` / `config.text_stage` / `config.guidance_stage` (if
    present) override train.* for that stage."""
    c = config.copy_and_resolve_references()
    c.unlock()
    c.stage = stage
    overrides = f"{stage}_stage"
    if stage in ("vae", "text", "guidance") and overrides in c:
        for k, v in c[overrides].items():
            c.train[k] = v
    return c


def plan(config, workdir: str) -> list[tuple]:
    """The (stage config, workdir) pairs `config.stage` trains, in order. "all" (the synthetic default): the VAE,
    then the text tower when the config has a `text_stage`, then the UNet with both frozen, each in its own
    subfolder (`--config.text_stage.steps=0` leaves the text stage out: the random frozen encoder of the earlier
    recipe); "guidance" in WORKDIR/guidance; any other stage in WORKDIR itself."""
    if config.stage != "all":
        sub = "guidance" if config.stage == "guidance" else ""
        return [(stage_config(config, config.stage), os.path.join(workdir, sub) if sub else workdir)]
    steps = [(stage_config(config, "vae"), os.path.join(workdir, "vae"))]
    unet = stage_config(config, "unet")
    unet.model.vae_from = os.path.join(workdir, "vae", "export")
    if "text_stage" in config and config.text_stage.get("steps", 1) > 0:
        steps.append((stage_config(config, "text"), os.path.join(workdir, "text")))
        unet.model.text_encoder_from = os.path.join(workdir, "text", "export")
    return [*steps, (unet, os.path.join(workdir, "unet"))]


def run(config, workdir: str | None, *, coordinator=None, num_processes=1, process_id=0, config_path=None):
    init_distributed(coordinator, num_processes, process_id)
    if workdir is None:
        name = Path(config_path).stem if config_path else "run"
        workdir = os.path.join("runs", name)
    if not config.data.data_dir:
        config = config.copy_and_resolve_references()
        config.data.data_dir = os.path.abspath(os.path.join(workdir, "data"))
    if config.stage == "latents":
        summary = {"latent_cache": str(latent_cache.run_stage(config))}
        if jax.process_index() == 0:
            print(summary)
        return summary
    for stage_cfg, stage_dir in plan(config, workdir):
        summary = train(stages.for_config(stage_cfg), stage_cfg, stage_dir)
        if jax.process_index() == 0:
            print({"stage": stage_cfg.stage, **summary})
    return summary
