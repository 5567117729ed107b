"""LDM single-file checkpoints (SD 1.x / InstructPix2Pix .ckpt layout) <-> diffusers keys <-> our params."""

import json
import math
import re

import numpy as np
import pytest

from tests.oracle import (
    TINY_UNET,
    TINY_VAE,
    assert_states_identical,
    numpy_state,
    torch_models,
    write_torch_pipeline,
)
from x2x_jax.convert import diffusers as dconv
from x2x_jax.convert import ldm_ckpt as L
from x2x_jax.convert import params as P
from x2x_jax.errors import ConfigError, WeightsError

# Three levels, two layers each, cross-attention at both ends and a plain block in the middle: exercises the
# index arithmetic, the upsampler's position after an attention (.2.conv) or not (.1.conv).
MIXED_UNET = dict(
    TINY_UNET,
    layers_per_block=2,
    block_out_channels=[32, 32, 64],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"],
)


def _map(km, key, to="ldm"):
    index = km._index(0 if to == "ldm" else 1)
    return km._map(key, index)[0]


def test_sd15_unet_key_table():
    km = L.unet_key_map(L.sd15_ip2p_configs()["unet"])
    expected = {
        "time_embedding.linear_2.weight": "time_embed.2.weight",
        "conv_in.weight": "input_blocks.0.0.weight",
        "down_blocks.0.resnets.1.conv1.weight": "input_blocks.2.0.in_layers.2.weight",
        "down_blocks.0.downsamplers.0.conv.bias": "input_blocks.3.0.op.bias",
        "down_blocks.1.resnets.0.conv_shortcut.weight": "input_blocks.4.0.skip_connection.weight",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight":
            "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
        "down_blocks.3.resnets.1.time_emb_proj.weight": "input_blocks.11.0.emb_layers.1.weight",
        "mid_block.attentions.0.proj_in.weight": "middle_block.1.proj_in.weight",
        "mid_block.resnets.1.norm2.weight": "middle_block.2.out_layers.0.weight",
        "up_blocks.0.resnets.2.conv2.weight": "output_blocks.2.0.out_layers.3.weight",
        "up_blocks.0.upsamplers.0.conv.weight": "output_blocks.2.1.conv.weight",  # no attention in up block 0
        "up_blocks.1.upsamplers.0.conv.weight": "output_blocks.5.2.conv.weight",  # after the attention
        "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj.weight":
            "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
        "conv_norm_out.bias": "out.0.bias",
        "conv_out.weight": "out.2.weight",
    }
    for d, l in expected.items():
        assert _map(km, d, "ldm") == l
        assert _map(km, l, "diffusers") == d
    assert "up_blocks.3.upsamplers.0.conv" not in {p[0] for p in km.pairs}


