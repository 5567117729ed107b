"""AutoencoderKL: encode/decode parity with PyTorch diffusers, exact parameter mapping, posterior, config I/O."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.oracle import assert_close, assert_same_params, flax_shapes, perturbed_torch, torch_to_flax
from x2x_jax.errors import ConfigError
from x2x_jax.models.vae import AutoencoderKL, posterior_mode, posterior_sample, vae_from_config, vae_to_config

CASES = [
    # (name, config, input H=W)
    ("rgb-2-levels", dict(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                          norm_num_groups=8, latent_channels=4,
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
     16),
    # one-channel X-ray-style VAE, 3 levels, 2 layers, no post-quant conv
    ("gray-3-levels", dict(in_channels=1, out_channels=1, block_out_channels=(16, 32, 32), layers_per_block=2,
                           norm_num_groups=8, latent_channels=4, use_post_quant_conv=False,
                           down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3),
     32),
    # no mid-block attention, no quant conv
    ("no-mid-attn", dict(in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                         norm_num_groups=8, latent_channels=3, mid_block_add_attention=False, use_quant_conv=False,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
     16),
]


@pytest.fixture(scope="module")
def torch_threads():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    return torch


@pytest.mark.oracle
@pytest.mark.parametrize("name,cfg,size", CASES, ids=[c[0] for c in CASES])
def test_encode_decode_match_diffusers(torch_threads, name, cfg, size):
    torch = torch_threads
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref_model = perturbed_torch(diffusers.AutoencoderKL(**cfg), seed=2)
    model = vae_from_config(ref_model.config)
    params = {"params": torch_to_flax(ref_model.state_dict())}

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, size, size, cfg["in_channels"]), dtype=np.float32)
    assert_same_params(jax.eval_shape(model.init, jax.random.key(0), x)["params"], ref_model)

    mean, logvar = jax.jit(lambda p, x: model.apply(p, x, method=model.encode))(params, x)
    z = rng.standard_normal(mean.shape, dtype=np.float32)
    dec = jax.jit(lambda p, z: model.apply(p, z, method=model.decode))(params, z)

    with torch.no_grad():
        dist = ref_model.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
        ref_dec = ref_model.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
    latent = size // 2 ** (len(cfg["block_out_channels"]) - 1)
    assert mean.shape == logvar.shape == (2, latent, latent, cfg["latent_channels"])
    assert_close(mean, nhwc(dist.mean), f"vae[{name}].mean")
    assert_close(logvar, nhwc(dist.logvar), f"vae[{name}].logvar")
    assert_close(dec, nhwc(ref_dec), f"vae[{name}].decode")
    assert np.all(np.asarray(logvar) >= -30) and np.all(np.asarray(logvar) <= 20)


@pytest.mark.slow
def test_call_is_decode_of_mean_and_remat_matches():
    cfg = dict(CASES[0][1])
    x = np.random.default_rng(3).standard_normal((1, 8, 8, 3), dtype=np.float32)
    model, rematted = AutoencoderKL(**cfg), AutoencoderKL(**cfg, remat=True)
    params = model.init(jax.random.key(0), x)
    assert flax_shapes(jax.eval_shape(rematted.init, jax.random.key(0), x)) == flax_shapes(params)
    mean, _ = model.apply(params, x, method=model.encode)
    recon = model.apply(params, x)
    np.testing.assert_allclose(np.asarray(recon), np.asarray(model.apply(params, mean, method=model.decode)),
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(rematted.apply(params, x)), np.asarray(recon), rtol=0, atol=1e-6)
    assert recon.shape == x.shape


def test_posterior_sample_and_mode():
    mean = jnp.linspace(-1.0, 1.0, 4 * 5 * 5 * 4).reshape(4, 5, 5, 4)
    logvar = jnp.full_like(mean, np.log(0.25))  # std 0.5
    assert posterior_mode(mean, logvar) is mean
    key = jax.random.key(7)
    s = posterior_sample(mean, logvar, key)
    np.testing.assert_allclose(np.asarray(s), np.asarray(mean + 0.5 * jax.random.normal(key, mean.shape)),
                               rtol=1e-6, atol=1e-6)
    big = posterior_sample(jnp.zeros((200_000,)), jnp.full((200_000,), np.log(0.25)), key)
    assert abs(float(jnp.std(big)) - 0.5) < 0.01 and abs(float(jnp.mean(big))) < 0.01
    assert not np.allclose(np.asarray(posterior_sample(mean, logvar, jax.random.key(8))), np.asarray(s))


SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=512,
)


@pytest.mark.oracle
def test_full_size_sd_vae_param_count_and_shapes(torch_threads):
    torch = torch_threads
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref_model = diffusers.AutoencoderKL(**SD_VAE)
    ref_count = sum(p.numel() for p in ref_model.parameters())
    model = vae_from_config(SD_VAE)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    count = assert_same_params(shapes["params"], ref_model)
    print(f"SD VAE parameters: flax {count:,}, diffusers {ref_count:,}")
    assert count == ref_count


@pytest.mark.parametrize("key,value", [
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]),
    ("shift_factor", 0.1159),
    ("latents_mean", [0.0] * 4),
    ("act_fn", "softsign"),
    ("no_such_key", 1),
])
def test_from_config_rejects_unsupported(key, value):
    cfg = dict(CASES[0][1])
    cfg[key] = value
    with pytest.raises(ConfigError, match=key):
        vae_from_config(cfg)


@pytest.mark.oracle
@pytest.mark.parametrize("cfg", [c[1] for c in CASES] + [SD_VAE], ids=[c[0] for c in CASES] + ["sd"])
def test_to_config_roundtrip_and_diffusers_accepts(cfg):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    out = json.loads(json.dumps(vae_to_config(vae_from_config(dict(cfg, _class_name="AutoencoderKL")))))
    assert out["_class_name"] == "AutoencoderKL" and "_diffusers_version" in out
    assert vae_to_config(vae_from_config(out)) == out
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL.from_config(out)
    for key, value in out.items():
        if not key.startswith("_"):
            got = ref.config[key]
            assert (list(got) if isinstance(got, tuple) else got) == value, key
    assert vae_to_config(vae_from_config(dict(ref.config))) == out
