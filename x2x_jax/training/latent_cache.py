"""Offline latent cache for the UNet stage: the frozen VAE's work on every training pair, done once.

At 512 px the frozen VAE encoder costs 1.12 TFLOP per image and each example encodes two (past and current):
~48 % of an SD1.5 IP2P train step's model FLOPs (the UNet's forward + backward is 2.41). With
`data.latent_cache=DIR` the UNet stage reads, per example, the current image's posterior mean and log-variance
(the target latent is still sampled from them at every step, as in-step encoding does), the past image's latent
(the posterior mode, IP2P's image conditioning) and the instruction's token ids. The CLIP text encoder still runs
in the step (0.013 TFLOP per example, 0.3 %): caching its states would save nothing measurable.

Changed semantics: the cache holds the un-augmented pairs, so a cached run has no rotation / flip augmentation;
the stage refuses `data.rotation_deg` / `data.flip_p` other than 0 instead of ignoring them. Building:

  python train.py --config configs/ix2x_v1.py --workdir runs/v1 --config.stage=latents \
      --config.data.latent_cache=runs/v1/latents [--config.data.manual_dir=...] [--config.model.init_from=...]

Layout of DIR: current_mean.npy, current_logvar.npy, past_latent.npy (N, h, w, c) float32; input_ids.npy (N, 77)
int32; meta.json (data set, split, resolution, the VAE's parameter digest). DIR appears only when complete.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from x2x_jax import outputs
from x2x_jax.data.pipeline import NO_AUGMENTATION, make_iterator
from x2x_jax.errors import ConfigError
from x2x_jax.models.tokenizer import tokenize
from x2x_jax.models.vae import encode_pair
from x2x_jax.training.components import build_components
from x2x_jax.training.data import image_source
from x2x_jax.training.sharding import batch_sharding, make_mesh, replicated

ARRAYS = ("current_mean", "current_logvar", "past_latent", "input_ids")
FORMAT = 1
COMMAND = "x2x-train latents"  # the marker of a finished cache (x2x_jax.outputs)


def vae_digest(vae_params) -> str:
    """sha256 of the VAE's parameters (paths, dtypes, shapes, bytes): which VAE produced a cache."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(vae_params):
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _meta_for(config, vae_params) -> dict:
    return {"format": FORMAT, "dataset": f"{config.data.name}/{config.data.builder_config}",
            "split": config.data.train_split, "resolution": int(config.data.resolution),
            "vae_sha256": vae_digest(vae_params)}


def build(config, comps, mesh, source=None) -> Path:
    """Encode the training split (or `source`, a random-access record source) with the frozen VAE into
    `config.data.latent_cache`; returns that path."""
    out = cache_path(config)
    if out.exists():
        raise ConfigError(f"data.latent_cache: {out} exists; delete it to rebuild")
    if jax.process_count() > 1:
        raise ConfigError("stage=latents runs in one process (it uses that process's devices)")
    if source is None:
        source = image_source(config)
    n, batch = len(source), config.train.per_device_batch * mesh.size

    def encode(params, past, current):
        return tuple(x.astype(jnp.float32) for x in encode_pair(comps.vae, params, past, current))

    encode = jax.jit(encode, in_shardings=(replicated(mesh), batch_sharding(mesh, 0), batch_sharding(mesh, 0)))
    params = jax.device_put(comps.params["vae"], replicated(mesh))
    it = make_iterator(source, batch_size=batch, shuffle=False, num_epochs=1, augmentation=NO_AUGMENTATION,
                       tokenize_fn=lambda texts: tokenize(comps.tokenizer, list(texts)), drop_remainder=False,
                       shard_index=0, shard_count=1)
    with outputs.staged(out, COMMAND, flag="data.latent_cache") as tmp:
        arrays, done = None, 0
        for b in it:
            size = len(b["past"])
            latents = jax.device_get(encode(params, _pad(b["past"], batch), _pad(b["current"], batch)))
            if arrays is None:
                arrays = {k: np.lib.format.open_memmap(tmp / f"{k}.npy", "w+", np.float32, (n, *v.shape[1:]))
                          for k, v in zip(ARRAYS[:3], latents)}
                arrays["input_ids"] = np.lib.format.open_memmap(tmp / "input_ids.npy", "w+", np.int32,
                                                                (n, b["input_ids"].shape[1]))
            for k, v in zip(ARRAYS[:3], latents):
                arrays[k][done:done + size] = v[:size]
            arrays["input_ids"][done:done + size] = b["input_ids"]
            done += size
            print(f"\rlatent cache: {done}/{n}", end="", flush=True)
        print()
        if done != n:
            raise ConfigError(f"latent cache: read {done} of {n} examples")
        for a in arrays.values():
            a.flush()
        (tmp / "meta.json").write_text(json.dumps({**_meta_for(config, comps.params["vae"]), "num_examples": n},
                                                  indent=2))
    return out


def run_stage(config) -> Path:
    """stage=latents: the frozen VAE of the UNet stage's config (model.init_from / model.vae_from, else random)."""
    if not config.data.get("latent_cache"):
        raise ConfigError("stage=latents needs --config.data.latent_cache=DIR (where to write the cache)")
    mesh = make_mesh(config.train.mesh_data, config.train.mesh_fsdp)
    unet_config = config.copy_and_resolve_references()
    unet_config.stage = "unet"
    return build(config, build_components(unet_config, jax.random.key(config.seed), mesh, with_unet=False), mesh)


def _pad(x: np.ndarray, size: int) -> np.ndarray:  # the last, partial batch: repeat its last row
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), 0)]) if len(x) < size else x


def cache_path(config) -> Path:
    return Path(config.data.latent_cache).expanduser().absolute()


def check(config, vae_params) -> dict:
    """The cache's meta.json, after checking it was built for this config's data and VAE (else ConfigError)."""
    path = cache_path(config)
    if not (path / "meta.json").is_file():
        raise ConfigError(f"data.latent_cache: {path} is not a latent cache (no meta.json); build it with "
                          "--config.stage=latents")
    if config.data.rotation_deg or config.data.flip_p:
        raise ConfigError("data.latent_cache holds un-augmented latents: set data.rotation_deg=0 and data.flip_p=0 "
                          f"(got {config.data.rotation_deg} and {config.data.flip_p})")
    meta = json.loads((path / "meta.json").read_text())
    want = _meta_for(config, vae_params)
    for key, value in want.items():
        if meta.get(key) != value:
            what = "the VAE's parameters" if key == "vae_sha256" else f"{key}={value!r}"
            raise ConfigError(f"data.latent_cache: {path} was built for {key}={meta.get(key)!r}, this run needs "
                              f"{what}; rebuild it with --config.stage=latents")
    return meta


class CachedSource:
    """Random access to a latent cache: index -> {current_mean, current_logvar, past_latent, input_ids}."""

    def __init__(self, path):
        path = Path(path)
        self.arrays = {k: np.load(path / f"{k}.npy", mmap_mode="r") for k in ARRAYS}

    def __len__(self) -> int:
        return len(self.arrays["input_ids"])

    def __getitem__(self, index: int) -> dict:
        return {k: np.array(a[index]) for k, a in self.arrays.items()}
