"""diffusers pipeline directories <-> our Flax modules and param trees.

Layout read and written (that of `StableDiffusionInstructPix2PixPipeline.save_pretrained`):

    model_index.json
    unet/config.json          unet/diffusion_pytorch_model.safetensors   (or shards + .safetensors.index.json)
    vae/config.json           vae/diffusion_pytorch_model.safetensors
    text_encoder/config.json  text_encoder/model.safetensors              (transformers layout)
    tokenizer/...             scheduler/scheduler_config.json

Weights are read with safetensors' numpy API, so this path needs no torch; pickled `.bin` files are read only
when the caller allows pickles (then through `torch.load(weights_only=True)`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from x2x_jax.convert.params import (
    flatten,
    flax_to_torch_state,
    read_index,
    read_pickle,
    read_safetensors,
    read_sharded_safetensors,
    torch_state_to_flax,
    unflatten,
    write_state,
)
from x2x_jax.diffusion.ddim import scheduler_config as default_scheduler_config
from x2x_jax.errors import ConfigError, WeightsError
from x2x_jax.models.clip_text import clip_text_from_config, clip_text_to_config
from x2x_jax.models.configs import DIFFUSERS_VERSION
from x2x_jax.models.tokenizer import load_tokenizer, save_tokenizer
from x2x_jax.models.unet import unet_from_config, unet_to_config
from x2x_jax.models.vae import vae_from_config, vae_to_config

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
MODELS = ("unet", "vae", "text_encoder")
PIPELINE_CLASS = "StableDiffusionInstructPix2PixPipeline"

# component -> (library, class name, weights file stem)
_LAYOUT = {
    "unet": ("diffusers", "UNet2DConditionModel", "diffusion_pytorch_model"),
    "vae": ("diffusers", "AutoencoderKL", "diffusion_pytorch_model"),
    "text_encoder": ("transformers", "CLIPTextModel", "model"),
}


@dataclass
class Pipeline:
    """Our modules with their params (Flax trees of numpy arrays), tokenizer and scheduler config.

    Components that were not loaded stay None.
    """

    unet: Any = None
    unet_params: Any = None
    vae: Any = None
    vae_params: Any = None
    text_encoder: Any = None
    text_params: Any = None
    tokenizer: Any = None
    scheduler_config: dict[str, Any] | None = None

    def model(self, component: str) -> tuple[Any, Any]:
        return getattr(self, component), getattr(self, _params_field(component))


def _params_field(component: str) -> str:
    return {"unet": "unet_params", "vae": "vae_params", "text_encoder": "text_params"}[component]


# ---------------------------------------------------------------------------------------------------------------
# Our modules: config <-> module, and the abstract param tree the conversion table is derived from


def model_from_config(component: str, config: Mapping[str, Any]) -> Any:
    if component == "unet":
        return unet_from_config(config)
    if component == "vae":
        return vae_from_config(config)
    if component == "text_encoder":
        return clip_text_from_config(config)
    raise ValueError(f"not a model component: {component!r}")


def model_to_config(component: str, model: Any) -> dict[str, Any]:
    if component == "unet":
        config = unet_to_config(model)
    elif component == "vae":
        config = vae_to_config(model)
    elif component == "text_encoder":
        config = clip_text_to_config(model)
    else:
        raise ValueError(f"not a model component: {component!r}")
    library, class_name, _ = _LAYOUT[component]
    if library == "diffusers":
        config = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **config}
    return config


def abstract_params(component: str, model: Any) -> Any:
    """The model's param tree as ShapeDtypeStructs (no weights are initialised)."""
    key = jax.random.key(0)
    if component == "text_encoder":
        return jax.eval_shape(model.init, key, jnp.zeros((1, 1), jnp.int32))["params"]
    if component == "unet":
        size = 2 ** (len(model.block_out_channels) - 1)
        sample = jnp.zeros((1, size, size, model.in_channels), jnp.float32)
        context = jnp.zeros((1, 1, model.cross_attention_dim), jnp.float32)
        return jax.eval_shape(model.init, key, sample, jnp.zeros((1,), jnp.int32), context)["params"]
    if component == "vae":
        size = 2 ** (len(model.block_out_channels) - 1)
        return jax.eval_shape(model.init, key, jnp.zeros((1, size, size, model.in_channels), jnp.float32))["params"]
    raise ValueError(f"not a model component: {component!r}")


