"""diffusers directories <-> our Flax param trees: the rename/transpose table, loading, saving, sharding, pickles."""

import json
import re

import numpy as np
import pytest

from tests.oracle import TINY_UNET, assert_states_identical, read_dir_state, torch_models, write_torch_pipeline
from x2x_jax.convert import diffusers as dconv
from x2x_jax.convert import params as P
from x2x_jax.errors import ConfigError, WeightsError

# ---------------------------------------------------------------------------------------------------------------
# The table, on synthetic Flax-like trees (no torch, no models)


def synthetic_tree(rng):
    def arr(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    return {
        "conv_in": {"kernel": arr(3, 3, 8, 16), "bias": arr(16)},
        "time_embedding": {"linear_1": {"kernel": arr(16, 64), "bias": arr(64)}},
        "down_blocks_0": {
            "resnets_1": {"norm1": {"scale": arr(16), "bias": arr(16)}},
            "attentions_1": {
                "transformer_blocks_0": {
                    "attn1": {"to_out_0": {"kernel": arr(16, 16)}},
                    "ff": {"net_0": {"proj": {"kernel": arr(16, 128)}}, "net_2": {"kernel": arr(64, 16)}},
                }
            },
        },
        "encoder": {"layers_11": {"mlp": {"fc1": {"kernel": arr(16, 32)}}}},
        "embeddings": {"token_embedding": {"embedding": arr(10, 16)}},
    }


def test_table_names_and_layouts():
    tree = synthetic_tree(np.random.default_rng(0))
    table = {e.torch_key: e for e in P.build_table(tree)}
    assert sorted(table) == sorted(
        [
            "conv_in.weight",
            "conv_in.bias",
            "time_embedding.linear_1.weight",  # `linear_1` is a name, not a list index
            "time_embedding.linear_1.bias",
            "down_blocks.0.resnets.1.norm1.weight",
            "down_blocks.0.resnets.1.norm1.bias",
            "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0.weight",
            "down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj.weight",
            "down_blocks.0.attentions.1.transformer_blocks.0.ff.net.2.weight",
            "encoder.layers.11.mlp.fc1.weight",
            "embeddings.token_embedding.weight",
        ]
    )
    assert table["conv_in.weight"].transform == "conv" and table["conv_in.weight"].torch_shape == (16, 8, 3, 3)
    assert table["time_embedding.linear_1.weight"].torch_shape == (64, 16)
    assert table["embeddings.token_embedding.weight"].transform == "none"
    assert table["down_blocks.0.resnets.1.norm1.weight"].flax_path[-1] == "scale"


def test_flax_torch_round_trip_is_bit_exact_and_layouts_are_torch():
    tree = synthetic_tree(np.random.default_rng(1))
    state = P.flax_to_torch_state(tree)
    assert list(state) == sorted(state)
    assert all(v.flags.c_contiguous for v in state.values())
    np.testing.assert_array_equal(state["conv_in.weight"], tree["conv_in"]["kernel"].transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(
        state["time_embedding.linear_1.weight"], tree["time_embedding"]["linear_1"]["kernel"].T
    )
    back = P.torch_state_to_flax(state, tree)
    flat_a, flat_b = P.flatten(tree), P.flatten(back)
    assert flat_a.keys() == flat_b.keys()
    assert all(flat_a[k].tobytes() == flat_b[k].tobytes() and flat_b[k].dtype == np.float32 for k in flat_a)
    # init()-style wrapping is kept, dtypes are kept unless asked for
    wrapped = P.torch_state_to_flax({k: v.astype(np.float16) for k, v in state.items()}, {"params": tree})
    assert set(wrapped) == {"params"} and wrapped["params"]["conv_in"]["bias"].dtype == np.float16
    cast = P.torch_state_to_flax(state, tree, dtype=np.float16)
    assert cast["conv_in"]["kernel"].dtype == np.float16


def test_table_errors_name_key_and_shapes():
    tree = synthetic_tree(np.random.default_rng(2))
    state = P.flax_to_torch_state(tree)

    bad = dict(state, **{"conv_in.weight": np.zeros((16, 4, 3, 3), np.float32)})
    msg = "unet: conv_in.weight expected (16, 8, 3, 3), found (16, 4, 3, 3)"
    with pytest.raises(WeightsError, match=re.escape(msg)):
        P.torch_state_to_flax(bad, tree, name="unet")

    missing = {k: v for k, v in state.items() if "down_blocks" not in k}
    with pytest.raises(WeightsError, match=r"unet: missing tensors down_blocks\.0\..*\(5 in all\)"):
        P.torch_state_to_flax(missing, tree, name="unet")

    with pytest.raises(WeightsError, match=r"unexpected tensors extra\.weight \(1 in all\)"):
        P.torch_state_to_flax(dict(state, **{"extra.weight": np.zeros(1)}), tree)

    nan = dict(state)
    nan["encoder.layers.11.mlp.fc1.weight"] = nan["encoder.layers.11.mlp.fc1.weight"].copy()
    nan["encoder.layers.11.mlp.fc1.weight"][0, 3] = np.nan
    with pytest.raises(WeightsError, match=r"text_encoder: encoder\.layers\.11\.mlp\.fc1\.weight contains NaN or inf"):
        P.torch_state_to_flax(nan, tree, name="text_encoder")

    # known non-parameter buffers are ignored
    P.torch_state_to_flax(dict(state, **{"embeddings.position_ids": np.arange(77)[None]}), tree)


def test_bfloat16_is_kept_bit_exact(tmp_path):
    import ml_dtypes

    tree = {"proj": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)}}
    P.write_state(tmp_path, "model", P.flax_to_torch_state(tree), None)
    state = P.read_safetensors(tmp_path / "model.safetensors")
    back = P.torch_state_to_flax(state, tree)
    assert back["proj"]["kernel"].dtype == ml_dtypes.bfloat16
    assert back["proj"]["kernel"].tobytes() == tree["proj"]["kernel"].tobytes()


