"""UNet2DConditionModel: parity with PyTorch diffusers, exact parameter mapping, config I/O."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.oracle import TINY_UNET, assert_close, assert_same_params, flax_shapes, perturbed_torch, torch_to_flax
from x2x_jax.errors import ConfigError
from x2x_jax.models.unet import UNet2DConditionModel, unet_from_config, unet_to_config

# The suite's tiny UNet (tests/oracle.py) without its channel counts, which every parity case sets itself.
TINY_BASE = {**{k: tuple(v) if isinstance(v, list) else v for k, v in TINY_UNET.items()
                if k not in ("in_channels", "out_channels")}, "sample_size": 16}

# (name, config overrides, sample H=W, timesteps)
CASES = [
    # int heads, conv projections, in_channels 4, scalar int timestep
    ("int-heads-conv-proj", dict(in_channels=4, out_channels=4), 16, 500),
    # per-block heads list, linear projections, IP2P's 8 input channels, per-batch float timesteps, 3 levels
    # with a plain down block first and a plain up block last, 2 layers, centred input, sin/cos order and
    # frequency shift flipped, and an 18x18 input that forces diffusers' `upsample_size` path (18 -> 9 -> 5).
    ("list-heads-linear-proj-ip2p",
     dict(in_channels=8, out_channels=4, block_out_channels=(16, 32, 32),
          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
          up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
          layers_per_block=2, attention_head_dim=[2, 4, 8], use_linear_projection=True,
          center_input_sample=True, flip_sin_to_cos=False, freq_shift=1),
     18, np.array([10.0, 999.5], np.float32)),
    # plain mid block, per-block layers, heads that do not divide the width (inner width 30 != 32), gelu,
    # upcast_attention and a mid-block scale factor
    ("plain-mid-uneven-heads",
     dict(in_channels=8, out_channels=3, mid_block_type="UNetMidBlock2D", layers_per_block=[1, 2],
          attention_head_dim=3, act_fn="gelu", upcast_attention=True, mid_block_scale_factor=1.5,
          down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
          up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
     16, np.array([3, 700], np.int32)),
]


def _tiny(overrides):
    cfg = dict(TINY_BASE)
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def torch_threads():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    return torch


@pytest.mark.oracle
@pytest.mark.parametrize("name,overrides,size,timesteps", CASES, ids=[c[0] for c in CASES])
def test_forward_matches_diffusers(torch_threads, name, overrides, size, timesteps):
    torch = torch_threads
    diffusers = pytest.importorskip("diffusers")
    cfg = _tiny(overrides)
    torch.manual_seed(0)
    ref_model = perturbed_torch(diffusers.UNet2DConditionModel(**cfg), seed=1)

    model = unet_from_config(ref_model.config)  # the FrozenDict diffusers stores, `_` keys and all
    params = torch_to_flax(ref_model.state_dict())

    rng = np.random.default_rng(0)
    b = 2
    sample = rng.standard_normal((b, size, size, cfg["in_channels"]), dtype=np.float32)
    context = rng.standard_normal((b, 7, cfg["cross_attention_dim"]), dtype=np.float32)

    init_shapes = jax.eval_shape(model.init, jax.random.key(0), sample, timesteps, context)["params"]
    assert_same_params(init_shapes, ref_model)

    with torch.no_grad():
        t_ref = int(timesteps) if np.ndim(timesteps) == 0 else torch.from_numpy(np.asarray(timesteps))
        ref = ref_model(torch.from_numpy(sample).permute(0, 3, 1, 2), t_ref,
                        encoder_hidden_states=torch.from_numpy(context)).sample
    ref = ref.permute(0, 2, 3, 1).numpy()

    out = jax.jit(model.apply)({"params": params}, sample, timesteps, context)
    assert out.dtype == jnp.float32
    assert_close(out, ref, f"unet[{name}]")


REMAT_CFG = _tiny(dict(layers_per_block=1))
_rng = np.random.default_rng(1)
# 9x9: not a multiple of 2, so the rematted up block also gets a static `upsample_size` (5x5 -> 9x9)
REMAT_SAMPLE = _rng.standard_normal((1, 9, 9, 4), dtype=np.float32)
REMAT_CONTEXT = _rng.standard_normal((1, 3, 32), dtype=np.float32)


def _output_and_grads(model, params):
    apply = lambda p: model.apply(p, REMAT_SAMPLE, 10, REMAT_CONTEXT)  # noqa: E731
    return jax.jit(lambda p: (apply(p), jax.grad(lambda p: jnp.sum(jnp.square(apply(p))))(p)))(params)


@pytest.fixture(scope="module")
def without_remat():
    """The plain UNet's params, output and gradients: what every remat policy must reproduce."""
    plain = UNet2DConditionModel(**REMAT_CFG)
    params = jax.jit(plain.init)(jax.random.key(0), REMAT_SAMPLE, 10, REMAT_CONTEXT)
    return params, *_output_and_grads(plain, params)


