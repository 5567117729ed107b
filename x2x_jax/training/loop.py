"""The training loop: models + data + mesh -> compiled step -> checkpoints, metrics, samples, export.

One function per concern; `train(config, workdir)` strings them together. Stage "vae" trains the small KL
autoencoder of the synthetic default; stage "unet" fine-tunes the InstructPix2Pix UNet with the VAE and text
encoder frozen.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from x2x_jax import targets
from x2x_jax.convert import diffusers as bridge
from x2x_jax.convert.tokenizer import load_tokenizer, tokenize
from x2x_jax.diffusion.ddim import scheduler_config as default_scheduler_config
from x2x_jax.diffusion.schedule import noise_schedule
from x2x_jax.errors import ConfigError
from x2x_jax.models.clip_text import clip_text_from_config
from x2x_jax.models.layers import remat_policy
from x2x_jax.models.unet import unet_from_config, unet_to_config
from x2x_jax.models.vae import latent_factor, vae_from_config
from x2x_jax.training import checkpoint as ckpt
from x2x_jax.training.sharding import (batch_sharding, global_batch_from_process_local, make_mesh, replicated,
                                       state_shardings)
from x2x_jax.training.state import TrainState, init_train_state, make_optimizer
from x2x_jax.training.step import (IP2PObjective, VAEObjective, decode_grey, kernels_in_compute_dtype,
                                   make_train_step, model_flops)

STAGE_COMPONENT = {"vae": "vae", "unet": "unet"}


def compute_dtype(name: str, target=None):
    """The config's compute dtype; "auto" follows the target (a Mesh or devices; None: this host's devices)."""
    if name == "auto":
        return targets.default_compute_dtype(target)
    try:
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
    except KeyError:
        raise ConfigError(f"train.compute_dtype must be auto, float32, bfloat16 or float16, got {name!r}") from None


# ----------------------------------------------------------------------------------------------- models


@dataclasses.dataclass
class Components:
    unet: Any
    vae: Any
    text_encoder: Any
    params: dict  # {"unet": ..., "vae": ..., "text_encoder": ...}
    tokenizer: Any
    scheduler_config: dict


def _random_params(module, example_inputs, key):
    return jax.jit(module.init)(key, *example_inputs)["params"]


def build_components(config, key: jax.Array, target=None) -> Components:
    """Modules from the config (compute dtype, remat; the UNet's attention from the target:
    `targets.default_attention`) and params from `model.init_from` or random init.

    `model.vae_from` / `model.text_encoder_from` (diffusers dirs) override single components, which is how the
    synthetic default's UNet stage picks up the VAE its first stage trained.
    """
    dtype = compute_dtype(config.train.compute_dtype, target)
    remat = remat_policy(config.train.remat)
    attention = targets.default_attention(target)
    m = config.model
    unet = unet_from_config(dict(m.unet), dtype=dtype, remat=remat, attention=attention)
    vae = vae_from_config(dict(m.vae), dtype=dtype, remat=remat)
    text = clip_text_from_config(dict(m.text_encoder), dtype=dtype, remat=False)
    k_unet, k_vae, k_text = jax.random.split(key, 3)
    res = config.data.resolution
    f = latent_factor(vae)
    ids = jnp.zeros((1, text.max_position_embeddings), jnp.int32)
    params = {}
    tokenizer, sched = None, default_scheduler_config()

    if m.init_from:
        if m.init_format == "diffusers":
            pipe = bridge.load_pipeline(m.init_from, allow_pickle=m.allow_pickle)
        elif m.init_format == "ldm":
            from x2x_jax.convert.ldm_ckpt import load_ldm_checkpoint

            pipe = load_ldm_checkpoint(m.init_from, dict(m.unet), dict(m.vae), dict(m.text_encoder),
                                       allow_pickle=m.allow_pickle)
        else:
            raise ConfigError(f"model.init_format must be diffusers or ldm, got {m.init_format!r}")
        if pipe.unet.in_channels != unet.in_channels:  # SD 1.5 (4 channels) -> IP2P (8): zero-initialised
            pipe.unet_params, unet_cfg = bridge.expand_unet_in_channels(
                pipe.unet_params, unet_to_config(pipe.unet), unet.in_channels)
            pipe.unet = unet_from_config(unet_cfg)
        unet, vae, text = (pipe.unet.clone(dtype=dtype, remat=remat, attention=attention),
                           pipe.vae.clone(dtype=dtype, remat=remat), pipe.text_encoder.clone(dtype=dtype))
        params = {"unet": pipe.unet_params, "vae": pipe.vae_params, "text_encoder": pipe.text_params}
        tokenizer, sched = pipe.tokenizer, pipe.scheduler_config or sched
    for component, folder in (("vae", m.get("vae_from", "")), ("text_encoder", m.get("text_encoder_from", ""))):
        if folder:
            module, p = bridge.load_component(Path(folder) / component, component)
            params[component] = p
            if component == "vae":
                vae = module.clone(dtype=dtype, remat=remat)
            else:
                text = module.clone(dtype=dtype)
    if "vae" not in params:
        params["vae"] = _random_params(vae, (jnp.zeros((1, res, res, vae.in_channels)),), k_vae)
    if "text_encoder" not in params:
        params["text_encoder"] = _random_params(text, (ids,), k_text)
    if "unet" not in params and config.stage != "vae":
        lat = (1, res // f, res // f, vae.latent_channels)
        params["unet"] = _random_params(unet, (jnp.zeros(lat[:3] + (unet.in_channels,)), jnp.zeros((1,)),
                                               jnp.zeros((1, ids.shape[1], text.hidden_size))), k_unet)
    if tokenizer is None:
        tokenizer = load_tokenizer()
    return Components(unet, vae, text, params, tokenizer, dict(sched))


def make_objective(config, comps: Components):
    if config.stage == "vae":
        return VAEObjective(comps.vae, kl_weight=config.train.vae_kl_weight)
    if config.stage == "unet":
        empty_ids, _ = tokenize(comps.tokenizer, [""])
        return IP2PObjective(comps.unet, comps.vae, comps.text_encoder, noise_schedule(comps.scheduler_config),
                             jnp.asarray(empty_ids[0]), config.train.cond_dropout_p)
    raise ConfigError(f"stage must be 'vae' or 'unet', got {config.stage!r}")


# ----------------------------------------------------------------------------------------------- compile


@dataclasses.dataclass
class CompiledStep:
    fn: Any
    state_shardings: Any
    frozen_shardings: Any
    batch_sharding: Any
    memory: Any
    count_model_flops: Callable[[], float]

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


def abstract_batch(config, objective, accum: int, micro: int, text_len: int = 77) -> dict:
    r = config.data.resolution
    ids = jax.ShapeDtypeStruct((accum, micro, text_len), jnp.int32)
    if config.data.get("latent_cache"):  # the VAE's outputs instead of the images (training/latent_cache.py)
        lat = jax.ShapeDtypeStruct((accum, micro, *objective.latent_shape((r, r))), jnp.float32)
        return {"current_mean": lat, "current_logvar": lat, "past_latent": lat, "input_ids": ids}
    img = jax.ShapeDtypeStruct((accum, micro, r, r), jnp.float32)
    return {"past": img, "current": img, "input_ids": ids}


def compile_step(config, mesh, objective, optimizer, abstract_state, abstract_frozen, accum, micro) -> CompiledStep:
    """jit + ahead-of-time lower/compile of the sharded, donated train step."""
    st_sh = state_shardings(abstract_state, mesh, config.train.param_sharding)
    fr_sh = jax.tree.map(lambda _: replicated(mesh), abstract_frozen)
    b_sh = batch_sharding(mesh)
    step = make_train_step(objective, optimizer, config.train.ema_decay,
                           unroll_accumulation=targets.platform(mesh) == "cpu")
    jitted = jax.jit(step, in_shardings=(st_sh, fr_sh, b_sh), out_shardings=(st_sh, replicated(mesh)),
                     donate_argnums=(0,))
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=b_sh),
                         abstract_batch(config, objective, accum, micro))
    with jax.set_mesh(mesh):  # the Pallas attention kernels run per device in a shard_map over the context mesh
        compiled = jitted.lower(ckpt.abstract_like(abstract_state, st_sh), ckpt.abstract_like(abstract_frozen, fr_sh),
                                batch).compile()
    return CompiledStep(compiled, st_sh, fr_sh, b_sh, compiled.memory_analysis(),
                        lambda: model_flops(objective, abstract_state.params, abstract_frozen, batch))


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


def make_sampler(config, comps: Components, mesh, micro: int):
    """-> sample(ema_params, frozen, batch) -> (3, k, H, W) rows past | edited | target, replicated on every
    process: plain IP2P edits (tau = 0, the paper's scales, `log.sample_steps` DDIM steps) of the first k
    examples of the step's own global batch, so sampling never draws from (or perturbs) the data iterator."""
    from x2x_jax.editing.rse import EditModel, edit_batch

    k = min(4, micro)
    model = EditModel(comps.unet, comps.vae, comps.text_encoder, noise_schedule(comps.scheduler_config),
                      comps.scheduler_config)
    empty_ids = jnp.asarray(tokenize(comps.tokenizer, [""])[0][0])

    def sample(ema_params, frozen, batch):
        ids = batch["input_ids"][0, :k]
        if "past" in batch:
            past, current = batch["past"][0, :k], batch["current"][0, :k]
        else:  # a latent-cache batch has no images: show the VAE's decodings
            past, current = (decode_grey(comps.vae, frozen["vae"], batch[key][0, :k])
                             for key in ("past_latent", "current_mean"))
        out = edit_batch(model, {"unet": ema_params, **frozen}, past, ids, empty_ids, jnp.ones_like(past),
                         jnp.arange(k, dtype=jnp.uint32), jnp.float32(0.0), jnp.float32(7.5), jnp.float32(1.5),
                         jnp.float32(0.8), jnp.bool_(False), num_steps=int(config.log.sample_steps))
        return jnp.stack([past, out["edited"].astype(past.dtype), current])

    jitted = jax.jit(sample, out_shardings=replicated(mesh))

    def on_mesh(*args):  # traced with the mesh as context: the Pallas attention kernels shard_map over it
        with jax.set_mesh(mesh):
            return jitted(*args)

    return on_mesh


def write_samples(path: Path, rows: np.ndarray) -> None:
    """(3, k, H, W) in [-1, 1] -> one PNG: an example per row, past | edited | target."""
    from PIL import Image

    from x2x_jax.data.synthetic import to_uint8

    three, k, h, w = rows.shape
    grid = np.transpose(rows, (1, 2, 0, 3)).reshape(k * h, three * w)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(grid)).save(path)


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(config, workdir: str, data_iter_factory=None, max_steps: int | None = None,
          return_state: bool = False) -> dict:
    """Train one stage into `workdir`; resumes automatically from the newest checkpoint there.

    `data_iter_factory(config, process_index, process_count, accum, local_micro, tokenizer)` -> an iterator of
    numpy batches (leaves (accum, local_micro, ...)) with get_state()/set_state(); defaults to the TFDS pipeline.
    `max_steps` stops early (tests use it to simulate a kill); the schedule still follows config.train.steps.
    Returns a summary dict (final step, last metrics, export path; the final TrainState under "state" when
    return_state).
    """
    from x2x_jax.training import latent_cache
    from x2x_jax.training.data import make_train_iterator

    if config.data.get("latent_cache") and config.stage != "unet":
        raise ConfigError(f"data.latent_cache is for the UNet stage (stage=unet), not stage={config.stage!r}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    mesh = make_mesh(config.train.mesh_data, config.train.mesh_fsdp)
    accum, micro = batch_layout(config, mesh)
    key = jax.random.key(config.seed)
    comps = build_components(config, key, mesh)
    if config.data.get("latent_cache"):
        latent_cache.check(config, comps.params["vae"])
    objective = make_objective(config, comps)
    optimizer = make_optimizer(config.train.learning_rate, config.train.weight_decay, config.train.adam_b1,
                               config.train.adam_b2, config.train.adam_eps, config.train.grad_clip or None)
    component = STAGE_COMPONENT[config.stage]
    trainable = comps.params[component]
    # Frozen kernels are stored in the compute dtype (as diffusers' scripts keep frozen VAE / text encoder in
    # weight_dtype): the same numbers, since Conv/Dense cast kernels at use, at half the bytes in bf16.
    frozen = kernels_in_compute_dtype({k: v for k, v in comps.params.items() if k != component},
                                      compute_dtype(config.train.compute_dtype, mesh))

    def init(p):
        return init_train_state(p, optimizer, config.seed + 1)

    abstract_state = jax.eval_shape(init, trainable)
    abstract_frozen = jax.eval_shape(lambda t: t, frozen)
    use_compilation_cache(config, workdir, mesh)
    step = compile_step(config, mesh, objective, optimizer, abstract_state, abstract_frozen, accum, micro)
    frozen = jax.device_put(frozen, step.frozen_shardings)

    manager = ckpt.make_manager(workdir / "checkpoints", keep=config.log.keep)
    restored = ckpt.restore_latest(manager, ckpt.abstract_like(abstract_state, step.state_shardings))
    if restored is None:
        state = jax.jit(init, out_shardings=step.state_shardings)(trainable)
        data_state = None
    else:
        _, state, data_state = restored
    del trainable

    factory = data_iter_factory or make_train_iterator
    local_micro = micro // jax.process_count()
    data = factory(config, jax.process_index(), jax.process_count(), accum, local_micro, comps.tokenizer)
    if data_state:
        data.set_state(data_state)

    total = config.train.steps if max_steps is None else min(config.train.steps, max_steps)
    metrics_path = workdir / "metrics.jsonl"
    peak = peak_flops_per_device(mesh)
    start_step = int(state.step)
    last = {}
    progress = _progress(start_step, config.train.steps)
    sample_every = int(config.log.sample_every) if config.stage == "unet" else 0
    sampler = make_sampler(config, comps, mesh, micro) if sample_every > 0 else None
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
                    _append_jsonl(metrics_path, last)
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
        if config.stage == "vae":
            comps.vae = calibrate_scaling_factor(comps.vae, jax.device_get(state.ema_params), next(data))
            summary["scaling_factor"] = comps.vae.scaling_factor
        summary["export"] = str(export(config, comps, state, workdir))
    if return_state:
        summary["state"] = state
    return summary


def calibrate_scaling_factor(vae, params, batch: dict):
    """SD's rule: scale latents to unit standard deviation (1 / std of posterior samples over a batch)."""
    images = np.concatenate([np.reshape(batch[k], (-1,) + np.shape(batch[k])[-2:]) for k in ("past", "current")])
    x = jnp.repeat(jnp.asarray(images)[..., None], vae.in_channels, axis=-1)
    mean, logvar = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))(params, x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(jax.random.key(0), mean.shape)
    return vae.clone(scaling_factor=float(1.0 / jnp.std(z)))


def _progress(start: int, total: int):
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


def export(config, comps: Components, state: TrainState, workdir: Path) -> Path:
    """Write the trained component (EMA by default) with the rest of the pipeline as a diffusers directory."""
    params = jax.device_get(state.ema_params if config.log.export_ema else state.params)
    all_params = dict(comps.params)
    all_params[STAGE_COMPONENT[config.stage]] = params
    dst = workdir / "export"
    if jax.process_index() != 0:
        return dst
    if config.stage == "vae":  # the first stage of the synthetic default: only the VAE is new
        bridge.save_vae(dst / "vae", comps.vae.clone(dtype=jnp.float32, remat=False), params)
        return dst
    pipe = bridge.Pipeline(
        unet=comps.unet.clone(dtype=jnp.float32, remat=False) if "unet" in all_params else None,
        unet_params=all_params.get("unet"),
        vae=comps.vae.clone(dtype=jnp.float32, remat=False), vae_params=all_params["vae"],
        text_encoder=comps.text_encoder.clone(dtype=jnp.float32), text_params=all_params["text_encoder"],
        tokenizer=comps.tokenizer, scheduler_config=comps.scheduler_config)
    bridge.save_pipeline(dst, pipe)
    return dst
