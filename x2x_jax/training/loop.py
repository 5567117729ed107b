"""The one trainer: a stage (training/stages/) + config + workdir -> compiled step -> checkpoints, metrics,
samples, export.

    train(stages.for_config(config), config, workdir)      # what train.py runs, per stage

The stage says what is trained, what stays frozen, the objective, one example's arrays and where batches come
from; everything else is here, once: the (data, fsdp) mesh and the batch layout (accumulation x global
micro-batch), the sharded, donated step compiled ahead of time, automatic resume from the newest checkpoint (state
and data iterator: bit-for-bit), the NaN stop, metrics.jsonl and the progress bar, periodic samples, Ctrl-C /
SIGTERM (finish the step, save, exit), and the export of the EMA (or raw) params when the run completes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from PIL import Image

from x2x_jax import targets
from x2x_jax.data.synthetic import to_uint8
from x2x_jax.errors import ConfigError
from x2x_jax.training import checkpoint as ckpt
from x2x_jax.training.components import compute_dtype
from x2x_jax.training.sharding import (batch_sharding, global_batch_from_process_local, make_mesh, replicated,
                                       state_shardings)
from x2x_jax.training.state import init_train_state, make_optimizer
from x2x_jax.training.step import GatherOnce, make_train_step, model_flops


def optimizer_for(config):
    t = config.train
    return make_optimizer(t.learning_rate, t.weight_decay, t.adam_b1, t.adam_b2, t.adam_eps, t.grad_clip or None)


# ----------------------------------------------------------------------------------------------- compile


@dataclasses.dataclass
class CompiledStep:
    fn: Any
    state_shardings: Any
    frozen_shardings: Any
    batch_sharding: Any
    memory: Any
    count_model_flops: Callable[[], float]
    gather_once: GatherOnce | None = None

    @functools.cached_property
    def flops_per_step(self) -> float:
        """Model FLOPs of one step on the global batch (step.model_flops): traced when first asked for (MFU on
        accelerators, the benchmarks), not at every start-up."""
        return self.count_model_flops()


def batch_layout(config, mesh) -> tuple[int, int]:
    """-> (accum_steps, global micro-batch size)."""
    micro = config.train.per_device_batch * mesh.size
    accum = config.train.accum_steps
    if accum == -1:
        effective = config.train.effective_batch
        if effective % micro:
            raise ConfigError(f"train.effective_batch={effective} is not a multiple of per_device_batch x devices"
                              f" = {micro}")
        accum = effective // micro
    if accum < 1:
        raise ConfigError(f"train.accum_steps must be >= 1 or -1, got {accum}")
    return accum, micro


def abstract_batch(example: dict, accum: int, micro: int, sharding=None) -> dict:
    """One example's arrays (a stage's `example`) -> the step's batch, shaped (accum, micro, ...)."""
    return {k: jax.ShapeDtypeStruct((accum, micro, *v.shape), v.dtype, sharding=sharding) for k, v in example.items()}


def compile_step(config, mesh, objective, optimizer, abstract_state, abstract_frozen, example: dict, accum: int,
                 micro: int) -> CompiledStep:
    """jit + ahead-of-time lower/compile of the sharded, donated train step."""
    st_sh = state_shardings(abstract_state, mesh, config.train.param_sharding)
    fr_sh = jax.tree.map(lambda _: replicated(mesh), abstract_frozen)
    b_sh = batch_sharding(mesh)
    gather = gather_params(config, mesh, st_sh.params)
    step = make_train_step(objective, optimizer, config.train.ema_decay,
                           unroll_accumulation=targets.platform(mesh) == "cpu", gather_once=gather)
    jitted = jax.jit(step, in_shardings=(st_sh, fr_sh, b_sh), out_shardings=(st_sh, replicated(mesh)),
                     donate_argnums=(0,))
    batch = abstract_batch(example, accum, micro, b_sh)
    with jax.set_mesh(mesh):  # the Pallas attention kernels run per device in a shard_map over the context mesh
        compiled = jitted.lower(ckpt.abstract_like(abstract_state, st_sh), ckpt.abstract_like(abstract_frozen, fr_sh),
                                batch).compile()
    return CompiledStep(compiled, st_sh, fr_sh, b_sh, compiled.memory_analysis(),
                        lambda: model_flops(objective, abstract_state.params, abstract_frozen, batch), gather)


def gather_params(config, mesh, param_shardings) -> GatherOnce | None:
    """train.gather_params: "per_use" (plain FSDP: each weight all-gathered where it is used, in every micro-step)
    or "once" (`step.GatherOnce`: one replicated compute-dtype copy per step, ZeRO-2)."""
    mode = config.train.get("gather_params", "per_use")
    if mode not in ("per_use", "once"):
        raise ConfigError(f"train.gather_params must be 'per_use' or 'once', got {mode!r}")
    if mode == "per_use":
        return None
    return GatherOnce(mesh, param_shardings, compute_dtype(config.train.compute_dtype, mesh))


def use_compilation_cache(config, workdir: Path, mesh) -> None:
    """train.compilation_cache: a folder for JAX's persistent compilation cache, so a restarted job loads its
    compiled step instead of compiling it again; "auto" = WORKDIR/jax_cache on accelerators, off on CPU (where
    compiles are short and the suite would only fill the disk); "" = off."""
    cache = config.train.get("compilation_cache", "auto")
    if cache == "auto":
        cache = "" if targets.platform(mesh) == "cpu" else str(workdir / "jax_cache")
    if cache:
        jax.config.update("jax_compilation_cache_dir", str(cache))


