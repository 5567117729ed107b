"""Single-file LDM checkpoints (SD 1.x `.ckpt`, `instruct-pix2pix-00-22000.ckpt`) <-> diffusers state dicts.

The LDM file holds all three models under one flat dict:

    model.diffusion_model.*      UNet: time_embed, input_blocks.N.M, middle_block.M, output_blocks.N.M, out
    model_ema.*                  the UNet's EMA copy, keys without dots: model_ema.diffusion_modelinput_blocks00weight
    first_stage_model.*          VAE: encoder/decoder .down/.up.N.block.M, mid.block_1/attn_1/block_2, norm_out ...
    cond_stage_model.transformer.*   CLIP text model (usually with a `text_model.` prefix)

The key mapping is a table of module-prefix pairs (diffusers prefix, LDM prefix) generated from the diffusers
configs; a key maps by its longest prefix in the table, so one table serves both directions. Tensors are never
changed except the VAE's attention projections, which LDM stores as 1x1 convolutions and diffusers as Linear.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from x2x_jax.convert import diffusers as dconv
from x2x_jax.convert.params import read_pickle, read_safetensors
from x2x_jax.errors import ConfigError, WeightsError

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
CLIP_INNER_PREFIX = "text_model."

# Non-parameter entries of LatentDiffusion state dicts that we drop: the DDPM schedule buffers (the scheduler
# config carries the schedule), EMA bookkeeping, the VAE's training loss (LPIPS / discriminator) and CLIP's
# position_ids buffer.
_IGNORED_EXACT = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
        "scale_factor",
        "model_ema.decay",
        "model_ema.num_updates",
    }
)
_IGNORED_PREFIXES = ("first_stage_model.loss.",)


# ---------------------------------------------------------------------------------------------------------------
# The prefix table


@dataclass
class KeyMap:
    """Module-prefix pairs diffusers <-> LDM; `reshape` marks 1x1-conv (LDM) <-> Linear (diffusers) weights."""

    name: str
    pairs: list[tuple[str, str, bool]] = field(default_factory=list)

    def add(self, diffusers_prefix: str, ldm_prefix: str, reshape: bool = False) -> None:
        self.pairs.append((diffusers_prefix, ldm_prefix, reshape))

    def _index(self, side: int) -> dict[str, tuple[str, bool]]:
        return {p[side]: (p[1 - side], p[2]) for p in self.pairs}

    @staticmethod
    def _map(key: str, index: Mapping[str, tuple[str, bool]]) -> tuple[str, bool] | None:
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            hit = index.get(".".join(parts[:n]))
            if hit is not None:
                return ".".join([hit[0], *parts[n:]]), hit[1] and parts[-1] == "weight"
        return None

    def to_diffusers(self, ldm_state: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
        index, out, unknown = self._index(1), {}, []
        for k, v in ldm_state.items():
            hit = self._map(k, index)
            if hit is None:
                unknown.append(k)
                continue
            key, reshape = hit
            out[key] = v.reshape(v.shape[:2]) if reshape and v.ndim == 4 and v.shape[2:] == (1, 1) else v
        if unknown:
            raise WeightsError(f"{source}: {self.name} tensors with no diffusers counterpart: {_fmt(sorted(unknown))}")
        return out

    def to_ldm(self, state: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
        index, out, unknown = self._index(0), {}, []
        for k, v in state.items():
            hit = self._map(k, index)
            if hit is None:
                unknown.append(k)
                continue
            key, reshape = hit
            out[key] = v.reshape(v.shape + (1, 1)) if reshape and v.ndim == 2 else v
        if unknown:
            raise WeightsError(f"{source}: {self.name} tensors with no LDM counterpart: {_fmt(sorted(unknown))}")
        return out


def _fmt(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _per_block(config: Mapping[str, Any], key: str, n: int) -> list[int]:
    value = config[key]
    values = [int(value)] * n if isinstance(value, int) else [int(v) for v in value]
    if len(values) != n:
        raise ConfigError(f"{key}={value!r} must be an int or one value per block ({n} blocks)")
    return values


def _require(config: Mapping[str, Any], what: str, **allowed: Any) -> None:
    """Options that change the set of weights beyond what the SD 1.x LDM layout has."""
    for key, default in allowed.items():
        if config.get(key, default) != default:
            raise ConfigError(f"{what} config: {key}={config[key]!r} has no LDM single-file layout here")


def _unet_resnet(km: KeyMap, d: str, l: str) -> None:
    for dn, ln in [
        ("norm1", "in_layers.0"),
        ("conv1", "in_layers.2"),
        ("time_emb_proj", "emb_layers.1"),
        ("norm2", "out_layers.0"),
        ("conv2", "out_layers.3"),
        ("conv_shortcut", "skip_connection"),
    ]:
        km.add(f"{d}.{dn}", f"{l}.{ln}")


def unet_key_map(config: Mapping[str, Any]) -> KeyMap:
    """The diffusers <-> LDM prefix table of a `UNet2DConditionModel` config (SD 1.x family)."""
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    n = len(down)
    if len(up) != n:
        raise ConfigError(f"unet config: {n} down_block_types but {len(up)} up_block_types")
    attn_down = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    attn_up = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
    for t in down:
        if t not in attn_down:
            raise ConfigError(f"unet config: down block type {t!r} is not supported (use {sorted(attn_down)})")
    for t in up:
        if t not in attn_up:
            raise ConfigError(f"unet config: up block type {t!r} is not supported (use {sorted(attn_up)})")
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid != "UNetMidBlock2DCrossAttn":
        raise ConfigError(f"unet config: mid block type {mid!r} is not supported (use 'UNetMidBlock2DCrossAttn')")
    _require(
        config,
        "unet",
        class_embed_type=None,
        addition_embed_type=None,
        encoder_hid_dim_type=None,
        time_cond_proj_dim=None,
        num_class_embeds=None,
        conv_in_kernel=3,
        conv_out_kernel=3,
        time_embedding_type="positional",
    )
    layers = _per_block(config, "layers_per_block", n)

    km = KeyMap("unet")
    km.add("time_embedding.linear_1", "time_embed.0")
    km.add("time_embedding.linear_2", "time_embed.2")
    km.add("conv_in", "input_blocks.0.0")
    k = 1
    for i, t in enumerate(down):
        for j in range(layers[i]):
            _unet_resnet(km, f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0")
            if attn_down[t]:
                km.add(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1")
            k += 1
        if i < n - 1:
            km.add(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{k}.0.op")
            k += 1

    _unet_resnet(km, "mid_block.resnets.0", "middle_block.0")
    km.add("mid_block.attentions.0", "middle_block.1")
    _unet_resnet(km, "mid_block.resnets.1", "middle_block.2")

    # diffusers' up_blocks and LDM's output_blocks both run deepest first; each up block has one resnet more
    # than its down block, and its upsampler sits in the block's last output_block, after the attention if any.
    up_layers = layers[::-1]
    k = 0
    for i, t in enumerate(up):
        for j in range(up_layers[i] + 1):
            _unet_resnet(km, f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0")
            if attn_up[t]:
                km.add(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{k}.1")
            if j == up_layers[i] and i < n - 1:
                km.add(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{k}.{2 if attn_up[t] else 1}.conv")
            k += 1

    km.add("conv_norm_out", "out.0")
    km.add("conv_out", "out.2")
    return km


def _vae_resnet(km: KeyMap, d: str, l: str) -> None:
    for name in ("norm1", "conv1", "norm2", "conv2"):
        km.add(f"{d}.{name}", f"{l}.{name}")
    km.add(f"{d}.conv_shortcut", f"{l}.nin_shortcut")


def _vae_mid(km: KeyMap, d: str, l: str) -> None:
    _vae_resnet(km, f"{d}.mid_block.resnets.0", f"{l}.mid.block_1")
    _vae_resnet(km, f"{d}.mid_block.resnets.1", f"{l}.mid.block_2")
    a, b = f"{d}.mid_block.attentions.0", f"{l}.mid.attn_1"
    km.add(f"{a}.group_norm", f"{b}.norm")
    for dn, ln in [("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]:
        km.add(f"{a}.{dn}", f"{b}.{ln}", reshape=True)


def vae_key_map(config: Mapping[str, Any]) -> KeyMap:
    """The diffusers <-> LDM prefix table of an `AutoencoderKL` config."""
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    n = len(down)
    for t in down:
        if t != "DownEncoderBlock2D":
            raise ConfigError(f"vae config: down block type {t!r} is not supported (use 'DownEncoderBlock2D')")
    for t in up:
        if t != "UpDecoderBlock2D":
            raise ConfigError(f"vae config: up block type {t!r} is not supported (use 'UpDecoderBlock2D')")
    if len(up) != n:
        raise ConfigError(f"vae config: {n} down_block_types but {len(up)} up_block_types")
    _require(config, "vae", mid_block_add_attention=True, use_quant_conv=True, use_post_quant_conv=True)
    layers = int(config.get("layers_per_block", 1))

    km = KeyMap("vae")
    for part in ("encoder", "decoder"):
        km.add(f"{part}.conv_in", f"{part}.conv_in")
        km.add(f"{part}.conv_norm_out", f"{part}.norm_out")
        km.add(f"{part}.conv_out", f"{part}.conv_out")
        _vae_mid(km, part, part)
    for i in range(n):
        for j in range(layers):
            _vae_resnet(km, f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
        if i < n - 1:
            km.add(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")
    # The classic trap: LDM numbers decoder levels by resolution (up.0 = full size, built last), diffusers by
    # execution order (up_blocks.0 = deepest). Decoder levels have one resnet more than encoder levels.
    for i in range(n):
        level = n - 1 - i
        for j in range(layers + 1):
            _vae_resnet(km, f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}")
        if i < n - 1:
            km.add(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv")
    km.add("quant_conv", "quant_conv")
    km.add("post_quant_conv", "post_quant_conv")
    return km


# ---------------------------------------------------------------------------------------------------------------
# Whole checkpoints


def ema_key(unet_ldm_key: str) -> str:
    """`input_blocks.0.0.weight` -> `model_ema.diffusion_modelinput_blocks00weight` (LitEma drops the dots)."""
    return EMA_PREFIX + ("diffusion_model." + unet_ldm_key).replace(".", "")


def split_ldm_state(
    state: Mapping[str, np.ndarray], *, use_ema: bool = False, source: str = "checkpoint"
) -> dict[str, dict[str, np.ndarray]]:
    """Split a LatentDiffusion state dict into LDM-keyed {"unet", "vae", "text_encoder"} dicts (prefixes removed).

    With `use_ema`, every UNet tensor is taken from its `model_ema.*` copy instead. Unknown top-level keys and
    components that are absent raise WeightsError.
    """
    parts: dict[str, dict[str, np.ndarray]] = {"unet": {}, "vae": {}, "text_encoder": {}}
    ema: dict[str, np.ndarray] = {}
    unknown = []
    for k, v in state.items():
        if k in _IGNORED_EXACT or k.startswith(_IGNORED_PREFIXES):
            continue
        if k.startswith(UNET_PREFIX):
            parts["unet"][k[len(UNET_PREFIX) :]] = v
        elif k.startswith(EMA_PREFIX):
            ema[k] = v
        elif k.startswith(VAE_PREFIX):
            parts["vae"][k[len(VAE_PREFIX) :]] = v
        elif k.startswith(TEXT_PREFIX):
            sub = k[len(TEXT_PREFIX) :]
            sub = sub[len(CLIP_INNER_PREFIX) :] if sub.startswith(CLIP_INNER_PREFIX) else sub
            if not sub.endswith("position_ids"):
                parts["text_encoder"][sub] = v
        else:
            unknown.append(k)
    if unknown:
        raise WeightsError(f"{source}: unknown top-level tensors {_fmt(sorted(unknown))}")
    for name, prefix in [("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("text_encoder", TEXT_PREFIX)]:
        if not parts[name]:
            raise WeightsError(f"{source}: no {name} tensors (nothing under {prefix}*)")
    if use_ema:
        if not ema:
            raise WeightsError(f"{source}: no model_ema.* tensors; load without use_ema (--use-ema)")
        missing = sorted(k for k in parts["unet"] if ema_key(k) not in ema)
        if missing:
            raise WeightsError(f"{source}: EMA copies missing for UNet tensors {_fmt(missing)}")
        extra = sorted(set(ema) - {ema_key(k) for k in parts["unet"]})
        if extra:
            raise WeightsError(f"{source}: EMA tensors with no UNet counterpart {_fmt(extra)}")
        parts["unet"] = {k: ema[ema_key(k)] for k in parts["unet"]}
    return parts


def ldm_to_diffusers(
    state: Mapping[str, np.ndarray],
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    *,
    use_ema: bool = False,
    source: str = "checkpoint",
) -> dict[str, dict[str, np.ndarray]]:
    """A LatentDiffusion state dict -> diffusers-keyed {"unet", "vae", "text_encoder"} state dicts.

    The text encoder's keys come without the `text_model.` prefix (transformers 5's layout, and our param paths).
    """
    parts = split_ldm_state(state, use_ema=use_ema, source=source)
    return {
        "unet": unet_key_map(unet_config).to_diffusers(parts["unet"], source),
        "vae": vae_key_map(vae_config).to_diffusers(parts["vae"], source),
        "text_encoder": parts["text_encoder"],
    }


def ldm_state_from_diffusers(
    unet_state: Mapping[str, np.ndarray],
    vae_state: Mapping[str, np.ndarray],
    text_state: Mapping[str, np.ndarray],
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    *,
    unet_ema_state: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The inverse: diffusers-keyed state dicts -> one LatentDiffusion state dict (SD 1.x key layout).

    The text encoder is written under `cond_stage_model.transformer.text_model.*` whichever prefix it came with.
    With `unet_ema_state`, its tensors are added as `model_ema.*` (dots removed), as LitEma stores them.
    """
    out: dict[str, np.ndarray] = {}
    unet_map = unet_key_map(unet_config)
    out.update({UNET_PREFIX + k: v for k, v in unet_map.to_ldm(unet_state, "unet").items()})
    if unet_ema_state is not None:
        out.update({ema_key(k): v for k, v in unet_map.to_ldm(unet_ema_state, "unet EMA").items()})
    out.update({VAE_PREFIX + k: v for k, v in vae_key_map(vae_config).to_ldm(vae_state, "vae").items()})
    for k, v in text_state.items():
        if k.endswith("position_ids"):
            continue
        k = k[len(CLIP_INNER_PREFIX) :] if k.startswith(CLIP_INNER_PREFIX) else k
        out[TEXT_PREFIX + CLIP_INNER_PREFIX + k] = v
    return out