def test_sharded_write_and_read(tmp_path):
    tree = synthetic_tree(np.random.default_rng(3))
    state = P.flax_to_torch_state(tree)
    P.write_state(tmp_path, "diffusion_pytorch_model", state, max_shard_size="10KB")
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in state.values())
    assert not (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    assert_states_identical(dconv.read_component_state(tmp_path, "diffusion_pytorch_model"), state)
    # a shard that disagrees with the index is refused
    (tmp_path / shards[0]).unlink()
    with pytest.raises(WeightsError, match=re.escape(shards[0]) + " is missing"):
        dconv.read_component_state(tmp_path, "diffusion_pytorch_model")


def test_parse_size():
    assert P.parse_size("5GB") == 5 * 10**9 and P.parse_size("2MiB") == 2 * 2**20 and P.parse_size(123) == 123
    with pytest.raises(ValueError):
        P.parse_size("lots")


def test_weights_file_resolution_errors(tmp_path):
    with pytest.raises(WeightsError, match="no weights file diffusion_pytorch_model.safetensors"):
        dconv.read_component_state(tmp_path, "diffusion_pytorch_model")
    P.write_safetensors(tmp_path / "diffusion_pytorch_model.fp16.safetensors", {"a": np.zeros(2, np.float16)})
    with pytest.raises(WeightsError, match=r"found diffusion_pytorch_model\.fp16\.safetensors .*variant"):
        dconv.read_component_state(tmp_path, "diffusion_pytorch_model")
    state = dconv.read_component_state(tmp_path, "diffusion_pytorch_model", variant="fp16")
    assert state["a"].dtype == np.float16
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model\.bin is a pickle file.*allow_pickle=True"):
        dconv.read_component_state(tmp_path, "diffusion_pytorch_model")


def test_expand_unet_in_channels_synthetic():
    tree = synthetic_tree(np.random.default_rng(4))
    tree["conv_in"]["kernel"] = tree["conv_in"]["kernel"][:, :, :4]
    wide, config = dconv.expand_unet_in_channels(tree, {"in_channels": 4, "out_channels": 4}, 8)
    k_old, k_new = tree["conv_in"]["kernel"], wide["conv_in"]["kernel"]
    assert k_new.shape == (3, 3, 8, 16) and config == {"in_channels": 8, "out_channels": 4}
    assert k_new[:, :, :4].tobytes() == k_old.tobytes() and not k_new[:, :, 4:].any()
    assert wide["conv_in"]["bias"] is tree["conv_in"]["bias"]
    with pytest.raises(ConfigError, match="new_in=2 is fewer than the current 4"):
        dconv.expand_unet_in_channels(tree, {"in_channels": 4}, 2)
    with pytest.raises(ConfigError, match="in_channels=8 but conv_in has 4"):
        dconv.expand_unet_in_channels(tree, {"in_channels": 8}, 8)


# ---------------------------------------------------------------------------------------------------------------
# Against diffusers / transformers (the oracle)


def _configs_as_loaded(root):
    """The config dicts diffusers / transformers build from a directory (defaults filled in)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    drop = {"_diffusers_version", "_name_or_path", "transformers_version", "_use_default_values"}
    out = {
        "unet": dict(UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet")).config),
        "vae": dict(AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae")).config),
        "text_encoder": CLIPTextConfig.from_pretrained(root / "text_encoder").to_dict(),
        "scheduler": dict(DDIMScheduler.load_config(root / "scheduler")),
    }
    return {c: {k: v for k, v in cfg.items() if k not in drop} for c, cfg in out.items()}


@pytest.fixture(scope="module")
def torch_pipeline_dir(tmp_path_factory, tokenizer):
    return write_torch_pipeline(tmp_path_factory.mktemp("torch_pipe") / "pipe", torch_models(0), tokenizer)


@pytest.mark.oracle
def test_round_trip_diffusers_ours_diffusers_is_bit_identical(torch_pipeline_dir, tmp_path):
    pipe = dconv.load_pipeline(torch_pipeline_dir)
    assert pipe.unet.in_channels == 8 and pipe.scheduler_config["_class_name"] == "DDIMScheduler"
    out = dconv.save_pipeline(tmp_path / "out", pipe)
    for c, stem in [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")]:
        assert_states_identical(read_dir_state(out / c, stem), read_dir_state(torch_pipeline_dir / c, stem))
    assert _configs_as_loaded(out) == _configs_as_loaded(torch_pipeline_dir)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInstructPix2PixPipeline"
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    # the Flax params are the torch ones, transposed
    unet_state = read_dir_state(torch_pipeline_dir / "unet", "diffusion_pytorch_model")
    hwio = unet_state["conv_in.weight"].transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(pipe.unet_params["conv_in"]["kernel"], hwio)


@pytest.mark.oracle
def test_exported_directory_runs_in_diffusers(torch_pipeline_dir, tmp_path):
    import torch
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from PIL import Image

    out = dconv.save_pipeline(tmp_path / "out", dconv.load_pipeline(torch_pipeline_dir), max_shard_size="200KB")
    assert (out / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(out, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    result = pipe(
        "add a pleural effusion",
        image=image,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert result.shape == (1, 32, 32, 3) and np.isfinite(result).all()
    # ... with the very weights we wrote
    ref = read_dir_state(torch_pipeline_dir / "unet", "diffusion_pytorch_model")
    loaded = {k: v.numpy() for k, v in pipe.unet.state_dict().items()}
    assert_states_identical(loaded, ref)


@pytest.mark.oracle
def test_text_encoder_written_by_older_transformers(torch_pipeline_dir, tmp_path):
    """transformers < 5 wrote `text_model.*` keys and the position_ids buffer; both layouts load the same."""
    import shutil

    folder = shutil.copytree(torch_pipeline_dir / "text_encoder", tmp_path / "text_encoder")
    state = read_dir_state(folder, "model")
    legacy = {f"text_model.{k}": v for k, v in state.items()}
    legacy["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    P.write_safetensors(folder / "model.safetensors", legacy)
    _, old = dconv.load_text_encoder(folder)
    _, new = dconv.load_text_encoder(torch_pipeline_dir / "text_encoder")
    fa, fb = P.flatten(old), P.flatten(new)
    assert fa.keys() == fb.keys() and all(fa[k].tobytes() == fb[k].tobytes() for k in fa)


@pytest.mark.oracle
def test_sharded_and_pickled_inputs(tokenizer, tmp_path):
    import torch

    models = torch_models(1)
    sharded = write_torch_pipeline(tmp_path / "sharded", models, tokenizer, max_shard_size="100KB")
    assert (sharded / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    plain = write_torch_pipeline(tmp_path / "plain", models, tokenizer)
    a, b = dconv.load_pipeline(sharded), dconv.load_pipeline(plain)
    for field in ("unet_params", "vae_params", "text_params"):
        fa, fb = P.flatten(getattr(a, field)), P.flatten(getattr(b, field))
        assert fa.keys() == fb.keys() and all(fa[k].tobytes() == fb[k].tobytes() for k in fa)

    # the same UNet as a pickle: refused without the flag, identical with it
    unet_dir = tmp_path / "plain" / "unet"
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(models[0].state_dict(), unet_dir / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightsError, match="pickle file.*allow_pickle=True"):
        dconv.load_pipeline(plain, components=("unet",))
    c = dconv.load_pipeline(plain, allow_pickle=True, components=("unet",))
    fa, fc = P.flatten(a.unet_params), P.flatten(c.unet_params)
    assert fa.keys() == fc.keys() and all(fa[k].tobytes() == fc[k].tobytes() for k in fa)
    assert c.vae is None and c.tokenizer is None


@pytest.mark.oracle
def test_fp16_variant_only_when_asked(tokenizer, tmp_path):
    models = [m.half() for m in torch_models(2)]
    root = write_torch_pipeline(tmp_path / "p", models, tokenizer, variant="fp16")
    assert (root / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    with pytest.raises(WeightsError, match=r"unet: no weights file .*found diffusion_pytorch_model\.fp16\.safetensors"):
        dconv.load_pipeline(root)
    pipe = dconv.load_pipeline(root, variant="fp16")
    assert pipe.unet_params["conv_in"]["kernel"].dtype == np.float16
    assert pipe.text_params["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"].dtype == np.float16
    # written back in the params' dtype, with a matching text-encoder config
    out = dconv.save_pipeline(tmp_path / "out", pipe)
    assert read_dir_state(out / "unet", "diffusion_pytorch_model")["conv_in.weight"].dtype == np.float16
    assert json.loads((out / "text_encoder" / "config.json").read_text())["dtype"] == "float16"


@pytest.mark.oracle
def test_bad_directories(torch_pipeline_dir, tmp_path):
    import shutil

    root = tmp_path / "p"
    shutil.copytree(torch_pipeline_dir, root)
    shutil.rmtree(root / "vae")
    with pytest.raises(WeightsError, match=re.escape(f"{root / 'vae'}: vae folder not found")):
        dconv.load_pipeline(root)
    dconv.load_pipeline(root, components=("text_encoder", "scheduler"))  # what is there still loads

    (root / "text_encoder" / "config.json").unlink()
    msg = f"{root / 'text_encoder' / 'config.json'}: text_encoder config not found"
    with pytest.raises(WeightsError, match=re.escape(msg)):
        dconv.load_pipeline(root, components=("text_encoder",))

    with pytest.raises(WeightsError, match="model_index.json: model_index.json not found"):
        dconv.load_pipeline(root / "unet")

    unet = root / "unet"
    state = read_dir_state(unet, "diffusion_pytorch_model")
    f = unet / "diffusion_pytorch_model.safetensors"

    P.write_safetensors(f, dict(state, **{"conv_in.weight": state["conv_in.weight"][:, :4]}))
    msg = "unet: conv_in.weight expected (32, 8, 3, 3), found (32, 4, 3, 3)"
    with pytest.raises(WeightsError, match=re.escape(msg)):
        dconv.load_pipeline(root, components=("unet",))

    P.write_safetensors(f, dict(state, **{"mystery.weight": np.zeros(3, np.float32)}))
    with pytest.raises(WeightsError, match=r"unet: unexpected tensors mystery\.weight"):
        dconv.load_pipeline(root, components=("unet",))

    P.write_safetensors(f, {k: v for k, v in state.items() if not k.startswith("conv_out")})
    with pytest.raises(WeightsError, match=r"unet: missing tensors conv_out\.bias, conv_out\.weight \(2 in all\)"):
        dconv.load_pipeline(root, components=("unet",))

    poisoned = dict(state)
    poisoned["mid_block.resnets.0.conv1.weight"] = np.full_like(state["mid_block.resnets.0.conv1.weight"], np.inf)
    P.write_safetensors(f, poisoned)
    with pytest.raises(WeightsError, match=r"unet: mid_block\.resnets\.0\.conv1\.weight contains NaN or inf"):
        dconv.load_pipeline(root, components=("unet",))

    config = json.loads((unet / "config.json").read_text())
    config["down_block_types"] = ["CrossAttnDownBlock2D", "KDownBlock2D"]
    (unet / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="KDownBlock2D"):
        dconv.load_pipeline(root, components=("unet",))


def test_pipeline_without_tokenizer_folder_takes_the_bpe_tokenizer(torch_pipeline_dir, tmp_path):
    """Our shipped model has no tokenizer/ (derived vocab files are not committed): it loads with SD 1.x CLIP's."""
    import shutil

    root = tmp_path / "p"
    shutil.copytree(torch_pipeline_dir, root)
    shutil.rmtree(root / "tokenizer")
    tok = dconv.load_pipeline(root, components=("text_encoder", "tokenizer")).tokenizer
    ids = tok("Add the finding of pleural effusion.").input_ids
    assert len(tok) == 49408 and ids[0] == tok.bos_token_id == 49406 and ids[-1] == tok.eos_token_id == 49407


@pytest.mark.oracle
def test_expand_in_channels_of_a_loaded_unet(tokenizer, tmp_path):
    four = dict(TINY_UNET, in_channels=4)
    root = write_torch_pipeline(tmp_path / "sd", torch_models(3, unet=four), tokenizer)
    pipe = dconv.load_pipeline(root, components=("unet",))
    config = dconv.model_to_config("unet", pipe.unet)
    params, config = dconv.expand_unet_in_channels(pipe.unet_params, config, 8)
    pipe.unet, pipe.unet_params = dconv.model_from_config("unet", config), params
    dconv.save_unet(tmp_path / "unet8", pipe.unet, pipe.unet_params)
    old = read_dir_state(root / "unet", "diffusion_pytorch_model")
    new = read_dir_state(tmp_path / "unet8", "diffusion_pytorch_model")
    assert new["conv_in.weight"].shape == (32, 8, 3, 3)
    assert new["conv_in.weight"][:, :4].tobytes() == old["conv_in.weight"].tobytes()
    assert not new["conv_in.weight"][:, 4:].any()
    assert_states_identical({k: v for k, v in new.items() if k != "conv_in.weight"},
                            {k: v for k, v in old.items() if k != "conv_in.weight"})
    assert json.loads((tmp_path / "unet8" / "config.json").read_text())["in_channels"] == 8