def test_sd15_vae_key_table():
    km = L.vae_key_map(L.sd15_ip2p_configs()["vae"])
    expected = {
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight": "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down_blocks.2.downsamplers.0.conv.weight": "encoder.down.2.downsample.conv.weight",
        "encoder.mid_block.attentions.0.to_q.weight": "encoder.mid.attn_1.q.weight",
        "encoder.mid_block.attentions.0.group_norm.bias": "encoder.mid.attn_1.norm.bias",
        "encoder.conv_norm_out.weight": "encoder.norm_out.weight",
        # decoder levels are numbered the other way round, and have three resnets
        "decoder.up_blocks.0.resnets.2.conv2.weight": "decoder.up.3.block.2.conv2.weight",
        "decoder.up_blocks.2.upsamplers.0.conv.weight": "decoder.up.1.upsample.conv.weight",
        "decoder.up_blocks.3.resnets.0.norm1.bias": "decoder.up.0.block.0.norm1.bias",
        "decoder.mid_block.attentions.0.to_out.0.weight": "decoder.mid.attn_1.proj_out.weight",
        "post_quant_conv.weight": "post_quant_conv.weight",
    }
    for d, l in expected.items():
        assert _map(km, d, "ldm") == l
        assert _map(km, l, "diffusers") == d
    assert "decoder.up_blocks.3.upsamplers.0.conv" not in {p[0] for p in km.pairs}
    # 1x1-conv attention projections become Linear and back
    q = np.arange(6, dtype=np.float32).reshape(2, 3, 1, 1)
    d = km.to_diffusers({"encoder.mid.attn_1.q.weight": q, "encoder.mid.attn_1.q.bias": q[:, 0, 0, 0]}, "t")
    assert d["encoder.mid_block.attentions.0.to_q.weight"].shape == (2, 3)
    assert km.to_ldm(d, "t")["encoder.mid.attn_1.q.weight"].shape == (2, 3, 1, 1)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"down_block_types": ["CrossAttnDownBlock2D", "AttnDownBlock2D"]}, "down block type 'AttnDownBlock2D'"),
        ({"up_block_types": ["UpBlock2D", "SimpleCrossAttnUpBlock2D"]}, "up block type 'SimpleCrossAttnUpBlock2D'"),
        ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid block type"),
        ({"addition_embed_type": "text_time"}, "addition_embed_type='text_time'"),
        ({"layers_per_block": [1, 1, 1]}, "one value per block"),
    ],
)
def test_unsupported_unet_configs(change, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        L.unet_key_map(dict(TINY_UNET, **change))


def test_unsupported_vae_config():
    with pytest.raises(ConfigError, match="up block type 'AttnUpDecoderBlock2D'"):
        L.vae_key_map(dict(TINY_VAE, up_block_types=["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]))


def _synthetic_ldm():
    """A minimal LDM-layout dict: enough for split_ldm_state (which does not need configs)."""
    z = np.zeros(2, np.float32)
    return {
        "model.diffusion_model.input_blocks.0.0.weight": z,
        "model.diffusion_model.out.2.bias": z,
        "model_ema.diffusion_modelinput_blocks00weight": z + 1,
        "model_ema.diffusion_modelout2bias": z + 2,
        "model_ema.decay": np.float32(0.999),
        "model_ema.num_updates": np.int64(5),
        "first_stage_model.encoder.conv_in.weight": z,
        "first_stage_model.loss.discriminator.main.0.weight": z,
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": z,
        "cond_stage_model.transformer.text_model.embeddings.position_ids": np.arange(77),
        "betas": z,
        "alphas_cumprod": z,
    }


def test_split_ema_and_ignored_buffers():
    parts = L.split_ldm_state(_synthetic_ldm())
    assert sorted(parts["unet"]) == ["input_blocks.0.0.weight", "out.2.bias"]
    assert list(parts["vae"]) == ["encoder.conv_in.weight"]
    assert list(parts["text_encoder"]) == ["final_layer_norm.weight"]
    ema = L.split_ldm_state(_synthetic_ldm(), use_ema=True)
    assert (ema["unet"]["input_blocks.0.0.weight"] == 1).all() and (ema["unet"]["out.2.bias"] == 2).all()


def test_split_errors():
    with pytest.raises(WeightsError, match=r"ckpt: unknown top-level tensors mystery\.weight"):
        L.split_ldm_state(dict(_synthetic_ldm(), **{"mystery.weight": np.zeros(1)}), source="ckpt")
    no_ema = {k: v for k, v in _synthetic_ldm().items() if not k.startswith("model_ema")}
    L.split_ldm_state(no_ema)
    with pytest.raises(WeightsError, match="no model_ema.* tensors"):
        L.split_ldm_state(no_ema, use_ema=True)
    partial = {k: v for k, v in _synthetic_ldm().items() if k != "model_ema.diffusion_modelout2bias"}
    with pytest.raises(WeightsError, match=r"EMA copies missing for UNet tensors out\.2\.bias"):
        L.split_ldm_state(partial, use_ema=True)
    no_vae = {k: v for k, v in _synthetic_ldm().items() if not k.startswith("first_stage_model.encoder")}
    with pytest.raises(WeightsError, match=r"no vae tensors \(nothing under first_stage_model\.\*\)"):
        L.split_ldm_state(no_vae)


@pytest.mark.oracle
def test_ldm_layout_agrees_with_diffusers_own_converter():
    """Write LDM keys from a random diffusers model with our table, read them back with diffusers' converter."""
    import torch
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unet, vae, text = torch_models(5, unet=MIXED_UNET)
    us, vs, ts = numpy_state(unet), numpy_state(vae), numpy_state(text)
    ldm = L.ldm_state_from_diffusers(us, vs, ts, MIXED_UNET, TINY_VAE)
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in ldm  # up block 0: attention, then upsampler
    assert "model.diffusion_model.output_blocks.5.1.conv.weight" in ldm  # up block 1: plain
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    assert "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.bias" in ldm

    as_torch = {k: torch.from_numpy(v) for k, v in ldm.items()}
    theirs_unet = {k: v.numpy() for k, v in convert_ldm_unet_checkpoint(as_torch, dict(unet.config)).items()}
    theirs_vae = {k: v.numpy() for k, v in convert_ldm_vae_checkpoint(as_torch, dict(vae.config)).items()}
    assert_states_identical(theirs_unet, us)
    assert_states_identical(theirs_vae, vs)

    ours = L.ldm_to_diffusers(ldm, MIXED_UNET, TINY_VAE)
    assert_states_identical(ours["unet"], us)
    assert_states_identical(ours["vae"], vs)
    assert_states_identical(ours["text_encoder"], ts)


def _same_params(a, b):
    fa, fb = P.flatten(a), P.flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and fa[k].tobytes() == fb[k].tobytes(), k


@pytest.mark.slow
@pytest.mark.oracle
def test_ldm_import_gives_the_diffusers_path_tensors(tokenizer, tmp_path):  # noqa: F811
    import torch

    models = torch_models(6, unet=MIXED_UNET)
    ema_unet = torch_models(7, unet=MIXED_UNET)[0]
    root = write_torch_pipeline(tmp_path / "pipe", models, tokenizer)
    configs = {c: json.loads((root / c / "config.json").read_text()) for c in ("unet", "vae", "text_encoder")}
    # older single files carry the CLIP position_ids buffer; it must be ignored
    text_state = dict(numpy_state(models[2]), **{"embeddings.position_ids": np.arange(77, dtype=np.int64)[None]})
    ldm = L.ldm_state_from_diffusers(
        numpy_state(models[0]),
        numpy_state(models[1]),
        text_state,
        configs["unet"],
        configs["vae"],
        unet_ema_state=numpy_state(ema_unet),
    )
    ldm["betas"] = np.linspace(0, 1, 10, dtype=np.float64)
    P.write_safetensors(tmp_path / "model.safetensors", ldm)

    via_diffusers = dconv.load_pipeline(root)
    via_ldm = L.load_ldm_checkpoint(
        tmp_path / "model.safetensors", configs["unet"], configs["vae"], configs["text_encoder"], tokenizer=tokenizer
    )
    _same_params(via_ldm.unet_params, via_diffusers.unet_params)
    _same_params(via_ldm.vae_params, via_diffusers.vae_params)
    _same_params(via_ldm.text_params, via_diffusers.text_params)
    assert via_ldm.scheduler_config["_class_name"] == "DDIMScheduler"

    ema = L.load_ldm_checkpoint(
        tmp_path / "model.safetensors", configs["unet"], configs["vae"], configs["text_encoder"], use_ema=True,
        tokenizer=tokenizer,
    )
    ema_state = P.flax_to_torch_state(ema.unet_params)
    assert_states_identical(ema_state, numpy_state(ema_unet))
    _same_params(ema.vae_params, via_diffusers.vae_params)

    # the same dict as a Lightning pickle (nested under "state_dict"): only with allow_pickle
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in ldm.items()}, "global_step": 22000}, ckpt)
    args = (ckpt, configs["unet"], configs["vae"], configs["text_encoder"])
    with pytest.raises(WeightsError, match=r"model\.ckpt is a pickle file.*allow_pickle=True"):
        L.load_ldm_checkpoint(*args, tokenizer=tokenizer)
    pickled = L.load_ldm_checkpoint(*args, allow_pickle=True, use_ema=True, tokenizer=tokenizer)
    _same_params(pickled.unet_params, ema.unet_params)

    # shape errors name the diffusers key, as for directories
    bad = dict(ldm, **{"model.diffusion_model.input_blocks.0.0.weight": np.zeros((32, 4, 3, 3), np.float32)})
    P.write_safetensors(tmp_path / "bad.safetensors", bad)
    msg = "unet: conv_in.weight expected (32, 8, 3, 3), found (32, 4, 3, 3)"
    with pytest.raises(WeightsError, match=re.escape(msg)):
        L.load_ldm_checkpoint(tmp_path / "bad.safetensors", configs["unet"], configs["vae"], configs["text_encoder"],
                              tokenizer=tokenizer)


def test_default_configs_take_in_channels_from_the_checkpoint(monkeypatch, tmp_path):
    """With no configs given, SD 1.5 / IP2P's are used and conv_in decides between 4 and 8 input channels."""
    seen = {}

    def fake_pipeline_from_states(states, configs, **kwargs):
        seen.update(configs=configs, states=states)
        return "pipeline"

    monkeypatch.setattr(dconv, "pipeline_from_states", fake_pipeline_from_states)
    sd = L.sd15_ip2p_configs()
    km_unet = L.unet_key_map(dict(sd["unet"], in_channels=4))
    km_vae = L.vae_key_map(sd["vae"])
    # every LDM key of an SD 1.5 file, with 1-element stand-ins (only conv_in's shape matters here)
    ldm = {}
    for d, l, _ in km_unet.pairs:
        ldm[f"model.diffusion_model.{l}.bias"] = np.zeros(1, np.float32)
    for d, l, _ in km_vae.pairs:
        ldm[f"first_stage_model.{l}.bias"] = np.zeros(1, np.float32)
    ldm["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((320, 4, 3, 3), np.float32)
    ldm["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = np.zeros(768, np.float32)
    P.write_safetensors(tmp_path / "sd15.safetensors", ldm)
    assert L.load_ldm_checkpoint(tmp_path / "sd15.safetensors") == "pipeline"
    assert seen["configs"]["unet"]["in_channels"] == 4
    assert seen["configs"]["text_encoder"]["hidden_size"] == 768
    assert seen["states"]["unet"]["conv_in.weight"].shape == (320, 4, 3, 3)
    assert "down_blocks.2.attentions.1.bias" in seen["states"]["unet"]


@pytest.mark.oracle
def test_sd15_tables_cover_the_full_size_models():
    """The built-in SD 1.5 / IP2P configs: our modules have SD's parameter counts, and every UNet / VAE tensor
    maps to an LDM key that diffusers' own converter maps back to the same diffusers key (no weights needed)."""
    import torch
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    configs = L.sd15_ip2p_configs()
    sizes = {"unet": (686, 859_520_964 + 4 * 320 * 9), "vae": (248, 83_653_863), "text_encoder": (196, 123_060_480)}
    for c, (n_tensors, n_params) in sizes.items():
        table = P.build_table(dconv.abstract_params(c, dconv.model_from_config(c, configs[c])))
        assert (len(table), sum(math.prod(e.flax_shape) for e in table)) == (n_tensors, n_params), c
        if c == "text_encoder":
            continue
        stand_ins = {e.torch_key: np.zeros((1,) * len(e.torch_shape), np.float32) for e in table}
        key_map, prefix, convert = {
            "unet": (L.unet_key_map, L.UNET_PREFIX, convert_ldm_unet_checkpoint),
            "vae": (L.vae_key_map, L.VAE_PREFIX, convert_ldm_vae_checkpoint),
        }[c]
        ldm = {prefix + k: torch.from_numpy(v) for k, v in key_map(configs[c]).to_ldm(stand_ins, c).items()}
        assert len(ldm) == n_tensors
        assert set(convert(ldm, configs[c])) == set(stand_ins), c
