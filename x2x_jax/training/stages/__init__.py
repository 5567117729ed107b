"""Training stages: what the one trainer (training/loop.py) needs to know about each thing we train.

A stage is a small object with a `name` and `build(config, mesh, abstract=False) -> Built`; `Built` holds what
the trainer compiles, feeds and exports:

    objective   batch_dims / draw / prepare / loss (training/step.py runs it: accumulation, AdamW, EMA)
    trainable   the trained model's initial params
    frozen      the frozen models' params (kernels already in the compute dtype)
    example     one example's device arrays {key: ShapeDtypeStruct}: the batch layout the step is compiled for
    data        (process_index, process_count, accum, local_micro) -> training.data.Batches with those keys
    export      (trained params on the host, the data stream, workdir) -> summary entries ({"export": path, ...})
    sampler     optional (mesh, micro) -> sample(ema_params, frozen, batch) -> (3, k, H, W) rows for a PNG

abstract=True builds shapes only (no weights read or initialised, no data opened): what `--compile-only` needs.

    vae            the synthetic default's KL autoencoder (stages/vae.py)
    unet           the InstructPix2Pix UNet on image pairs, VAE and text encoder frozen (stages/unet.py)
    unet (cached)  the same objective on a latent cache (stages/cached_unet.py; data.latent_cache=DIR)
    guidance       the learned guidance-map predictor, distilled from a trained model (stages/guidance.py)
    text           a CLIP text encoder pretrained contrastively against the change each instruction describes,
                   for worlds without a pretrained CLIP (stages/text.py; the synthetic default's second stage)
"""

from __future__ import annotations

from x2x_jax.errors import ConfigError
from x2x_jax.training.stages import cached_unet, guidance, text, unet, vae
from x2x_jax.training.stages.base import Built  # noqa: F401  (the interface, documented above)


def for_config(config, source=None):
    """The stage `config.stage` names (with data.latent_cache, the cached UNet stage). `source`: a random-access
    record source to read instead of the config's TFDS build (tests, custom data)."""
    cached = bool(config.data.get("latent_cache"))
    if cached and config.stage != "unet":
        raise ConfigError(f"data.latent_cache is for the UNet stage (stage=unet), not stage={config.stage!r}")
    if config.stage == "vae":
        return vae.VAEStage(source)
    if config.stage == "unet":
        return cached_unet.CachedUNetStage() if cached else unet.UNetStage(source)
    if config.stage == "guidance":
        return guidance.GuidanceStage(source)
    if config.stage == "text":
        return text.TextStage(source)
    raise ConfigError(f"stage must be 'vae', 'text', 'unet' or 'guidance' here, got {config.stage!r}")
