import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from tests.oracle import TINY_TEXT
from x2x_jax.errors import ConfigError
from x2x_jax.models.clip_text import CLIPTextModel, clip_text_from_config, clip_text_to_config

# The suite's tiny CLIP (tests/oracle.py) with a 1,000-token vocabulary and its own special-token ids.
TINY = dict(TINY_TEXT, vocab_size=1000, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1)


def flax_path(torch_key):
    """Generic rule: split on '.', merge numeric parts into the previous one with '_'."""
    parts = []
    for p in torch_key.split("."):
        if p.isdigit():
            parts[-1] = f"{parts[-1]}_{p}"
        else:
            parts.append(p)
    return tuple(parts)


def torch_to_flax(state_dict, flax_params):
    """Map every torch tensor onto exactly one flax leaf (`weight` -> kernel (transposed) / scale / embedding)."""
    target = flatten_dict(flax_params)
    out = {}
    for key, tensor in state_dict.items():
        *prefix, last = flax_path(key)
        value = tensor.detach().numpy()
        if last == "bias":
            path = (*prefix, "bias")
        else:
            assert last == "weight", key
            candidates = [(*prefix, leaf) for leaf in ("kernel", "scale", "embedding") if (*prefix, leaf) in target]
            assert len(candidates) == 1, (key, candidates)
            path = candidates[0]
            if path[-1] == "kernel":
                value = value.T
        assert path in target and path not in out, (key, path)
        assert target[path].shape == value.shape, (key, target[path].shape, value.shape)
        out[path] = jnp.asarray(value)
    assert set(out) == set(target), set(target) ^ set(out)
    return unflatten_dict(out)


def torch_model(cfg, seed=0):
    import torch
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModel as HFCLIPTextModel

    torch.manual_seed(seed)
    model = HFCLIPTextModel(CLIPTextConfig(**cfg)).eval()
    with torch.no_grad():  # default init leaves LayerNorms at identity: randomize everything
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def make_ids(cfg, batch=3, seed=0):
    """BOS, random words, one EOS, then padding; the classic CLIP layout with the end token as the largest id."""
    rng = np.random.default_rng(seed)
    eos = cfg["vocab_size"] - 1
    ids = np.full((batch, cfg["max_position_embeddings"]), eos, np.int32)
    for b, n in enumerate(rng.integers(1, cfg["max_position_embeddings"] - 1, size=batch)):
        ids[b, 0] = cfg["vocab_size"] - 2
        ids[b, 1 : n + 1] = rng.integers(3, cfg["vocab_size"] - 2, size=n)
    return ids


def assert_parity(cfg, ids, remat=False):
    import torch

    hf = torch_model(cfg)
    model = clip_text_from_config(cfg, remat=remat)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(ids))["params"]
    params = torch_to_flax(hf.state_dict(), params)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(ids).long())
    out = jax.jit(model.apply)({"params": params}, jnp.asarray(ids))
    diffs = {}
    for name, got, want in [
        ("last_hidden_state", out.last_hidden_state, ref.last_hidden_state),
        ("pooled", out.pooled_output, ref.pooler_output),
    ]:
        want = want.numpy()
        assert got.shape == want.shape
        diff = float(np.abs(np.asarray(got) - want).max())
        assert diff <= 1e-5 * max(1.0, float(np.abs(want).max())), (name, diff)
        diffs[name] = diff
    return diffs


@pytest.mark.oracle
def test_parity_quick_gelu_legacy_eos():
    assert_parity(TINY, make_ids(TINY))


@pytest.mark.oracle
def test_parity_gelu_with_remat():
    cfg = {**TINY, "hidden_act": "gelu"}
    assert_parity(cfg, make_ids(cfg), remat=True)


