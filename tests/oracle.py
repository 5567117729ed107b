"""Helpers shared by the tests that check our models and converters against the PyTorch oracle (diffusers /
transformers, the test extra): tiny torch models and pipelines, state comparisons, and a minimal torch -> Flax
parameter mapping independent of x2x_jax/convert (so the model tests do not test the converter with itself)."""

from __future__ import annotations

import jax
import numpy as np

from x2x_jax.convert import diffusers as dconv

# A deliberately minimal torch -> flax rule (the real converter lives in x2x_jax/convert/): split the key on '.',
# merge numeric parts into the previous name with '_', weight -> kernel (conv OIHW -> HWIO, linear (out, in) ->
# (in, out)) or scale (1-D norm weights).


def flax_path_and_layout(key: str, ndim: int) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
    parts: list[str] = []
    for p in key.split("."):
        if p.isdigit():
            parts[-1] += f"_{p}"
        else:
            parts.append(p)
    leaf, perm = parts[-1], None
    if leaf == "weight":
        if ndim == 4:
            leaf, perm = "kernel", (2, 3, 1, 0)
        elif ndim == 2:
            leaf, perm = "kernel", (1, 0)
        elif ndim == 1:
            leaf = "scale"
        else:
            raise AssertionError(f"unexpected {ndim}-D weight {key}")
    return tuple(parts[:-1]) + (leaf,), perm


def torch_to_flax(state_dict) -> dict:
    """torch state dict (tensors) -> nested flax params dict (numpy)."""
    params: dict = {}
    for key, tensor in state_dict.items():
        a = tensor.detach().cpu().numpy()
        path, perm = flax_path_and_layout(key, a.ndim)
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        assert path[-1] not in node, f"two torch keys map to {path}"
        node[path[-1]] = np.ascontiguousarray(a.transpose(perm) if perm else a)
    return params


def flax_shapes(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def torch_shapes_as_flax(named_shapes) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{torch key: shape} -> {flax path: expected flax shape}, asserting the mapping is one-to-one."""
    out = {}
    for key, shape in named_shapes:
        path, perm = flax_path_and_layout(key, len(shape))
        assert path not in out, f"two torch keys map to {path}"
        out[path] = tuple(shape[i] for i in perm) if perm else tuple(shape)
    return out


def assert_same_params(flax_params, torch_module) -> int:
    """Every torch parameter has exactly one flax leaf of the corresponding shape and vice versa; returns numel."""
    named = [(k, tuple(p.shape)) for k, p in torch_module.named_parameters()]
    assert {k for k, _ in torch_module.state_dict().items()} == {k for k, _ in named}, "unexpected torch buffers"
    expected = torch_shapes_as_flax(named)
    got = flax_shapes(flax_params)
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    assert not missing and not extra, f"torch-only: {missing[:5]}..., flax-only: {extra[:5]}..."
    wrong = {p: (got[p], expected[p]) for p in expected if got[p] != expected[p]}
    assert not wrong, f"shape mismatches (flax, expected): {list(wrong.items())[:5]}"
    return sum(int(np.prod(s)) for s in got.values())


def perturbed_torch(module, seed: int, scale: float = 0.02):
    """Add small noise to every parameter so zero-initialised layers (conv_out, ...) cannot hide bugs."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module.eval()


def assert_close(ours, ref, what: str) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    diff = float(np.max(np.abs(ours - ref)))
    tol = 1e-5 * max(1.0, float(np.max(np.abs(ref))))
    print(f"{what}: max|diff| = {diff:.3g} (tol {tol:.3g}, max|ref| = {np.max(np.abs(ref)):.3g})")
    assert diff <= tol, f"{what}: max|diff| {diff:.3g} > {tol:.3g}"
    return diff


# --------------------------------------------------------------------------------------------- configs


# Tiny models: an 8-channel UNet with one cross-attention block and one plain block each way, a two-level VAE,
# and a two-layer CLIP with the real vocabulary size (the pipeline test feeds it real token ids).
TINY_UNET = {
    "sample_size": 8,
    "in_channels": 8,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
}
TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "latent_channels": 4,
    "sample_size": 32,
}
TINY_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "projection_dim": 32,
    "hidden_act": "quick_gelu",
}


# ---------------------------------------------------------------------------------------------------------------
# helpers shared with test_ldm_ckpt.py / test_cli.py


def randomize(model, seed):
    """Default inits leave norms at identity and some biases at zero; make every tensor distinctive."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def torch_models(seed=0, unet=TINY_UNET, vae=TINY_VAE, text=TINY_TEXT):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return (
        randomize(UNet2DConditionModel(**unet), seed),
        randomize(AutoencoderKL(**vae), seed + 1),
        randomize(CLIPTextModel(CLIPTextConfig(**text)), seed + 2),
    )


def numpy_state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def write_torch_pipeline(dst, models, tokenizer, **save_kwargs):
    """Save tiny torch models as diffusers itself writes an InstructPix2Pix pipeline."""
    from diffusers import DDIMScheduler, StableDiffusionInstructPix2PixPipeline

    from x2x_jax.diffusion.ddim import scheduler_config

    unet, vae, text = models
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(dst, **save_kwargs)
    return dst


def read_dir_state(folder, stem):
    return dconv.read_component_state(folder, stem)


def assert_states_identical(a, b):
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))[:10]
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k