# ---------------------------------------------------------------------------------------------------------------
# Reading


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise WeightsError(f"{path}: {what} not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: {what} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: {what} is not a JSON object")
    return data


def _variant_name(name: str, variant: str | None) -> str:
    """diffusers' naming: `x.safetensors` -> `x.fp16.safetensors`, `x.index.json` -> `x.index.fp16.json`."""
    if variant is None:
        return name
    head, tail = name.rsplit(".", 1)
    return f"{head}.{variant}.{tail}"


def read_component_state(
    folder: str | Path, stem: str, *, allow_pickle: bool = False, variant: str | None = None
) -> dict[str, np.ndarray]:
    """The state dict of one component folder, from whichever of these exists (first wins):

    `<stem>.safetensors`, `<stem>.safetensors.index.json` (+ shards), `<stem>.bin`, `<stem>.bin.index.json`,
    each with `variant` spliced in (`<stem>.fp16.safetensors`) when one is asked for.
    """
    folder = Path(folder)
    single = folder / _variant_name(f"{stem}.safetensors", variant)
    index = folder / _variant_name(f"{stem}.safetensors.index.json", variant)
    pickled = folder / _variant_name(f"{stem}.bin", variant)
    pickled_index = folder / _variant_name(f"{stem}.bin.index.json", variant)
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        return read_sharded_safetensors(index)
    if pickled.is_file():
        return read_pickle(pickled, allow_pickle)
    if pickled_index.is_file():
        return _read_sharded_pickle(pickled_index, allow_pickle)
    hint = ""
    others = sorted(p.name for p in folder.glob(f"{stem}*")) if folder.is_dir() else []
    if others:
        hint = f"; found {', '.join(others)}" + ("" if variant else " (a variant? pass variant=...)")
    raise WeightsError(f"{folder}: no weights file {single.name} or {index.name}{hint}")


def _read_sharded_pickle(index_path: Path, allow_pickle: bool) -> dict[str, np.ndarray]:
    weight_map = read_index(index_path)
    state: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        path = index_path.parent / shard
        if not path.is_file():
            raise WeightsError(f"{index_path}: shard {path} is missing")
        state.update(read_pickle(path, allow_pickle))
    return state