def read_ldm_file(path: str | Path, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """A single-file checkpoint as a flat numpy dict: `.safetensors` directly, anything else as a torch pickle."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return read_pickle(path, allow_pickle)


def load_ldm_states(
    path: str | Path,
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    *,
    allow_pickle: bool = False,
    use_ema: bool = False,
) -> dict[str, dict[str, np.ndarray]]:
    """Read a single-file checkpoint into diffusers-keyed {"unet", "vae", "text_encoder"} state dicts."""
    state = read_ldm_file(path, allow_pickle=allow_pickle)
    return ldm_to_diffusers(state, unet_config, vae_config, use_ema=use_ema, source=str(path))


def load_ldm_checkpoint(
    path: str | Path,
    unet_config: Mapping[str, Any] | None = None,
    vae_config: Mapping[str, Any] | None = None,
    text_config: Mapping[str, Any] | None = None,
    *,
    allow_pickle: bool = False,
    use_ema: bool = False,
    tokenizer: Any = None,
    scheduler_config: Mapping[str, Any] | None = None,
):
    """A single-file checkpoint -> our `Pipeline` (modules built from the configs, params checked against them).

    Configs left None default to SD 1.5 / InstructPix2Pix's (`sd15_ip2p_configs`); the default UNet config takes
    `in_channels` from the checkpoint's first convolution, so SD 1.x (4) and InstructPix2Pix (8) files both load.
    The tokenizer defaults to the built-in CLIP BPE tokenizer and the scheduler to SD's DDIM config, since the
    checkpoint carries neither.
    """
    state = read_ldm_file(path, allow_pickle=allow_pickle)
    defaults = sd15_ip2p_configs()
    if unet_config is None:
        conv_in = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
        if conv_in is not None and conv_in.ndim == 4:
            defaults["unet"]["in_channels"] = int(conv_in.shape[1])
    configs = {
        "unet": dict(unet_config or defaults["unet"]),
        "vae": dict(vae_config or defaults["vae"]),
        "text_encoder": dict(text_config or defaults["text_encoder"]),
    }
    states = ldm_to_diffusers(state, configs["unet"], configs["vae"], use_ema=use_ema, source=str(path))
    try:
        return dconv.pipeline_from_states(states, configs, tokenizer=tokenizer, scheduler_config=scheduler_config)
    except WeightsError as e:
        raise WeightsError(f"{path}: {e}") from e


def sd15_ip2p_configs() -> dict[str, dict[str, Any]]:
    """The diffusers/transformers configs of InstructPix2Pix (SD 1.5 with an 8-channel UNet input)."""
    unet = {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 8,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    }
    vae = {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 512,
        "scaling_factor": 0.18215,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }
    text = {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "hidden_act": "quick_gelu",
        "hidden_size": 768,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "projection_dim": 768,
        "vocab_size": 49408,
    }
    return {"unet": unet, "vae": vae, "text_encoder": text}