@pytest.mark.oracle
def test_parity_new_style_eos_pools_first_end_token():
    # A mid-vocabulary end token, also used as padding, with larger ids before it: argmax(ids) would be wrong.
    eos = 500
    cfg = {**TINY, "eos_token_id": eos}
    ids = make_ids(cfg)
    ids[ids == TINY["vocab_size"] - 1] = eos
    ids[:, 1] = 900
    first_eos = (ids == eos).argmax(-1)
    assert (first_eos != ids.argmax(-1)).all()
    assert_parity(cfg, ids)


@pytest.mark.oracle
def test_every_torch_parameter_has_one_flax_leaf():
    hf = torch_model(TINY)
    params = jax.eval_shape(clip_text_from_config(TINY).init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32))
    flat = flatten_dict(params["params"])
    keys = list(hf.state_dict())
    assert not any(k.startswith("text_model.") or "position_ids" in k for k in keys)
    assert len(keys) == len(flat) == 4 + 16 * TINY["num_hidden_layers"]
    assert {flax_path(k)[:-1] for k in keys} == {p[:-1] for p in flat}
    for path in [
        ("embeddings", "token_embedding", "embedding"),
        ("embeddings", "position_embedding", "embedding"),
        ("encoder", "layers_0", "self_attn", "q_proj", "kernel"),
        ("encoder", "layers_1", "self_attn", "out_proj", "bias"),
        ("encoder", "layers_0", "layer_norm1", "scale"),
        ("encoder", "layers_0", "mlp", "fc2", "kernel"),
        ("final_layer_norm", "scale"),
    ]:
        assert path in flat, path
    torch_to_flax(hf.state_dict(), params["params"])  # asserts one-to-one with matching shapes


@pytest.mark.oracle
def test_config_round_trips_through_transformers(tmp_path):
    import torch
    from transformers import CLIPTextConfig
    from transformers import CLIPTextModel as HFCLIPTextModel

    model = clip_text_from_config({**TINY, "hidden_act": "gelu"})
    cfg = clip_text_to_config(model)
    hf_cfg = CLIPTextConfig(**cfg)
    for key in TINY:
        assert getattr(hf_cfg, key) == cfg[key], key
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    HFCLIPTextModel(hf_cfg).save_pretrained(tmp_path)  # writes weights next to our config
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = HFCLIPTextModel.from_pretrained(tmp_path, dtype=torch.float32)
    assert loaded.config.hidden_act == "gelu" and loaded.config.eos_token_id == 2
    assert clip_text_from_config(json.loads((tmp_path / "config.json").read_text())) == model


def test_defaults_are_sd1_text_encoder():
    m = CLIPTextModel()
    assert (m.hidden_size, m.num_hidden_layers, m.num_attention_heads, m.intermediate_size) == (768, 12, 12, 3072)
    assert clip_text_from_config(clip_text_to_config(m)) == m


def test_bf16_compute_keeps_fp32_params():
    model = clip_text_from_config(TINY, dtype=jnp.bfloat16)
    ids = jnp.asarray(make_ids(TINY, batch=1))
    variables = model.init(jax.random.key(0), ids)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
    out = model.apply(variables, ids)
    assert out.last_hidden_state.dtype == jnp.bfloat16 and out.pooled_output.shape == (1, 32)
    assert bool(jnp.isfinite(out.last_hidden_state.astype(jnp.float32)).all())


def test_causal_prefix_unaffected_by_later_tokens():
    model = clip_text_from_config(TINY)
    ids = make_ids(TINY, batch=1)
    variables = model.init(jax.random.key(0), jnp.asarray(ids))
    other = ids.copy()
    other[0, 40:] = 7
    a = model.apply(variables, jnp.asarray(ids)).last_hidden_state
    b = model.apply(variables, jnp.asarray(other)).last_hidden_state
    np.testing.assert_array_equal(a[:, :40], b[:, :40])
    assert not np.allclose(a[:, 40:], b[:, 40:])


@pytest.mark.parametrize(
    "key,value",
    [("hidden_act", "swish"), ("num_attention_heads", 5), ("eos_token_id", [2, 3]), ("model_type", "t5")],
)
def test_unsupported_config_names_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        clip_text_from_config({**TINY, key: value})
