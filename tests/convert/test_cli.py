"""`python -m x2x_jax.convert`: conversions end to end, one-line errors, and no partial output."""

import json
import os
import subprocess
import sys

import pytest

from tests.oracle import (
    TINY_UNET,
    assert_states_identical,
    numpy_state,
    read_dir_state,
    torch_models,
    write_torch_pipeline,
)
from x2x_jax.convert import diffusers as dconv
from x2x_jax.convert import ldm_ckpt as L
from x2x_jax.convert import params as P
from x2x_jax.convert.__main__ import main
from x2x_jax.errors import WeightsError

STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


def run_cli(args, capsys):
    """Run in-process; returns (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def models():
    return torch_models(10)


@pytest.fixture(scope="module")
def src_dir(tmp_path_factory, models, tokenizer):  # noqa: F811
    return write_torch_pipeline(tmp_path_factory.mktemp("cli_src") / "pipe", models, tokenizer)


@pytest.mark.slow
@pytest.mark.oracle
def test_diffusers_to_diffusers(src_dir, tmp_path, capsys):
    dst = tmp_path / "out" / "pipe"
    args = [src_dir, dst, "--from", "diffusers", "--to", "diffusers", "--max-shard-size", "300KB"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert f"wrote {dst}" in out
    assert (dst / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    for c, stem in STEMS.items():
        assert_states_identical(read_dir_state(dst / c, stem), read_dir_state(src_dir / c, stem))
    assert leftovers(dst.parent) == []

    # a non-empty DST is refused (and kept) unless --overwrite
    marker = dst / "keep.txt"
    marker.write_text("mine")
    code, _, err = run_cli([src_dir, dst, "--from", "diffusers", "--to", "diffusers"], capsys)
    assert_one_line_error(code, err, str(dst), "--overwrite")
    assert marker.read_text() == "mine"
    code, _, err = run_cli([src_dir, dst, "--from", "diffusers", "--to", "diffusers", "--overwrite"], capsys)
    assert code == 0, err
    assert not marker.exists() and (dst / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert leftovers(dst.parent) == []


@pytest.mark.oracle
def test_ldm_to_diffusers_with_ema_and_expanded_channels(tmp_path, tokenizer, capsys):  # noqa: F811
    four = dict(TINY_UNET, in_channels=4)
    unet, vae, text = torch_models(11, unet=four)
    ema_unet = torch_models(12, unet=four)[0]
    configs_dir = write_torch_pipeline(tmp_path / "configs", (unet, vae, text), tokenizer)
    ldm = L.ldm_state_from_diffusers(
        numpy_state(unet), numpy_state(vae), numpy_state(text), four, dict(vae.config),
        unet_ema_state=numpy_state(ema_unet),
    )
    P.write_safetensors(tmp_path / "sd.safetensors", ldm)
    dst = tmp_path / "ip2p"
    code, _, err = run_cli(
        [tmp_path / "sd.safetensors", dst, "--from", "ldm", "--to", "diffusers", "--use-ema",
         "--configs-from", configs_dir, "--expand-in-channels", "8"],
        capsys,
    )
    assert code == 0, err
    new = read_dir_state(dst / "unet", "diffusion_pytorch_model")
    ema = numpy_state(ema_unet)
    assert new["conv_in.weight"].shape == (32, 8, 3, 3) and not new["conv_in.weight"][:, 4:].any()
    assert new["conv_in.weight"][:, :4].tobytes() == ema["conv_in.weight"].tobytes()
    assert_states_identical({k: v for k, v in new.items() if k != "conv_in.weight"},
                            {k: v for k, v in ema.items() if k != "conv_in.weight"})
    assert_states_identical(read_dir_state(dst / "vae", STEMS["vae"]), numpy_state(vae))
    assert_states_identical(read_dir_state(dst / "text_encoder", "model"), numpy_state(text))
    assert json.loads((dst / "unet" / "config.json").read_text())["in_channels"] == 8
    # tokenizer and scheduler came from --configs-from
    assert (dst / "tokenizer" / "vocab.json").is_file()
    assert json.loads((dst / "model_index.json").read_text())["scheduler"] == ["diffusers", "DDIMScheduler"]
    # the pickle route is refused without the flag, with one line
    ckpt = tmp_path / "sd.ckpt"
    ckpt.write_bytes(b"\x80\x04pickle")
    code, _, err = run_cli([ckpt, tmp_path / "x", "--from", "ldm", "--to", "diffusers"], capsys)
    assert_one_line_error(code, err, "sd.ckpt is a pickle file", "--allow-pickle")
    assert not (tmp_path / "x").exists()


@pytest.mark.oracle
def test_bad_inputs_leave_no_dst(src_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(src_dir, broken)
    shutil.rmtree(broken / "vae")
    dst = tmp_path / "out"
    code, _, err = run_cli([broken, dst, "--from", "diffusers", "--to", "diffusers"], capsys)
    assert_one_line_error(code, err, f"{broken / 'vae'}: vae folder not found")
    assert not dst.exists() and leftovers(tmp_path) == []

    shutil.copytree(src_dir / "vae", broken / "vae")
    state = read_dir_state(broken / "unet", "diffusion_pytorch_model")
    state["conv_out.weight"] = state["conv_out.weight"][:2]
    P.write_safetensors(broken / "unet" / "diffusion_pytorch_model.safetensors", state)
    code, _, err = run_cli([broken, dst, "--from", "diffusers", "--to", "diffusers"], capsys)
    assert_one_line_error(code, err, "unet: conv_out.weight expected (4, 32, 3, 3), found (2, 32, 3, 3)")
    assert not dst.exists() and leftovers(tmp_path) == []

    for fmt in (["--from", "ours", "--to", "diffusers"], ["--from", "diffusers", "--to", "ours"]):  # no such format
        code, _, err = run_cli([src_dir, dst, *fmt], capsys)
        assert code == 2 and "invalid choice: 'ours'" in err.strip().splitlines()[-1]
    code, _, err = run_cli([src_dir, dst, "--from", "diffusers", "--to", "diffusers", "--use-ema"], capsys)
    assert_one_line_error(code, err, "--use-ema applies to --from ldm only")
    assert not dst.exists()


@pytest.mark.oracle
def test_failure_while_writing_leaves_no_partial_output(src_dir, tmp_path, capsys, monkeypatch):
    def broken_save(tok, dst):  # the models are already written by then
        assert (dst / "unet" / "config.json").is_file()
        raise WeightsError(f"{dst}: disk full (simulated)")

    monkeypatch.setattr(dconv, "save_tokenizer", broken_save)
    dst = tmp_path / "out"
    code, _, err = run_cli([src_dir, dst, "--from", "diffusers", "--to", "diffusers"], capsys)
    assert_one_line_error(code, err, "disk full (simulated)")
    assert not dst.exists() and leftovers(tmp_path) == []


def test_subprocess_error_is_one_line_on_stderr(tmp_path):
    dst = tmp_path / "out"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "x2x_jax.convert", tmp_path / "nowhere", dst, "--from", "diffusers", "--to",
         "diffusers"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere'}: source not found"]
    assert not dst.exists()