def _normalise_text_state(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers < 5 wrote CLIPTextModel keys as `text_model.*`; our paths (and transformers 5) have no prefix."""
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def params_from_state(
    component: str, model: Any, state: Mapping[str, np.ndarray], *, dtype: Any = None
) -> dict[str, Any]:
    """A torch-layout state dict -> `model`'s param tree, checked against the model's shapes."""
    if component == "text_encoder":
        state = _normalise_text_state(state)
    return torch_state_to_flax(state, abstract_params(component, model), name=component, dtype=dtype)


def load_component(
    folder: str | Path, component: str, *, allow_pickle: bool = False, variant: str | None = None, dtype: Any = None
) -> tuple[Any, dict[str, Any]]:
    """(module, params) of one model folder (`<pipeline>/unet`, `.../vae`, `.../text_encoder`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: {component} folder not found")
    config = read_json(folder / "config.json", f"{component} config")
    try:
        model = model_from_config(component, config)
    except ConfigError as e:
        raise ConfigError(f"{folder / 'config.json'}: {e}") from e
    state = read_component_state(folder, _LAYOUT[component][2], allow_pickle=allow_pickle, variant=variant)
    try:
        params = params_from_state(component, model, state, dtype=dtype)
    except WeightsError as e:
        raise WeightsError(f"{folder}: {e}") from e
    return model, params


def load_unet(folder: str | Path, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    return load_component(folder, "unet", **kwargs)


def load_vae(folder: str | Path, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    return load_component(folder, "vae", **kwargs)


def load_text_encoder(folder: str | Path, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    return load_component(folder, "text_encoder", **kwargs)


def load_pipeline(
    path: str | Path,
    allow_pickle: bool = False,
    components: Sequence[str] = COMPONENTS,
    *,
    variant: str | None = None,
    dtype: Any = None,
) -> Pipeline:
    """A diffusers pipeline directory -> `Pipeline` with the asked components (others stay None)."""
    root = Path(path)
    if not root.is_dir():
        raise WeightsError(f"{root}: pipeline directory not found")
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise ConfigError(f"unknown pipeline components {unknown} (known: {', '.join(COMPONENTS)})")
    index = read_json(root / "model_index.json", "model_index.json")
    for c in components:
        entry = index.get(c)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
            raise WeightsError(f"{root / 'model_index.json'}: no {c!r} component")
        if c in _LAYOUT and entry[1] != _LAYOUT[c][1]:
            raise WeightsError(
                f"{root / 'model_index.json'}: {c} is a {entry[1]}; only {_LAYOUT[c][1]} can be converted"
            )
        if not (root / c).is_dir() and c != "tokenizer":  # no tokenizer/: SD 1.x CLIP's, from its BPE file
            raise WeightsError(f"{root / c}: {c} folder not found")

    pipe = Pipeline()
    for c in MODELS:
        if c in components:
            model, params = load_component(root / c, c, allow_pickle=allow_pickle, variant=variant, dtype=dtype)
            pipe = replace(pipe, **{c: model, _params_field(c): params})
    if "tokenizer" in components:
        pipe.tokenizer = load_tokenizer(root)
    if "scheduler" in components:
        pipe.scheduler_config = read_json(root / "scheduler" / "scheduler_config.json", "scheduler config")
    return pipe


def pipeline_from_states(
    states: Mapping[str, Mapping[str, np.ndarray]],
    configs: Mapping[str, Mapping[str, Any]],
    *,
    tokenizer: Any = None,
    scheduler_config: Mapping[str, Any] | None = None,
    dtype: Any = None,
) -> Pipeline:
    """`Pipeline` from diffusers-keyed state dicts + configs (the LDM path); tokenizer/scheduler default to SD's."""
    pipe = Pipeline()
    for c in MODELS:
        if c in states:
            model = model_from_config(c, configs[c])
            pipe = replace(pipe, **{c: model, _params_field(c): params_from_state(c, model, states[c], dtype=dtype)})
    if tokenizer is None:
        tokenizer = load_tokenizer()
    if scheduler_config is None:
        scheduler_config = default_scheduler_config()
    pipe.tokenizer, pipe.scheduler_config = tokenizer, dict(scheduler_config)
    return pipe


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _torch_dtype_name(params: Any) -> str:
    """The float dtype most of the params have, as torch spells it ("float32" when there are none)."""
    counts: dict[str, int] = {}
    for leaf in flatten(params).values():
        name = np.dtype(leaf.dtype).name
        if name in ("float32", "float16", "bfloat16", "float64"):
            counts[name] = counts.get(name, 0) + int(np.prod(leaf.shape))
    return max(counts, key=counts.get) if counts else "float32"


def save_component(
    dst: str | Path, component: str, model: Any, params: Any, *, max_shard_size: int | str | None = None
) -> Path:
    """Write `dst/config.json` + weights (safetensors, sharded above `max_shard_size`) for one model."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    config = model_to_config(component, model)
    if _LAYOUT[component][0] == "transformers":
        config["dtype"] = _torch_dtype_name(params)
    state = flax_to_torch_state(params)
    # Check the params against the module before writing anything a reader would then reject.
    torch_state_to_flax(state, abstract_params(component, model), name=component)
    _write_json(dst / "config.json", config)
    write_state(dst, _LAYOUT[component][2], state, max_shard_size)
    return dst


def save_unet(dst: str | Path, model: Any, params: Any, **kwargs: Any) -> Path:
    return save_component(dst, "unet", model, params, **kwargs)


def save_vae(dst: str | Path, model: Any, params: Any, **kwargs: Any) -> Path:
    return save_component(dst, "vae", model, params, **kwargs)


def save_text_encoder(dst: str | Path, model: Any, params: Any, **kwargs: Any) -> Path:
    return save_component(dst, "text_encoder", model, params, **kwargs)


def model_index(scheduler_class: str = "DDIMScheduler") -> dict[str, Any]:
    """`model_index.json` of an InstructPix2Pix pipeline without safety checker."""
    return {
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def save_pipeline(dst: str | Path, pipe: Pipeline, *, max_shard_size: int | str | None = None) -> Path:
    """Write a complete diffusers directory that `StableDiffusionInstructPix2PixPipeline.from_pretrained` loads.

    Every component must be present; the scheduler config defaults to SD's DDIM one when None.
    """
    dst = Path(dst)
    missing = [c for c in MODELS if getattr(pipe, c) is None or getattr(pipe, _params_field(c)) is None]
    if pipe.tokenizer is None:
        missing.append("tokenizer")
    if missing:
        raise ConfigError(f"cannot save an incomplete pipeline: {', '.join(missing)} missing")
    scheduler = pipe.scheduler_config
    if scheduler is None:
        scheduler = default_scheduler_config()
    scheduler_class = scheduler.get("_class_name", "DDIMScheduler")
    if not re.fullmatch(r"[A-Za-z0-9]+Scheduler", str(scheduler_class)):
        raise ConfigError(f"scheduler config: _class_name={scheduler_class!r} is not a diffusers scheduler")

    dst.mkdir(parents=True, exist_ok=True)
    for c in MODELS:
        model, params = pipe.model(c)
        save_component(dst / c, c, model, params, max_shard_size=max_shard_size)

    save_tokenizer(pipe.tokenizer, dst)  # writes dst/tokenizer/
    (dst / "scheduler").mkdir(exist_ok=True)
    _write_json(dst / "scheduler" / "scheduler_config.json", {"_class_name": scheduler_class, **scheduler})
    _write_json(dst / "model_index.json", model_index(scheduler_class))
    return dst


# ---------------------------------------------------------------------------------------------------------------
# SD 1.5 (4 input channels) -> InstructPix2Pix (8: noisy latent + image latent)


def expand_unet_in_channels(
    params: Mapping[str, Any], config: Mapping[str, Any], new_in: int = 8
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Widen `conv_in` to `new_in` input channels; the new channels' weights are zero, so the output is unchanged.

    Returns (params, config) copies; the rest of the tree is shared, not copied.
    """
    wrapped = set(params) == {"params"}
    tree = params["params"] if wrapped else params
    kernel = np.asarray(tree["conv_in"]["kernel"])  # HWIO
    old_in = kernel.shape[2]
    if config.get("in_channels", old_in) != old_in:
        raise ConfigError(f"unet config: in_channels={config['in_channels']} but conv_in has {old_in} input channels")
    if new_in < old_in:
        raise ConfigError(f"expand_unet_in_channels: new_in={new_in} is fewer than the current {old_in}")
    wide = np.zeros(kernel.shape[:2] + (new_in,) + kernel.shape[3:], kernel.dtype)
    wide[:, :, :old_in] = kernel
    flat = flatten(tree)
    flat[("conv_in", "kernel")] = wide
    new_tree = unflatten(flat)
    return ({"params": new_tree} if wrapped else new_tree), {**config, "in_channels": new_in}