def peak_flops_per_device(target=None) -> float | None:
    """bf16 dense peak of the target's chips, for MFU; None where unknown (CPU)."""
    chip = targets.chip(target)
    return None if chip is None else chip.peak_bf16_flops


# ----------------------------------------------------------------------------------------------- loop


class StopRequested:
    """Ctrl-C / SIGTERM: finish the current step, save, exit cleanly."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class NonFiniteLoss(ConfigError):
    pass


def write_samples(path: Path, rows: np.ndarray) -> None:
    """(3, k, H, W) in [-1, 1] -> one PNG: an example per row, past | edited | target."""
    three, k, h, w = rows.shape
    grid = np.transpose(rows, (1, 2, 0, 3)).reshape(k * h, three * w)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(grid)).save(path)


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(stage, config, workdir: str, max_steps: int | None = None, return_state: bool = False) -> dict:
    """Train `stage` into `workdir`; resumes automatically from the newest checkpoint there.

    `max_steps` stops early (tests use it to simulate a kill); the schedule still follows config.train.steps.
    Returns a summary dict (final step, last metrics, the stage's export entries when the run is complete; the final
    TrainState under "state" when return_state).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    mesh = make_mesh(config.train.mesh_data, config.train.mesh_fsdp)
    accum, micro = batch_layout(config, mesh)
    built = stage.build(config, mesh)
    optimizer = optimizer_for(config)

    def init(p):
        return init_train_state(p, optimizer, config.seed + 1)

    abstract_state = jax.eval_shape(init, built.trainable)
    abstract_frozen = jax.eval_shape(lambda t: t, built.frozen)
    use_compilation_cache(config, workdir, mesh)
    step = compile_step(config, mesh, built.objective, optimizer, abstract_state, abstract_frozen, built.example,
                        accum, micro)
    frozen = jax.device_put(built.frozen, step.frozen_shardings)

    manager = ckpt.make_manager(workdir / "checkpoints", keep=config.log.keep)
    restored = ckpt.restore_latest(manager, ckpt.abstract_like(abstract_state, step.state_shardings))
    if restored is None:
        state = jax.jit(init, out_shardings=step.state_shardings)(built.trainable)
        data_state = None
    else:
        _, state, data_state = restored
    built.trainable = None  # the state holds (or replaced) them

    data = built.data(jax.process_index(), jax.process_count(), accum, micro // jax.process_count())
    if data_state:
        data.set_state(data_state)

    total = config.train.steps if max_steps is None else min(config.train.steps, max_steps)
    metrics_path = workdir / "metrics.jsonl"
    peak = peak_flops_per_device(mesh)
    start_step = int(state.step)
    last = {}
    progress = progress_bar(start_step, config.train.steps)
    sample_every = int(config.log.sample_every) if built.sampler is not None else 0
    sampler = built.sampler(mesh, micro) if sample_every > 0 else None
    t_last, n_last = time.perf_counter(), start_step
    with StopRequested() as stop:
        for step_i in range(start_step, total):
            batch = global_batch_from_process_local(next(data), mesh)
            new_state, metrics = step.fn(state, frozen, batch)
            loss = float(metrics["loss"])  # blocks: keeps the host from racing ahead of the devices
            if not math.isfinite(loss):
                manager.wait_until_finished()
                raise NonFiniteLoss(f"step {step_i + 1}: loss is {loss}; stopped. The last good checkpoint in "
                                    f"{workdir / 'checkpoints'} (step {manager.latest_step()}) is intact.")
            state = new_state
            n = step_i + 1
            if n % config.log.every == 0 or n == total:
                dt = time.perf_counter() - t_last
                imgs = (n - n_last) * accum * micro / max(dt, 1e-9)
                last = {"step": n, "loss": loss, "grad_norm": float(metrics["grad_norm"]),
                        "lr": config.train.learning_rate, "img_per_s": imgs}
                if peak:
                    last["mfu"] = step.flops_per_step * (n - n_last) / max(dt, 1e-9) / (peak * mesh.size)
                if jax.process_index() == 0:
                    append_jsonl(metrics_path, last)
                progress(n, last)
                t_last, n_last = time.perf_counter(), n
            if sampler is not None and n % sample_every == 0:
                rows = np.asarray(sampler(state.ema_params, frozen, batch))
                if jax.process_index() == 0:
                    write_samples(workdir / "samples" / f"step_{n}.png", rows)
            if n % config.log.checkpoint_every == 0 or n == total or stop.requested:
                ckpt.save(manager, n, state, data.get_state(), force=True)
            if stop.requested:
                print(f"\nstopped at step {n}; checkpoint saved in {workdir / 'checkpoints'}", flush=True)
                break
    manager.wait_until_finished()
    summary = {"step": int(state.step), **last}
    if int(state.step) >= config.train.steps:
        summary.update(built.export(jax.device_get(state.ema_params if config.log.export_ema else state.params),
                                    data, workdir))
    if return_state:
        summary["state"] = state
    return summary


def progress_bar(start: int, total: int):
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, dynamic_ncols=True, disable=jax.process_index() != 0)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        bar = None

    def update(n, m):
        if bar is None:
            return
        bar.n = n
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in m.items() if k != "step"}
        bar.set_postfix(shown, refresh=True)

    return update
