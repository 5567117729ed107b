"""edit.py end to end: outputs at the input's size and depth, warnings, and bad input leaving nothing behind."""

import json

import numpy as np
import pydicom
import pytest
from PIL import Image

import edit as edit_cli
from tests.convert.test_diffusers_bridge import torch_models, write_torch_pipeline, tokenizer  # noqa: F401
from x2x_jax.editing import api

OUTPUTS = {"edited.png", "guidance.png", "guidance.npy", "mask.png", "figure.png", "edit.json"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):  # noqa: F811
    return write_torch_pipeline(tmp_path_factory.mktemp("pipe") / "ip2p", torch_models(seed=5), tokenizer)


def run(capsys, *argv):
    try:
        code = edit_cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def write_png16(path, h=40, w=56):
    arr = (np.linspace(0, 65535, h * w).reshape(h, w)).astype(np.uint16)
    Image.fromarray(arr).save(path)
    return path


def write_dicom(path, h=48, w=40):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = h, w, 16, 12, 11
    ds.PixelRepresentation, ds.SamplesPerPixel, ds.PhotometricInterpretation = 0, 1, "MONOCHROME2"
    ds.PixelData = (np.arange(h * w).reshape(h, w) % 4096).astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def test_png16_edit_writes_every_output_at_original_size(tmp_path, capsys, model_dir):
    img = write_png16(tmp_path / "in.png")
    code, out, err = run(capsys, "--model", model_dir, "--image", img, "--instruction",
                         "Add the finding of left pleural effusion.", "--out", tmp_path / "o", "--steps", 2,
                         "--compare")
    assert code == 0, err
    assert {p.name for p in (tmp_path / "o").iterdir()} == OUTPUTS
    edited = Image.open(tmp_path / "o" / "edited.png")
    assert edited.size == (56, 40) and edited.mode.startswith("I")  # 16-bit in, 16-bit out
    record = json.loads((tmp_path / "o" / "edit.json").read_text())
    assert record["parsed"]["edits"][0]["findings"] == ["pleural effusion"]
    assert record["priors"]["findings"] == ["pleural effusion"] and record["warnings"] == []
    assert record["parameters"]["steps"] == 2 and "plain_ip2p" in record["timings"]
    assert np.load(tmp_path / "o" / "guidance.npy").dtype == np.float32


def test_dicom_in_png_out_and_unparseable_instruction_warns(tmp_path, capsys, model_dir):
    dcm = write_dicom(tmp_path / "x.dcm")
    code, out, err = run(capsys, "--model", model_dir, "--image", dcm, "--instruction", "make it look healthier",
                         "--out", tmp_path / "o", "--steps", 1)
    assert code == 0, err
    edited = Image.open(tmp_path / "o" / "edited.png")
    assert edited.size == (40, 48) and edited.mode.startswith("I")
    record = json.loads((tmp_path / "o" / "edit.json").read_text())
    assert record["priors"]["whole_image"] and record["warnings"]
    assert "warning:" in out
    assert record["parsed"]["unparsed"] == ["make it look healthier"]


def test_batch_csv(tmp_path, capsys, model_dir):
    write_png16(tmp_path / "a.png")
    write_png16(tmp_path / "b.png", 32, 32)
    (tmp_path / "e.csv").write_text("image,instruction,seed\na.png,Add the finding of edema.,3\n"
                                    "b.png,Remove the finding of pneumothorax.,\n")
    code, _, err = run(capsys, "--model", model_dir, "--batch", tmp_path / "e.csv", "--out", tmp_path / "o",
                       "--steps", 1)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["0000_a", "0001_b"]
    assert json.loads((tmp_path / "o" / "0000_a" / "edit.json").read_text())["seed"] == 3


@pytest.mark.parametrize("case", ["unreadable", "empty_instruction", "tau", "steps", "missing_model",
                                  "incompatible_model", "missing_image_in_batch"])
def test_bad_input_one_line_error_nonzero_exit_nothing_written(tmp_path, capsys, model_dir, case):
    good = write_png16(tmp_path / "good.png")
    out = tmp_path / "o"
    args = ["--model", model_dir, "--image", good, "--instruction", "Add the finding of edema.", "--out", out,
            "--steps", 1]
    if case == "unreadable":
        (tmp_path / "bad.png").write_bytes(b"not an image")
        args[3] = tmp_path / "bad.png"
    elif case == "empty_instruction":
        args[5] = "   "
    elif case == "tau":
        args += ["--tau", 1.5]
    elif case == "steps":
        args += ["--steps", 0]
    elif case == "missing_model":
        args[1] = tmp_path / "nowhere"
    elif case == "incompatible_model":
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "model_index.json").write_text("{}")
        args[1] = tmp_path / "m"
    elif case == "missing_image_in_batch":
        (tmp_path / "e.csv").write_text(f"image,instruction\n{good},Add the finding of edema.\nmissing.png,x\n")
        args = ["--model", model_dir, "--batch", tmp_path / "e.csv", "--out", out, "--steps", 1]
    code, stdout, err = run(capsys, *args)
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]  # no temp folder left either


def test_long_instruction_is_truncated_with_a_warning(tmp_path, capsys, model_dir):
    img = write_png16(tmp_path / "in.png", 32, 32)
    text = "Add the finding of edema. " + "Remove the finding of pneumothorax. " * 20
    code, out, err = run(capsys, "--model", model_dir, "--image", img, "--instruction", text, "--out",
                         tmp_path / "o", "--steps", 1)
    assert code == 0, err
    assert "truncated" in out
    assert any("truncated" in w for w in json.loads((tmp_path / "o" / "edit.json").read_text())["warnings"])


@pytest.mark.skipif(not (api.DEFAULT_MODEL / "model_index.json").is_file(), reason="no shipped model")
def test_no_arguments_edits_the_shipped_example(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "--steps", 5)
    assert code == 0, err
    assert {p.name for p in (tmp_path / "edit_out").iterdir()} == OUTPUTS
