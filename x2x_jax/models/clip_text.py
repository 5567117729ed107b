"""CLIP text transformer (the SD 1.x text encoder) in Flax Linen, equivalent to `transformers.CLIPTextModel`.

Parameter paths mirror transformers' module names (`encoder.layers.0.mlp.fc1.weight` ->
`encoder/layers_0/mlp/fc1/kernel`), so converting a checkpoint is a generic rename + transpose.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from x2x_jax.errors import ConfigError
from x2x_jax.models.layers import rematted

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


class CLIPTextOutput(NamedTuple):
    last_hidden_state: jnp.ndarray  # (B, T, D), after final_layer_norm
    pooled_output: jnp.ndarray  # (B, D), the hidden state at each sequence's end token


class CLIPAttention(nn.Module):
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        head_dim = d // self.num_heads

        def proj(name):
            return nn.Dense(d, dtype=self.dtype, name=name)

        q, k, v = (proj(n)(x).reshape(b, t, self.num_heads, head_dim) for n in ("q_proj", "k_proj", "v_proj"))
        out = jax.nn.dot_product_attention(q, k, v, scale=head_dim**-0.5, is_causal=True)
        return proj("out_proj")(out.reshape(b, t, d))


class CLIPMLP(nn.Module):
    intermediate_size: int
    hidden_act: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x)
        h = ACTIVATIONS[self.hidden_act](h)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    num_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="layer_norm1")(x)
        x = x + CLIPAttention(self.num_heads, dtype=self.dtype, name="self_attn")(h)
        h = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="layer_norm2")(x)
        return x + CLIPMLP(self.intermediate_size, self.hidden_act, dtype=self.dtype, name="mlp")(h)


class CLIPTextEmbeddings(nn.Module):
    vocab_size: int
    hidden_size: int
    max_position_embeddings: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        tok = nn.Embed(self.vocab_size, self.hidden_size, dtype=self.dtype, name="token_embedding")
        pos = nn.Embed(self.max_position_embeddings, self.hidden_size, dtype=self.dtype, name="position_embedding")
        return tok(input_ids) + pos(jnp.arange(input_ids.shape[-1]))[None]


class CLIPEncoder(nn.Module):
    num_hidden_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    dtype: Any = jnp.float32
    remat: bool | str = False

    @nn.compact
    def __call__(self, x):
        layer_cls = rematted(CLIPEncoderLayer, self.remat)
        for i in range(self.num_hidden_layers):
            x = layer_cls(
                self.num_heads,
                self.intermediate_size,
                self.hidden_act,
                self.layer_norm_eps,
                dtype=self.dtype,
                name=f"layers_{i}",
            )(x)
        return x


class CLIPTextModel(nn.Module):
    """`__call__(input_ids (B, T) int32) -> CLIPTextOutput`; causal self-attention, no padding mask (as SD uses it).

    Defaults are the SD 1.x text encoder (openai/clip-vit-large-patch14, `eos_token_id` 2 as in its config).
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768  # unused here; kept so the config round-trips
    bos_token_id: int = 0
    eos_token_id: int = 2
    pad_token_id: int = 1
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32
    remat: bool | str = False

    @nn.compact
    def __call__(self, input_ids: jnp.ndarray) -> CLIPTextOutput:
        x = CLIPTextEmbeddings(
            self.vocab_size, self.hidden_size, self.max_position_embeddings, dtype=self.dtype, name="embeddings"
        )(input_ids)
        x = CLIPEncoder(
            self.num_hidden_layers,
            self.num_attention_heads,
            self.intermediate_size,
            self.hidden_act,
            self.layer_norm_eps,
            dtype=self.dtype,
            remat=self.remat,
            name="encoder",
        )(x)
        x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(x)

        if self.eos_token_id == 2:
            # Legacy configs (SD 1.x) carry the wrong eos id 2; transformers then pools at the largest token id,
            # which is the end token of the original vocabulary.
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:
            eos_pos = jnp.argmax(input_ids == self.eos_token_id, axis=-1)  # first end token (pad may equal eos)
        pooled = jnp.take_along_axis(x, eos_pos[:, None, None], axis=1)[:, 0]
        return CLIPTextOutput(last_hidden_state=x, pooled_output=pooled)


# transformers.CLIPTextConfig defaults, used for keys a config.json leaves out.
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "pad_token_id": 1,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}
_INT_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
)


def clip_text_from_config(config: Mapping[str, Any], *, dtype: Any = jnp.float32, remat: bool = False) -> CLIPTextModel:
    """The model described by a transformers `text_encoder/config.json` dict (or a full CLIPConfig's text part).

    Dropout settings are ignored: this module is the inference-time (eval-mode) network.
    """
    if config.get("model_type") == "clip" and "text_config" in config:
        config = config["text_config"] or {}
    model_type = config.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
        raise ConfigError(
            f"text encoder config: model_type={model_type!r} is not supported (expected 'clip_text_model')"
        )
    cfg = {**_HF_DEFAULTS, **{k: v for k, v in config.items() if k in _HF_DEFAULTS}}
    for key in _INT_KEYS:
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise ConfigError(f"text encoder config: {key}={cfg[key]!r} must be a positive integer")
    if cfg["hidden_act"] not in ACTIVATIONS:
        raise ConfigError(
            f"text encoder config: hidden_act={cfg['hidden_act']!r} is not supported "
            f"(supported: {', '.join(ACTIVATIONS)})"
        )
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ConfigError(
            f"text encoder config: hidden_size={cfg['hidden_size']} is not a multiple of "
            f"num_attention_heads={cfg['num_attention_heads']}"
        )
    if not isinstance(cfg["eos_token_id"], int):
        raise ConfigError(f"text encoder config: eos_token_id={cfg['eos_token_id']!r} must be a single integer")
    if cfg["projection_dim"] is None:
        cfg["projection_dim"] = cfg["hidden_size"]
    cfg["layer_norm_eps"] = float(cfg["layer_norm_eps"])
    return CLIPTextModel(**cfg, dtype=dtype, remat=remat)


def clip_text_to_config(model: CLIPTextModel) -> dict[str, Any]:
    """A `text_encoder/config.json` dict that `transformers.CLIPTextModel.from_pretrained` accepts."""
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        **{key: getattr(model, key) for key in _HF_DEFAULTS},
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "dtype": "float32",
    }
