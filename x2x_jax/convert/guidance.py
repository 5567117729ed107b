"""Weight I/O of the learned guidance-map predictor (x2x_jax/models/guidance.py): a folder with config.json
(`_class_name` GuidancePredictor) and diffusion_pytorch_model.safetensors in torch layout, written and read
through the same rename/transpose table as the diffusers components (x2x_jax/convert/params.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from x2x_jax.convert.diffusers import read_component_state, read_json
from x2x_jax.convert.params import flax_to_torch_state, torch_state_to_flax, write_state
from x2x_jax.errors import ConfigError, WeightsError
from x2x_jax.models.guidance import (WEIGHTS_STEM, GuidancePredictor, abstract_params, guidance_from_config,
                                     guidance_to_config)


def save_guidance(dst: str | Path, model: GuidancePredictor, params: Any) -> Path:
    """Write `dst/config.json` + `dst/diffusion_pytorch_model.safetensors` (torch layout)."""
    dst = Path(dst)
    state = flax_to_torch_state(jax.device_get(params))
    torch_state_to_flax(state, abstract_params(model), name="guidance")  # check before writing anything
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(guidance_to_config(model), indent=2, sort_keys=True) + "\n")
    write_state(dst, WEIGHTS_STEM, state, None)
    return dst


def load_guidance(folder: str | Path, dtype: Any = jnp.float32) -> tuple[GuidancePredictor, dict]:
    """(module, params) of a guidance folder written by `save_guidance`."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise WeightsError(f"{folder}: no learned guidance predictor here (no config.json); train one with "
                           "`python train.py --config.stage=guidance` or use --guidance relevance")
    config = read_json(folder / "config.json", "guidance config")
    try:
        model = guidance_from_config(config, dtype=dtype)
    except (ConfigError, TypeError, ValueError) as e:
        raise WeightsError(f"{folder / 'config.json'}: {e}") from e
    state = read_component_state(folder, WEIGHTS_STEM)
    try:
        params = torch_state_to_flax(state, abstract_params(model), name="guidance")
    except WeightsError as e:
        raise WeightsError(f"{folder}: {e}") from e
    return model, params
