"""Training stage "guidance": the learned guidance-map predictor (x2x_jax/models/guidance.py).

    python train.py --config configs/synth_tiny.py --workdir runs/synth_tiny --config.stage=guidance
    # -> runs/synth_tiny/guidance/export (config.json + diffusion_pytorch_model.safetensors); copy it to
    #    <model dir>/guidance/ and edit with `edit.py --guidance learned`.

The frozen model (`guidance.model_from`: a diffusers directory with unet/, vae/, text_encoder/) provides the
image latents, the text states and the distillation target. Per example and step:

* distillation target: the expected guidance map of the paper's procedure, E_k[R_k] * M_pseudo, with R_k the
  relevance map (IQR-clipped, min-max normalised, x2x_jax/editing/relevance.py) of one noise draw at
  t = noise_level * T and the mean taken over `guidance.draws` (K) independent draws. It is computed on the fly
  inside the jitted step (the frozen UNet runs K times on a 2B batch), not precomputed: the pipeline's joint
  rotation / flip changes the image and the instruction's side every epoch, and fresh draws each step make the
  predictor regress to the expectation rather than to K fixed samples. distill_weight = 0 leaves those UNet
  passes out of the program.
* supervised target: the data set's ground-truth change mask (synth_cxr_edit has one) averaged over f x f
  blocks to latent resolution (a soft target in [0, 1]).
* M_pseudo: the anatomical prior of the (augmented) instruction (x2x_jax/editing/priors.py), pooled like the
  mask; the predictor's map P is used at edit time as G = P * M_pseudo.

loss = distill_weight * mean((P * M - E[R] * M)^2) + mask_weight * BCE(P, mask) averaged over the prior's support
(M > 0): outside it G = 0 whatever P is, so P is neither asked nor blamed there.

The loop is the project's: the same compiled, donated, sharded `make_train_step` (AdamW, EMA, accumulation),
orbax checkpoints with the data iterator state (rerun to resume), metrics.jsonl and the progress bar; the EMA
predictor is exported to WORKDIR/export when the run reaches guidance_stage.steps.

`python -m x2x_jax.training.guidance measure` compares learned and relevance guidance against the true change
masks of a synthetic split (IoU at tau, AUROC, seed spread).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from x2x_jax import targets
from x2x_jax.editing.rse import EditModel, _relevance, latent_factor, pool_to_latent
from x2x_jax.errors import ConfigError
from x2x_jax.models.guidance import GuidancePredictor, init_params, save_guidance
from x2x_jax.training import checkpoint as ckpt
from x2x_jax.training.step import image_batch_dims, to_vae_channels

BATCH_KEYS = ("past", "current", "input_ids", "mask", "prior")


# ----------------------------------------------------------------------------------------------- objective


@dataclasses.dataclass(frozen=True)
class GuidanceObjective:
    """batch_dims / draw / prepare / loss for `make_train_step`; frozen = {"unet", "vae", "text_encoder"} params."""

    predictor: GuidancePredictor
    model: EditModel  # the frozen UNet, VAE, text encoder and noise schedule
    empty_ids: jax.Array  # (77,)
    draws: int = 8
    noise_level: float = 0.8
    distill_weight: float = 1.0
    mask_weight: float = 1.0

    def latent_shape(self, image_hw):
        f = latent_factor(self.model.vae)
        return image_hw[0] // f, image_hw[1] // f, self.model.vae.latent_channels

    def batch_dims(self, batch: dict) -> tuple[int, int, tuple[int, int]]:
        return image_batch_dims(batch)

    def draw(self, key, accum: int, micro: int, image_hw) -> dict:
        k_post, k_rel = jax.random.split(key)
        lat = self.latent_shape(image_hw)
        return {"posterior_noise": jax.random.normal(k_post, (accum, micro, *lat)),
                "relevance_noise": jax.random.normal(k_rel, (accum, self.draws, micro, *lat))}

    def prepare(self, frozen: dict, batch: dict, rand: dict) -> dict:
        m, f = self.model, latent_factor(self.model.vae)
        mean, logvar = m.vae.apply({"params": frozen["vae"]}, to_vae_channels(batch["past"], m.vae.in_channels),
                                   method=m.vae.encode)
        mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
        text = lambda ids: m.text_encoder.apply({"params": frozen["text_encoder"]}, ids)[0]  # noqa: E731
        context = text(batch["input_ids"]).astype(jnp.float32)
        prior = pool_to_latent(batch["prior"].astype(jnp.float32), f)
        out = {"image_latents": mean, "context": context, "prior": prior,
               "mask": pool_to_latent(batch["mask"].astype(jnp.float32), f)}
        if self.distill_weight:
            z_src = (mean + jnp.exp(0.5 * logvar) * rand["posterior_noise"]) * m.vae.scaling_factor
            empty = jnp.broadcast_to(text(self.empty_ids[None]), context.shape)
            T = m.schedule.num_train_timesteps
            t_rel = jnp.clip(jnp.round(self.noise_level * T), 0, T - 1).astype(jnp.int32)
            # One normalised map per draw (the paper's K = 1 map), then the mean: the expected guidance map.
            per_draw = jax.lax.map(lambda n: _relevance(m, frozen["unet"], z_src, mean, context, empty, t_rel,
                                                        n[None]), rand["relevance_noise"])
            out["distill"] = jnp.mean(per_draw, axis=0) * prior
        return jax.lax.stop_gradient(out)

    def loss(self, params, inputs: dict) -> jax.Array:
        p = self.predictor.apply({"params": params}, inputs["image_latents"], inputs["context"])
        prior = inputs["prior"]
        total = jnp.zeros((), jnp.float32)
        if self.distill_weight:
            total += self.distill_weight * jnp.mean(jnp.square(p * prior - inputs["distill"]))
        if self.mask_weight:
            support = (prior > 0).astype(jnp.float32)
            pc, y = jnp.clip(p, 1e-6, 1.0 - 1e-6), inputs["mask"]
            bce = -(y * jnp.log(pc) + (1.0 - y) * jnp.log1p(-pc))
            total += self.mask_weight * jnp.sum(bce * support) / jnp.maximum(jnp.sum(support), 1.0)
        return total


# ----------------------------------------------------------------------------------------------- data


class GuidanceBatches:
    """The training pipeline's batches (with the change mask) plus each example's anatomical prior, shaped
    (accum, local_micro, ...); checkpointable like `TrainBatches`."""

    def __init__(self, it, accum: int, local_micro: int, resolution: int):
        self._it, self._accum, self._micro, self._res = it, accum, local_micro, resolution

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        from x2x_jax.editing.priors import prior_for_instruction

        b = next(self._it)
        if "mask" not in b:
            raise ConfigError("guidance stage: the data set has no change masks (the supervised target needs "
                              "them; set guidance.mask_weight=0 and use a data set with masks)")
        r = self._res
        b["prior"] = np.stack([prior_for_instruction(str(t), r, r)[0] for t in b["instruction"]])
        return {k: np.asarray(b[k]).reshape(self._accum, self._micro, *np.shape(b[k])[1:]) for k in BATCH_KEYS}

    def get_state(self):
        return self._it.get_state()

    def set_state(self, state):
        self._it.set_state(state)


def make_guidance_iterator(config, process_index: int, process_count: int, accum: int, local_micro: int,
                           tokenizer, source=None) -> GuidanceBatches:
    """Like `training.data.make_train_iterator` (same shuffling, sharding, joint augmentation) with masks."""
    from x2x_jax.convert.tokenizer import tokenize
    from x2x_jax.data.pipeline import Augmentation, make_iterator, open_source
    from x2x_jax.training.data import dataset_name, ensure_built

    if source is None:
        ensure_built(config)
        source = open_source(dataset_name(config), config.data.train_split, config.data.data_dir)
    it = make_iterator(source, batch_size=accum * local_micro, seed=config.seed,
                       augmentation=Augmentation(config.data.rotation_deg, config.data.flip_p), with_mask=True,
                       tokenize_fn=lambda texts: tokenize(tokenizer, list(texts)), shard_index=process_index,
                       shard_count=process_count, worker_count=config.data.worker_count, shard_block=local_micro)
    return GuidanceBatches(it, accum, local_micro, config.data.resolution)


# ----------------------------------------------------------------------------------------------- models


def load_frozen(model_dir) -> tuple[EditModel, dict, Any]:
    """(EditModel, {"unet", "vae", "text_encoder"} params, tokenizer) of a trained diffusers directory."""
    from x2x_jax.convert import diffusers as bridge
    from x2x_jax.convert.tokenizer import load_tokenizer
    from x2x_jax.diffusion.schedule import noise_schedule
    from x2x_jax.editing.api import resolve_model_dir

    if not model_dir:
        raise ConfigError("guidance.model_from: set it to the trained model directory to distil from")
    root = resolve_model_dir(model_dir)
    pipe = bridge.load_pipeline(root, components=("unet", "vae", "text_encoder", "scheduler"))
    tokenizer = load_tokenizer(root)  # its own tokenizer/ when present, else CLIP's BPE file (as the Editor)
    model = EditModel(pipe.unet, pipe.vae, pipe.text_encoder, noise_schedule(pipe.scheduler_config),
                      pipe.scheduler_config)
    return model, {"unet": pipe.unet_params, "vae": pipe.vae_params, "text_encoder": pipe.text_params}, tokenizer


def make_predictor(config, model: EditModel) -> GuidancePredictor:
    g = config.guidance
    predictor = GuidancePredictor(latent_channels=model.vae.latent_channels,
                                  cross_attention_dim=model.text_encoder.hidden_size,
                                  block_out_channels=tuple(g.block_out_channels),
                                  attention_heads=g.attention_heads, norm_num_groups=g.norm_num_groups)
    predictor.check()
    return predictor


# ----------------------------------------------------------------------------------------------- loop


def train(config, workdir: str, data_iter_factory=None, max_steps: int | None = None) -> dict:
    """Train the predictor into `workdir` (resumes from its newest checkpoint); returns a summary dict.

    data_iter_factory(config, process_index, process_count, accum, local_micro, tokenizer) -> GuidanceBatches
    (default: the TFDS pipeline of `config.data`). max_steps stops early (tests).
    """
    from x2x_jax.convert.tokenizer import tokenize
    from x2x_jax.training.loop import NonFiniteLoss, StopRequested, _append_jsonl, _progress, batch_layout
    from x2x_jax.training.sharding import (batch_sharding, global_batch_from_process_local, make_mesh,
                                           replicated, state_shardings)
    from x2x_jax.training.state import init_train_state, make_optimizer
    from x2x_jax.training.step import make_train_step

    g = config.guidance
    if g.draws < 1 or g.distill_weight < 0 or g.mask_weight < 0 or not (g.distill_weight or g.mask_weight):
        raise ConfigError(f"guidance: draws={g.draws} must be >= 1 and distill_weight={g.distill_weight}, "
                          f"mask_weight={g.mask_weight} >= 0, not both 0")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    mesh = make_mesh(config.train.mesh_data, config.train.mesh_fsdp)
    accum, micro = batch_layout(config, mesh)
    model, frozen, tokenizer = load_frozen(g.model_from)
    predictor = make_predictor(config, model)
    res, f = config.data.resolution, latent_factor(model.vae)
    if res % f:
        raise ConfigError(f"data.resolution={res} is not a multiple of the VAE's factor {f}")
    empty_ids = jnp.asarray(tokenize(tokenizer, [""])[0][0])
    objective = GuidanceObjective(predictor, model, empty_ids, int(g.draws), float(g.noise_level),
                                  float(g.distill_weight), float(g.mask_weight))
    t = config.train
    optimizer = make_optimizer(t.learning_rate, t.weight_decay, t.adam_b1, t.adam_b2, t.adam_eps,
                               t.grad_clip or None)
    trainable = init_params(predictor, jax.random.key(config.seed), (res // f, res // f))

    def init(p):
        return init_train_state(p, optimizer, config.seed + 1)

    abstract_state = jax.eval_shape(init, trainable)
    st_sh = state_shardings(abstract_state, mesh, t.param_sharding)
    fr_sh = jax.tree.map(lambda _: replicated(mesh), frozen)
    b_sh = batch_sharding(mesh)
    step_fn = jax.jit(make_train_step(objective, optimizer, t.ema_decay,
                                      unroll_accumulation=targets.platform(mesh) == "cpu"),
                      in_shardings=(st_sh, fr_sh, b_sh),
                      out_shardings=(st_sh, replicated(mesh)), donate_argnums=(0,))
    img = jax.ShapeDtypeStruct((accum, micro, res, res), jnp.float32, sharding=b_sh)
    abstract_batch = {"past": img, "current": img, "mask": img, "prior": img,
                      "input_ids": jax.ShapeDtypeStruct((accum, micro, 77), jnp.int32, sharding=b_sh)}
    compiled = step_fn.lower(ckpt.abstract_like(abstract_state, st_sh), ckpt.abstract_like(frozen, fr_sh),
                             abstract_batch).compile()
    frozen = jax.device_put(frozen, fr_sh)

    manager = ckpt.make_manager(workdir / "checkpoints", keep=config.log.keep)
    restored = ckpt.restore_latest(manager, ckpt.abstract_like(abstract_state, st_sh))
    if restored is None:
        state, data_state = jax.jit(init, out_shardings=st_sh)(trainable), None
    else:
        _, state, data_state = restored
    factory = data_iter_factory or make_guidance_iterator
    data = factory(config, jax.process_index(), jax.process_count(), accum, micro // jax.process_count(),
                   tokenizer)
    if data_state:
        data.set_state(data_state)

    total = t.steps if max_steps is None else min(t.steps, max_steps)
    start, last = int(state.step), {}
    progress = _progress(start, t.steps)
    t_last, n_last = time.perf_counter(), start
    with StopRequested() as stop:
        for i in range(start, total):
            new_state, metrics = compiled(state, frozen, global_batch_from_process_local(next(data), mesh))
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                manager.wait_until_finished()
                raise NonFiniteLoss(f"step {i + 1}: loss is {loss}; stopped. The last good checkpoint in "
                                    f"{workdir / 'checkpoints'} (step {manager.latest_step()}) is intact.")
            state, n = new_state, i + 1
            if n % config.log.every == 0 or n == total:
                dt = time.perf_counter() - t_last
                last = {"step": n, "loss": loss, "grad_norm": float(metrics["grad_norm"]), "lr": t.learning_rate,
                        "img_per_s": (n - n_last) * accum * micro / max(dt, 1e-9)}
                if jax.process_index() == 0:
                    _append_jsonl(workdir / "metrics.jsonl", last)
                progress(n, last)
                t_last, n_last = time.perf_counter(), n
            if n % config.log.checkpoint_every == 0 or n == total or stop.requested:
                ckpt.save(manager, n, state, data.get_state(), force=True)
            if stop.requested:
                print(f"\nstopped at step {n}; checkpoint saved in {workdir / 'checkpoints'}", flush=True)
                break
    manager.wait_until_finished()
    summary = {"step": int(state.step), **last}
    if int(state.step) >= t.steps:
        params = jax.device_get(state.ema_params if config.log.export_ema else state.params)
        dst = workdir / "export"
        if jax.process_index() == 0:
            save_guidance(dst, predictor, params)
        summary["export"] = str(dst)
    return summary


# ----------------------------------------------------------------------------------------------- measure


def measure(model_dir, guidance_dir=None, *, data_dir: str, dataset: str = "synth_cxr_edit/v1", split: str = "val",
            n: int = 64, seeds=(0, 1, 2, 3), tau: float = 0.1, noise_level: float = 0.8, batch: int = 32) -> dict:
    """Learned vs relevance guidance G against the true change masks of the first `n` examples of a split.

    Per image and seed: IoU of (G upsampled to pixels as the edit does) >= tau, and the pixel AUROC of G; then the
    mean over images of the seed mean, the mean over images of the variance over seeds, and the mean pairwise
    IoU between seeds' masks (`seed_stability`). "prior" is G with the map set to 1 (M_pseudo alone), the
    baseline both maps refine. Relevance: K = 1 draw, the paper's map.
    """
    from x2x_jax.convert.tokenizer import tokenize
    from x2x_jax.data.pipeline import Augmentation, augment_example, open_source
    from x2x_jax.editing.api import resolve_model_dir
    from x2x_jax.editing.priors import prior_for_instruction
    from x2x_jax.editing.rse import encode_inputs, guidance_map, upsample_nearest
    from x2x_jax.evaluate import metrics
    from x2x_jax.models.guidance import load_guidance

    model, params, tokenizer = load_frozen(model_dir)
    gdir = Path(guidance_dir) if guidance_dir else resolve_model_dir(model_dir) / "guidance"
    predictor, params["guidance"] = load_guidance(gdir)
    model = dataclasses.replace(model, guidance=predictor)
    f = latent_factor(model.vae)
    source = open_source(dataset, split, data_dir)
    rng = np.random.default_rng(0)
    ex = [augment_example(source[i], rng, Augmentation(0.0, 0.0), with_mask=True) for i in range(min(n, len(source)))]
    images = np.stack([e["past"] for e in ex])
    masks = np.stack([e["mask"] for e in ex]) > 0.5
    texts = [e["instruction"] for e in ex]
    r = images.shape[-1]
    priors = np.stack([prior_for_instruction(t, r, r)[0] for t in texts])
    ids = np.asarray(tokenize(tokenizer, texts)[0], np.int32)
    empty = np.asarray(tokenize(tokenizer, [""])[0][0], np.int32)

    @jax.jit
    def maps(params, images, ids, priors, seeds):
        enc = encode_inputs(model, params, images, ids, empty, seeds, 1)
        out = {}
        for kind in ("relevance", "learned"):
            _, g = guidance_map(model, params, enc, priors, jnp.float32(noise_level), guidance=kind)
            out[kind] = upsample_nearest(g, f)
        out["prior"] = upsample_nearest(pool_to_latent(priors, f), f)
        return out

    per_seed = {k: [] for k in ("relevance", "learned", "prior")}
    t0 = time.perf_counter()
    for s in seeds:
        chunks = []
        for i in range(0, len(ex), batch):
            sl = slice(i, i + batch)
            seed_arr = np.full(len(images[sl]), s, np.uint32) + np.arange(i, i + len(images[sl]), dtype=np.uint32)
            chunks.append(jax.device_get(maps(params, images[sl], ids[sl], priors[sl], seed_arr)))
        for k in per_seed:
            per_seed[k].append(np.concatenate([c[k] for c in chunks]))
    seconds = time.perf_counter() - t0
    result = {"n": len(ex), "seeds": list(seeds), "tau": tau, "split": split, "model": str(model_dir),
              "guidance_dir": str(gdir), "seconds": seconds}
    for k, g in per_seed.items():
        g = np.stack(g)  # (S, N, H, W)
        iou = metrics.thresholded_iou(g, masks[None], tau)  # (S, N)
        auroc = metrics.map_auroc(g, masks[None])
        result[k] = {"iou": metrics.summarize(np.nanmean(iou, 0))["mean"],
                     "auroc": metrics.summarize(np.nanmean(auroc, 0))["mean"],
                     "iou_seed_var": float(np.nanmean(np.nanvar(iou, 0))),
                     "iou_seed_std": float(np.nanmean(np.nanstd(iou, 0))),
                     "auroc_seed_var": float(np.nanmean(np.nanvar(auroc, 0))),
                     "map_seed_var": float(np.mean(np.var(g, 0))),
                     "seed_stability": metrics.summarize(metrics.seed_stability(g, tau))["mean"],
                     "mask_fraction": float(np.mean(g >= tau))}
    result["true_mask_fraction"] = float(masks.mean())
    return result


def main(argv=None):
    import argparse

    from x2x_jax.editing.api import DEFAULT_MODEL
    from x2x_jax.errors import cli_main

    p = argparse.ArgumentParser(prog="python -m x2x_jax.training.guidance",
                                description="measure: learned vs relevance guidance against true change masks")
    p.add_argument("command", choices=("measure",))
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--guidance-model", default=None, help="default: MODEL/guidance")
    p.add_argument("--data-dir", required=True, help="TFDS data_dir holding the synthetic set")
    p.add_argument("--dataset", default="synth_cxr_edit/v1")
    p.add_argument("--split", default="val")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--tau", type=float, default=0.1)

    @cli_main
    def run():
        a = p.parse_args(argv)
        result = measure(a.model, a.guidance_model, data_dir=a.data_dir, dataset=a.dataset, split=a.split, n=a.n,
                         seeds=tuple(range(a.seeds)), tau=a.tau)
        print(json.dumps(result, indent=2))
        return 0

    return run()


if __name__ == "__main__":
    raise SystemExit(main())
