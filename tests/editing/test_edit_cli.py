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
                         "--compare", "--tau", 0.2, "--seed", 4)
    assert code == 0, err
    o = tmp_path / "o"
    assert {p.name for p in o.iterdir()} == OUTPUTS
    edited = Image.open(o / "edited.png")
    assert edited.size == (56, 40) and edited.mode.startswith("I")  # 16-bit in, 16-bit out
    assert Image.open(o / "mask.png").size == (56, 40) and Image.open(o / "guidance.png").size == (56, 40)
    assert Image.open(o / "guidance.png").mode == "RGB"
    record = json.loads((o / "edit.json").read_text())
    assert record["parsed"]["edits"][0]["findings"] == ["pleural effusion"]
    assert record["parsed"]["edits"][0]["location"] == "left"
    assert record["priors"]["findings"] == ["pleural effusion"] and record["warnings"] == []
    assert record["priors"]["refinements"]  # the side word refined the prior
    assert record["parameters"] == {"tau": 0.2, "steps": 2, "text_scale": 7.5, "image_scale": 1.5,
                                    "noise_level": 0.8, "renoise": "correct", "relevance_draws": 1,
                                    "compare": True, "batch_size": 1, "feather": None, "keep_detail": True,
                                    "dicom_out": None, "rse": True, "resolution": 32, "native_resolution": 32,
                                    "fit": "pad", "dtype": "float32"}
    assert record["guidance"]["method"] == "relevance" and record["guidance"]["predictor"] is None
    assert record["seed"] == 4 and record["instruction_truncated"] is False
    assert record["input"]["original_size"] == [40, 56] and record["input"]["bit_depth"] == 16
    assert record["input"]["content_box"] == [4, 0, 23, 32]  # letterboxed: 40x56 -> 23x32 on a 32 canvas
    t = record["timings"]
    assert t["compile_s"] > 0 and t["run_s"] > 0 and "plain_ip2p_run_s" in t
    guidance = np.load(o / "guidance.npy")
    assert guidance.dtype == np.float32 and guidance.shape == (16, 16)
    # The left-side prior (the patient's left is the image's right) bounds where the mask can be.
    mask = np.asarray(Image.open(o / "mask.png")) > 0
    assert 0 < mask.mean() < 1 and not mask[:, : 56 // 2 - 4].any()
    assert 0 < record["mask_fraction"] < 1


def test_dicom_in_png_out_and_unparseable_instruction_warns(tmp_path, capsys, model_dir):
    dcm = write_dicom(tmp_path / "x.dcm")
    code, out, err = run(capsys, "--model", model_dir, "--image", dcm, "--instruction", "make it look healthier",
                         "--out", tmp_path / "o", "--steps", 1, "--resolution", 64, "--relevance-draws", 2)
    assert code == 0, err
    edited = Image.open(tmp_path / "o" / "edited.png")
    assert edited.size == (40, 48) and edited.mode.startswith("I")  # DICOM in -> 16-bit PNG at the original size
    assert Image.open(tmp_path / "o" / "mask.png").size == (40, 48)
    record = json.loads((tmp_path / "o" / "edit.json").read_text())
    assert record["priors"]["whole_image"] and record["warnings"]
    assert record["input"]["kind"] == "dicom"
    assert any("not understood" in w for w in record["warnings"])
    assert "warning:" in out and "not understood" in out
    assert record["parsed"]["unparsed"] == ["make it look healthier"]
    assert record["parameters"]["resolution"] == 64 and record["parameters"]["native_resolution"] == 32
    assert record["parameters"]["relevance_draws"] == 2
    assert np.load(tmp_path / "o" / "guidance.npy").shape == (32, 32)


def test_batch_csv_in_batches_of_two_same_seed_same_result(tmp_path, capsys, model_dir):
    write_png16(tmp_path / "a.png")
    write_png16(tmp_path / "b.png", 32, 32)
    # Rows 0 and 2 are the same edit; they run in different calls (the second padded to the batch of 2).
    (tmp_path / "e.csv").write_text("image,instruction,seed\na.png,Add the finding of edema.,3\n"
                                    "b.png,Remove the finding of pneumothorax.,\na.png,Add the finding of edema.,3\n")
    code, out, err = run(capsys, "--model", model_dir, "--batch", tmp_path / "e.csv", "--out", tmp_path / "o",
                         "--steps", 1, "--batch-size", 2)
    assert code == 0, err
    o = tmp_path / "o"
    assert sorted(p.name for p in o.iterdir()) == ["0000_a", "0001_b", "0002_a"]
    records = [json.loads((o / d / "edit.json").read_text()) for d in ("0000_a", "0001_b", "0002_a")]
    assert [r["seed"] for r in records] == [3, 0, 3]
    assert [r["timings"]["edits_in_call"] for r in records] == [2, 2, 1]
    assert records[0]["timings"]["compile_s"] > 0 and records[1]["timings"]["compile_s"] == 0.0
    assert records[2]["timings"]["compile_s"] == 0.0  # the padded last batch reused the program
    for name in ("edited.png", "mask.png"):
        np.testing.assert_array_equal(np.asarray(Image.open(o / "0000_a" / name)),
                                      np.asarray(Image.open(o / "0002_a" / name)))
    np.testing.assert_array_equal(np.load(o / "0000_a" / "guidance.npy"), np.load(o / "0002_a" / "guidance.npy"))


def test_letterboxed_input_gets_the_prior_of_its_content_box_padded_like_the_image(tmp_path, model_dir):
    from x2x_jax.editing.priors import prior_for_instruction

    editor = api.Editor(model_dir)
    text = "Add the finding of right pleural effusion."
    p = editor.prepare(api.Request(str(write_png16(tmp_path / "wide.png", 40, 80)), text))
    top, left, h, w = p.meta.content_box
    assert (top, left, h, w) == (8, 0, 16, 32)
    np.testing.assert_array_equal(p.prior[top:top + h, left:left + w], prior_for_instruction(text, h, w)[0])
    outside = np.ones_like(p.prior, bool)
    outside[top:top + h, left:left + w] = False
    assert p.prior.max() > 0 and not p.prior[outside].any()
    assert np.all(p.image[outside] == -1.0)  # the image is padded with black


def test_default_run_twice_replaces_its_outputs(tmp_path, capsys, monkeypatch, model_dir):
    # No --image / --instruction / --out: the shipped example into ./edit_out (with a test model standing in for
    # the shipped one); a second run replaces the files instead of failing.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(api, "DEFAULT_MODEL", model_dir)
    for seed in (0, 1):
        code, out, err = run(capsys, "--steps", 1, "--seed", seed)
        assert code == 0, err
        assert {p.name for p in (tmp_path / "edit_out").iterdir()} == OUTPUTS
        record = json.loads((tmp_path / "edit_out" / "edit.json").read_text())
        assert record["seed"] == seed and record["image"] == str(api.DEFAULT_EXAMPLE)
        assert record["instruction"] == api.DEFAULT_EXAMPLE_INSTRUCTION.read_text().strip()
    assert [p.name for p in tmp_path.iterdir()] == ["edit_out"]


@pytest.fixture(scope="module")
def four_channel_model_dir(tmp_path_factory, tokenizer):  # noqa: F811
    """A text-to-image (4-channel) UNet: loads fine, but is not an InstructPix2Pix model."""
    from tests.convert.test_diffusers_bridge import TINY_UNET

    return write_torch_pipeline(tmp_path_factory.mktemp("pipe4") / "sd", torch_models(seed=6, unet=dict(
        TINY_UNET, in_channels=4)), tokenizer)


@pytest.mark.parametrize("case", ["unreadable", "empty_instruction", "tau", "steps", "missing_model",
                                  "incompatible_model", "text_to_image_model", "missing_image_in_batch",
                                  "resolution", "seed_in_batch", "empty_instruction_in_batch",
                                  "no_guidance_predictor", "guidance_model_without_learned",
                                  "mismatched_guidance_predictor", "relevance_draws_with_learned"])
def test_bad_input_one_line_error_nonzero_exit_nothing_written(tmp_path, capsys, model_dir, four_channel_model_dir,
                                                              case):
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
    elif case == "text_to_image_model":
        args[1] = four_channel_model_dir
    elif case == "missing_image_in_batch":
        (tmp_path / "e.csv").write_text(f"image,instruction\n{good},Add the finding of edema.\nmissing.png,x\n")
        args = ["--model", model_dir, "--batch", tmp_path / "e.csv", "--out", out, "--steps", 1]
    elif case == "resolution":
        args += ["--resolution", 30]
    elif case == "seed_in_batch":
        (tmp_path / "e.csv").write_text(f"image,instruction,seed\n{good},Add the finding of edema.,-1\n")
        args = ["--model", model_dir, "--batch", tmp_path / "e.csv", "--out", out, "--steps", 1]
    elif case == "empty_instruction_in_batch":
        (tmp_path / "e.csv").write_text(f"image,instruction\n{good},Add the finding of edema.\n{good},\n")
        args = ["--model", model_dir, "--batch", tmp_path / "e.csv", "--out", out, "--steps", 1]
    elif case == "no_guidance_predictor":  # the model dir has no guidance/
        args += ["--guidance", "learned"]
    elif case == "guidance_model_without_learned":
        args += ["--guidance-model", save_predictor(tmp_path / "g")]
    elif case == "mismatched_guidance_predictor":  # 16-d text states; the model's are 32-d
        args += ["--guidance", "learned", "--guidance-model", save_predictor(tmp_path / "g", cross_attention_dim=16)]
    elif case == "relevance_draws_with_learned":
        args += ["--guidance", "learned", "--guidance-model", save_predictor(tmp_path / "g"), "--relevance-draws", 2]
    code, stdout, err = run(capsys, *args)
    assert code == 2
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


def test_bad_input_leaves_an_existing_out_folder_as_it_was(tmp_path, capsys, model_dir):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("earlier results")
    code, _, err = run(capsys, "--model", model_dir, "--image", tmp_path / "missing.png", "--instruction",
                       "Add the finding of edema.", "--out", out, "--steps", 1)
    assert code == 2 and err.startswith("error: ")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_failure_while_writing_leaves_nothing_partial(tmp_path, monkeypatch, model_dir):
    editor = api.Editor(model_dir)
    real_write, calls = api.Editor.write, []

    def failing_write(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(api.Editor, "write", failing_write)
    img = str(write_png16(tmp_path / "a.png", 32, 32))
    requests = [api.Request(img, "Add the finding of edema."), api.Request(img, "Add the finding of edema.", 1)]
    with pytest.raises(OSError, match="disk full"):
        api.edit_into(editor, requests, api.Settings(steps=1), tmp_path / "o", subfolders=True)
    assert len(calls) == 2  # the first edit was written (into the temporary folder) before the failure
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def save_predictor(dst, cross_attention_dim=32, seed=0):
    """A random guidance predictor for the tiny test model (4-channel latents, 32-d text states)."""
    import jax

    from x2x_jax.models.guidance import GuidancePredictor, init_params, save_guidance

    model = GuidancePredictor(latent_channels=4, cross_attention_dim=cross_attention_dim, block_out_channels=(8, 16),
                              attention_heads=2)
    return save_guidance(dst, model, init_params(model, jax.random.key(seed), (8, 8)))


def test_learned_guidance_from_a_given_folder_is_recorded(tmp_path, capsys, model_dir):
    img = write_png16(tmp_path / "in.png", 32, 32)
    predictor = save_predictor(tmp_path / "g")
    code, out, err = run(capsys, "--model", model_dir, "--image", img, "--instruction", "Add the finding of edema.",
                         "--out", tmp_path / "o", "--steps", 2, "--guidance", "learned", "--guidance-model", predictor)
    assert code == 0, err
    assert {p.name for p in (tmp_path / "o").iterdir()} == OUTPUTS
    record = json.loads((tmp_path / "o" / "edit.json").read_text())
    assert record["guidance"]["method"] == "learned" and record["guidance"]["predictor"] == str(predictor)


@pytest.mark.skipif(not (api.DEFAULT_MODEL / api.GUIDANCE_FOLDER / "config.json").is_file(),
                    reason="no shipped guidance predictor")
def test_learned_guidance_on_the_shipped_model(tmp_path, capsys):
    code, out, err = run(capsys, "--guidance", "learned", "--steps", 2, "--out", tmp_path / "o")
    assert code == 0, err
    assert {p.name for p in (tmp_path / "o").iterdir()} == OUTPUTS
    record = json.loads((tmp_path / "o" / "edit.json").read_text())
    assert record["guidance"]["method"] == "learned"
    assert record["guidance"]["predictor"] == str(api.DEFAULT_MODEL / api.GUIDANCE_FOLDER)
    assert 0.0 < record["mask_fraction"] < 1.0