@pytest.mark.slow
@pytest.mark.parametrize("policy", [True, "full", "dots"])
def test_remat_same_params_output_and_gradients(policy, without_remat):
    params, a, want = without_remat
    remat = UNet2DConditionModel(**REMAT_CFG, remat=policy)
    assert flax_shapes(jax.eval_shape(remat.init, jax.random.key(0), REMAT_SAMPLE, 10, REMAT_CONTEXT)) == \
        flax_shapes(params)
    b, got = _output_and_grads(remat, params)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6)
    assert float(jnp.max(jnp.abs(a))) > 0
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        w = np.asarray(dict(jax.tree_util.tree_leaves_with_path(want))[path])
        np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=1e-5 * max(1.0, float(np.abs(w).max())),
                                   err_msg=jax.tree_util.keystr(path))

SD15_IP2P = dict(
    in_channels=8,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    sample_size=64,
)


@pytest.mark.oracle
def test_full_size_ip2p_unet_param_count_and_shapes(torch_threads):
    torch = torch_threads
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref_model = diffusers.UNet2DConditionModel(**SD15_IP2P)
    ref_count = sum(p.numel() for p in ref_model.parameters())

    model = unet_from_config(SD15_IP2P)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 64, 64, 8), jnp.float32),
                            jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((1, 77, 768), jnp.float32))
    count = assert_same_params(shapes["params"], ref_model)
    print(f"SD1.5 IP2P UNet parameters: flax {count:,}, diffusers {ref_count:,}")
    assert count == ref_count


# --------------------------------------------------------------------------------------------- config I/O


@pytest.mark.parametrize("key,value", [
    ("class_embed_type", "timestep"),
    ("addition_embed_type", "text"),
    ("time_cond_proj_dim", 256),
    ("num_class_embeds", 10),
    ("transformer_layers_per_block", 2),
    ("cross_attention_norm", "group_norm"),
    ("resnet_time_scale_shift", "scale_shift"),
    ("encoder_hid_dim", 1024),
    ("attention_type", "gated"),
    ("dual_cross_attention", True),
    ("num_attention_heads", 8),
    ("conv_in_kernel", 7),
    ("conv_out_kernel", 1),
    ("time_embedding_type", "fourier"),
    ("only_cross_attention", True),
    ("down_block_types", ["CrossAttnDownBlock2D", "AttnDownBlock2D"]),
    ("up_block_types", ["UpBlock2D", "SimpleCrossAttnUpBlock2D"]),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("act_fn", "softsign"),
    ("cross_attention_dim", [32, 64]),
    ("no_such_key", 1),
])
def test_from_config_rejects_unsupported(key, value):
    cfg = _tiny({})
    cfg[key] = value
    with pytest.raises(ConfigError, match=key):
        unet_from_config(cfg)


def test_from_config_accepts_defaults_and_private_keys():
    cfg = _tiny({})
    cfg.update(_class_name="UNet2DConditionModel", _diffusers_version="0.6.0", _name_or_path="x",
               class_embed_type=None, transformer_layers_per_block=[1, 1], time_embedding_type="positional",
               dropout=0.0, resnet_time_scale_shift="default", addition_embed_type_num_heads=64,
               mid_block_only_cross_attention=None, cross_attention_dim=[32, 32])
    model = unet_from_config(cfg)
    assert model.cross_attention_dim == 32 and model.block_out_channels == (32, 64)


@pytest.mark.oracle
@pytest.mark.parametrize("overrides", [{}, CASES[1][1], CASES[2][1]], ids=["base", "list-heads", "plain-mid"])
def test_to_config_roundtrip_and_diffusers_accepts(overrides):
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    model = unet_from_config(_tiny(overrides))
    cfg = unet_to_config(model)
    assert cfg["_class_name"] == "UNet2DConditionModel" and "_diffusers_version" in cfg
    cfg = json.loads(json.dumps(cfg))  # what a config.json holds
    assert unet_to_config(unet_from_config(cfg)) == cfg
    ref = diffusers.UNet2DConditionModel.from_config(cfg)
    for key, value in cfg.items():
        if not key.startswith("_"):
            got = ref.config[key]
            assert (list(got) if isinstance(got, tuple) else got) == value, key
    # and diffusers' own config (all its keys, defaults included) comes back to the same model
    assert unet_to_config(unet_from_config(dict(ref.config))) == cfg


@pytest.mark.slow
def test_bf16_compute_keeps_fp32_params_and_tracks_fp32():
    cfg = _tiny({})
    rng = np.random.default_rng(2)
    sample = rng.standard_normal((2, 8, 8, 4), dtype=np.float32)
    context = rng.standard_normal((2, 5, 32), dtype=np.float32)
    t = np.array([1, 900], np.int32)
    f32, bf16 = UNet2DConditionModel(**cfg), UNet2DConditionModel(**cfg, dtype=jnp.bfloat16)
    params = jax.jit(f32.init)(jax.random.key(0), sample, t, context)
    bf16_params = jax.eval_shape(bf16.init, jax.random.key(0), sample, t, context)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16_params))
    ref = jax.jit(f32.apply)(params, sample, t, context)
    out = jax.jit(bf16.apply)(params, sample, t, context)
    assert out.dtype == jnp.bfloat16
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
    assert err < 0.05 * float(jnp.max(jnp.abs(ref))), err
