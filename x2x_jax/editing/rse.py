"""Region-Specific Editing as a compiled program of three stages (`EditProgram`).

For a batch of (image, instruction, prior, seed): prepare (VAE encode -> text encode -> relevance map R -> guidance
map G = prior (pooled to latent resolution) * R -> mask M = G >= tau -> start latent) -> denoise (masked DDIM loop
with 3-way CFG, one batched UNet call per step) -> finish (VAE decode -> composite with the input outside M).

Static (one compilation each): batch, resolution, number of steps, number of relevance draws K. Traced: images,
token ids, priors, seeds, tau, guidance scales, noise level and the re-noise mode, so editing with other values
never recompiles.

Noise: every random draw comes from the per-image seed through `sample_noise` (VAE posterior sample, the start
noise, K relevance noises). The start latent is the source latent noised to the first DDIM timestep with the
start noise; the same draw re-noises the background at every step.

Re-noising: after each DDIM step x_t -> x_{t_prev} the latent outside M is replaced by the source latent noised
to t_prev (the timestep the latent is now at; "correct", the default). The original code re-noises to t, one
step behind ("paper", available for reproduction). At the last step t_prev < 0 and "correct" puts the clean
source latent back.

Relevance with K > 1 draws: the raw maps sum_c |eps_TI - eps_I| are averaged over K independent noise draws
before the IQR clip and min-max normalisation, so G keeps the range [0, 1] and tau means the same for every K.
K = 1 is the paper's map exactly.

tau = 0 makes M the whole latent (G >= 0 everywhere): the loop is plain InstructPix2Pix and the composite
returns the decoded image unchanged.

Guidance source (static, `guidance=`): "relevance" (the paper, the default) or "learned": the map that the prior
multiplies is then the output P of the guidance predictor (x2x_jax/models/guidance.py) on the source latents
(the VAE mode, IP2P's image conditioning) and the instruction's text states, and the relevance UNet passes are
not in the program at all. G = prior * P keeps the anatomical prior, so a learned edit, like a relevance one,
never leaves the named finding's region; P is deterministic, so G does not depend on the seed.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from x2x_jax.diffusion.ddim import ddim_prev_timesteps, ddim_step, ddim_timesteps
from x2x_jax.diffusion.schedule import NoiseSchedule, add_noise
from x2x_jax.editing import relevance
from x2x_jax.errors import ConfigError
from x2x_jax.models.vae import decode_grey, latent_factor, to_vae_channels

RENOISE_MODES = ("correct", "paper")
GUIDANCE_MODES = ("relevance", "learned")


@dataclasses.dataclass(frozen=True)
class EditModel:
    """Modules (static) and their parameters (pytrees) needed to edit."""

    unet: Any
    vae: Any
    text_encoder: Any
    schedule: NoiseSchedule
    scheduler_config: dict
    guidance: Any = None  # the learned guidance predictor (params["guidance"]), when there is one

    def __hash__(self):  # modules are hashable dataclasses; the config dict is not
        return hash((self.unet, self.vae, self.text_encoder, self.guidance))

    def __eq__(self, other):
        return self is other


@flax.struct.dataclass
class EditParams:
    """The traced parameters of an edit, with the paper's defaults: one pytree argument of the edit program, so a
    new tau, guidance scale, noise level or re-noising mode re-runs the compiled program without recompiling.

    tau: mask threshold on G (0 = plain InstructPix2Pix); text_scale / image_scale: s_T / s_I of the 3-way CFG;
    noise_level: the relevance map's timestep as a fraction of T; renoise_paper: re-noise the background to the
    step's input timestep, the original code's one step off (False: to the step's own output timestep).
    """

    tau: Any = 0.1
    text_scale: Any = 7.5
    image_scale: Any = 1.5
    noise_level: Any = 0.8
    renoise_paper: Any = False

    def check(self) -> EditParams:
        """ConfigError naming the CLI flag of the first bad value; returns self."""
        for name in ("tau", "text_scale", "image_scale", "noise_level"):
            if not np.isfinite(getattr(self, name)):
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(self, name)}")
        if not 0.0 <= self.tau <= 1.0:
            raise ConfigError(f"--tau must be in [0, 1], got {self.tau}")
        if not 0.0 < self.noise_level <= 1.0:
            raise ConfigError(f"--noise-level must be in (0, 1], got {self.noise_level}")
        if not isinstance(self.renoise_paper, (bool, np.bool_)):
            raise ConfigError(f"renoise_paper must be a bool, got {self.renoise_paper!r}")
        return self

    def traced(self) -> EditParams:
        """The values as the program's scalars (float32, bool): what the compiled program is called with."""
        return EditParams(*(np.float32(v) for v in (self.tau, self.text_scale, self.image_scale, self.noise_level)),
                          np.bool_(self.renoise_paper))


def pool_to_latent(maps: jax.Array, factor: int) -> jax.Array:
    """(B, H, W) -> (B, H/f, W/f) by averaging f x f blocks."""
    b, h, w = maps.shape
    return maps.reshape(b, h // factor, factor, w // factor, factor).mean(axis=(2, 4))


def upsample_nearest(maps: jax.Array, factor: int) -> jax.Array:
    return jnp.repeat(jnp.repeat(maps, factor, axis=1), factor, axis=2)


def sample_noise(seeds: jax.Array, latent_shape: tuple[int, ...], relevance_draws: int) -> dict:
    """Every random draw of an edit from the per-image seeds (B,) uint32.

    Returns posterior (B, *latent_shape): the VAE posterior sample; start (B, *latent_shape): the start /
    re-noise draw; relevance (K, B, *latent_shape): one draw per relevance pass.
    """
    keys = jax.vmap(lambda k: jax.random.split(k, 3))(jax.vmap(jax.random.key)(seeds))  # (B, 3)
    k_post, k_start, k_rel = keys[:, 0], keys[:, 1], keys[:, 2]
    normal = jax.vmap(lambda k: jax.random.normal(k, latent_shape, jnp.float32))
    rel = jnp.stack([normal(jax.vmap(lambda k: jax.random.fold_in(k, i))(k_rel)) for i in range(relevance_draws)])
    return {"posterior": normal(k_post), "start": normal(k_start), "relevance": rel}


def _cfg_unet(model: EditModel, unet_params, z, image_latents, context, empty_context, t, text_scale,
              image_scale):
    """3-way classifier-free guidance as one UNet call on a 3B batch (text+image, image only, neither), in
    diffusers' IP2P order: eps_0 + s_T (eps_TI - eps_I) + s_I (eps_I - eps_0)."""
    zeros = jnp.zeros_like(image_latents)
    x = jnp.concatenate([jnp.concatenate([z, image_latents], -1), jnp.concatenate([z, image_latents], -1),
                         jnp.concatenate([z, zeros], -1)], 0)
    ctx = jnp.concatenate([context, empty_context, empty_context], 0)
    eps = model.unet.apply({"params": unet_params}, x, jnp.broadcast_to(t, (x.shape[0],)), ctx)
    e_ti, e_i, e_0 = jnp.split(eps.astype(jnp.float32), 3, axis=0)
    return e_0 + text_scale * (e_ti - e_i) + image_scale * (e_i - e_0)


def denoise_step(model: EditModel, unet_params, z, t, t_prev, image_latents, context, empty_context, text_scale,
                 image_scale):
    """One DDIM step of the edit loop under 3-way guidance (before the latent outside the mask is replaced)."""
    eps = _cfg_unet(model, unet_params, z, image_latents, context, empty_context, t, text_scale, image_scale)
    return ddim_step(model.schedule, eps, t, t_prev, z)


def encode_inputs(model: EditModel, params: dict, images: jax.Array, input_ids: jax.Array, empty_ids: jax.Array,
                  seeds: jax.Array, relevance_draws: int) -> dict:
    """VAE and text encoding of an edit batch: z_src (scaled posterior sample), image_latents (the unscaled
    posterior mode IP2P conditions on), context / empty_context (B, 77, D), and the noise draws of `sample_noise`."""
    vae = model.vae
    mean, logvar = vae.apply({"params": params["vae"]}, to_vae_channels(images, vae.in_channels),
                             method=vae.encode)
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    noise = sample_noise(seeds, mean.shape[1:], relevance_draws)
    z_src = (mean + jnp.exp(0.5 * logvar) * noise["posterior"]) * vae.scaling_factor
    text = functools.partial(model.text_encoder.apply, {"params": params["text_encoder"]})
    context = text(input_ids)[0]
    empty_context = jnp.broadcast_to(text(empty_ids[None])[0], context.shape)
    return {"z_src": z_src, "image_latents": mean, "context": context, "empty_context": empty_context,
            "noise": noise}


def guidance_map(model: EditModel, params: dict, enc: dict, priors: jax.Array, noise_level: jax.Array, *,
                 guidance: str = "relevance") -> tuple[jax.Array, jax.Array]:
    """-> (map, G): the relevance map R (or, with guidance="learned", the predictor's map P), (B, h, w) in [0, 1],
    and the guidance map G = prior pooled to latent resolution * map."""
    if guidance == "learned":
        if model.guidance is None or "guidance" not in params:
            raise ValueError("guidance='learned' needs EditModel.guidance and params['guidance']")
        m = model.guidance.apply({"params": params["guidance"]}, enc["image_latents"], enc["context"])
        m = m.astype(jnp.float32)
    elif guidance == "relevance":
        T = model.schedule.num_train_timesteps
        t_rel = jnp.clip(jnp.round(noise_level * T), 0, T - 1).astype(jnp.int32)
        m = relevance.relevance_map(model.unet, params["unet"], model.schedule, enc["z_src"], enc["image_latents"],
                                    enc["context"], enc["empty_context"], t_rel, enc["noise"]["relevance"])
    else:
        raise ValueError(f"guidance must be one of {GUIDANCE_MODES}, got {guidance!r}")
    return m, pool_to_latent(priors.astype(jnp.float32), latent_factor(model.vae)) * m


def prepare_stage(model: EditModel, params: dict, images: jax.Array, input_ids: jax.Array, empty_ids: jax.Array,
                  priors: jax.Array, seeds: jax.Array, edit: EditParams, *, num_steps: int, relevance_draws: int = 1,
                  guidance: str = "relevance") -> dict:
    """The edit's first stage: VAE and text encoding, the guidance map G and the mask, the loop's start latent.
    Returns what the later stages take (source latents, conditioning, the re-noise draw, latent_mask,
    start_latents) and what the edit reports (guidance, relevance)."""
    enc = encode_inputs(model, params, images, input_ids, empty_ids, seeds, relevance_draws)
    relevance, guidance_g = guidance_map(model, params, enc, priors, edit.noise_level, guidance=guidance)
    first = int(ddim_timesteps(model.scheduler_config, num_steps)[0])
    z_src, renoise = enc["z_src"], enc["noise"]["start"]
    start = add_noise(model.schedule, z_src, renoise, jnp.full((z_src.shape[0],), first))
    return {"z_src": z_src, "renoise": renoise, "image_latents": enc["image_latents"], "context": enc["context"],
            "empty_context": enc["empty_context"], "guidance": guidance_g, "relevance": relevance,
            "latent_mask": guidance_g >= edit.tau, "start_latents": start}


def denoise_stage(model: EditModel, unet_params, prepared: dict, edit: EditParams, *, num_steps: int,
                  on_step=None) -> jax.Array:
    """The edit's second stage: the masked DDIM loop from prepared["start_latents"] -> the final latents. After each
    step the latent outside the mask is replaced by the source latent re-noised (see the module doc)."""
    z_src, renoise = prepared["z_src"], prepared["renoise"]
    timesteps = jnp.asarray(ddim_timesteps(model.scheduler_config, num_steps), jnp.int32)
    prev_timesteps = jnp.asarray(ddim_prev_timesteps(model.scheduler_config, num_steps), jnp.int32)
    b = z_src.shape[0]
    m = prepared["latent_mask"][..., None].astype(jnp.float32)

    def background(t):  # the source latent at timestep t (t < 0: the clean latent)
        noised = add_noise(model.schedule, z_src, renoise, jnp.full((b,), jnp.maximum(t, 0)))
        return jnp.where(t < 0, z_src, noised)

    def body(i, z):
        t, t_prev = timesteps[i], prev_timesteps[i]
        z = denoise_step(model, unet_params, z, t, t_prev, prepared["image_latents"], prepared["context"],
                         prepared["empty_context"], edit.text_scale, edit.image_scale)
        if on_step is not None:
            jax.debug.callback(on_step, i + 1)
        return m * z + (1.0 - m) * background(jnp.where(edit.renoise_paper, t, t_prev))

    return jax.lax.fori_loop(0, num_steps, body, prepared["start_latents"])


def finish_stage(model: EditModel, vae_params, images: jax.Array, latent_mask: jax.Array, z: jax.Array) -> dict:
    """The edit's last stage: VAE decode of the final latents and the composite with the input outside the mask."""
    vae = model.vae
    pixel_mask = upsample_nearest(latent_mask, latent_factor(vae))
    decoded = decode_grey(vae, vae_params, z / vae.scaling_factor)
    return {"edited": jnp.where(pixel_mask, decoded, images), "decoded": decoded, "mask": pixel_mask}


def run_stages(prepare, denoise, finish, params, images, input_ids, empty_ids, priors, seeds, edit) -> dict:
    """The edit from its three stages (functions of the signatures above, less the static arguments: traceable
    functions, jitted ones or compiled executables); see `edit_batch` for the result."""
    prepared = prepare(params, images, input_ids, empty_ids, priors, seeds, edit)
    z = denoise(params["unet"], prepared, edit)
    out = finish(params["vae"], images, prepared["latent_mask"], z)
    return {**out, "guidance": prepared["guidance"], "relevance": prepared["relevance"],
            "latent_mask": prepared["latent_mask"], "latents": z, "start_latents": prepared["start_latents"]}


def _stage_functions(model: EditModel, num_steps: int, relevance_draws: int, guidance: str, on_step) -> dict:
    return {"prepare": functools.partial(prepare_stage, model, num_steps=num_steps, relevance_draws=relevance_draws,
                                         guidance=guidance),
            "denoise": functools.partial(denoise_stage, model, num_steps=num_steps, on_step=on_step),
            "finish": functools.partial(finish_stage, model)}


def edit_batch(model: EditModel, params: dict, images: jax.Array, input_ids: jax.Array, empty_ids: jax.Array,
               priors: jax.Array, seeds: jax.Array, edit: EditParams, *, num_steps: int, relevance_draws: int = 1,
               guidance: str = "relevance", on_step=None) -> dict:
    """Edit a batch (traceable: the three stages in one function). images, priors: (B, H, W) in [-1, 1] / [0, 1];
    input_ids (B, L); empty_ids (L,); seeds (B,) uint32; edit: the traced parameters (scalars). on_step: None, or a
    host function called with the number of DDIM steps done after each step (a progress report; it changes no
    value the program computes).

    Returns a dict of arrays: edited (B, H, W) (the composite), decoded (B, H, W) (the VAE decode before the
    composite), guidance (B, h, w) = G, relevance (B, h, w) = R (with guidance="learned": the predictor's map P),
    mask (B, H, W) bool (pixel), latent_mask (B, h, w) bool, latents (B, h, w, c) final latents, start_latents
    (B, h, w, c): the loop's start.
    """
    stages = _stage_functions(model, num_steps, relevance_draws, guidance, on_step)
    return run_stages(stages["prepare"], stages["denoise"], stages["finish"], params, images, input_ids, empty_ids,
                      priors, seeds, edit)


STAGES = ("prepare", "denoise", "finish")


class EditProgram:
    """The compiled edit: `edit_batch` as three jitted stages (prepare: encoders, G, mask; denoise: the DDIM loop;
    finish: decode, composite), called like one jitted function: fn(params, images, ids, empty_ids, priors, seeds,
    edit_params.traced()). `lower(*args).compile()` compiles the stages for the arguments' devices, each stage
    for the shapes and shardings of the one before, and returns a `CompiledEdit`.

    Why three programs rather than one: the TPU compiler's time grows faster than the program, and the SD1.5 edit
    as one program did not finish compiling on our 2-core hosts in 46 min, while its DDIM loop alone compiles in
    9 min; three dispatches per edit cost microseconds. Each stage is also cached on its own.
    """

    def __init__(self, model: EditModel, num_steps: int, relevance_draws: int = 1, guidance: str = "relevance",
                 on_step=None):
        self.num_steps = num_steps
        self.functions = _stage_functions(model, num_steps, relevance_draws, guidance, on_step)
        self.jitted = {name: jax.jit(fn) for name, fn in self.functions.items()}

    def __call__(self, *args) -> dict:
        return run_stages(*(self.jitted[n] for n in STAGES), *args)

    def lower(self, *args) -> "LoweredEdit":
        return LoweredEdit(self, args)

    def cache_sizes(self) -> dict:
        """{stage: number of compiled versions} (jit's cache)."""
        return {name: fn._cache_size() for name, fn in self.jitted.items()}


@dataclasses.dataclass
class LoweredEdit:
    program: EditProgram
    args: tuple

    def compile(self) -> "CompiledEdit":
        params, images, edit = self.args[0], self.args[1], self.args[-1]
        jitted, stages, seconds = self.program.jitted, {}, {}

        def timed(name, *args):
            t0 = time.perf_counter()
            stages[name] = jitted[name].lower(*args).compile()
            seconds[name] = time.perf_counter() - t0
            return _abstract(stages[name].out_info)

        prepared = timed("prepare", *self.args)
        z = timed("denoise", _abstract(params["unet"]), prepared, _abstract(edit))
        timed("finish", _abstract(params["vae"]), _abstract(images), prepared["latent_mask"], z)
        return CompiledEdit(stages, seconds)


@dataclasses.dataclass
class CompiledEdit:
    """The compiled stages (`STAGES` order) and each one's compile time in seconds."""

    stages: dict
    compile_seconds: dict

    def __call__(self, *args) -> dict:
        return run_stages(*(self.stages[n] for n in STAGES), *args)


def _abstract(tree):
    """Arrays or ShapeDtypeStructs -> ShapeDtypeStructs with their shardings (default layouts)."""
    def one(x):
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))
    return jax.tree.map(one, tree)


def compile_edit(model: EditModel, num_steps: int, relevance_draws: int = 1, guidance: str = "relevance",
                 on_step=None) -> EditProgram:
    """The edit program (`EditProgram`); call as fn(params, images, ids, empty_ids, priors, seeds,
    edit_params.traced()) (see `edit_batch`). guidance="learned" needs `model.guidance` and params["guidance"];
    on_step: see `edit_batch`."""
    if num_steps < 1 or relevance_draws < 1:
        raise ValueError(f"num_steps={num_steps} and relevance_draws={relevance_draws} must be >= 1")
    if guidance not in GUIDANCE_MODES:
        raise ValueError(f"guidance must be one of {GUIDANCE_MODES}, got {guidance!r}")
    if guidance == "learned":
        if model.guidance is None:
            raise ValueError("guidance='learned' needs EditModel.guidance (a GuidancePredictor)")
        relevance_draws = 1  # no relevance passes in this program; keep the noise draws minimal
    return EditProgram(model, num_steps, relevance_draws, guidance, on_step)
