"""edit.py end to end: outputs at the input's size and depth, warnings, and bad input leaving nothing behind."""

import json

import numpy as np
import pydicom
import pytest
from PIL import Image

from tests.oracle import torch_models, write_torch_pipeline
from x2x_jax.cli import edit as edit_cli
from x2x_jax.editing import api
from x2x_jax.outputs import MARKER

OUTPUTS = {"edited.png", "guidance.png", "guidance.npy", "mask.png", "figure.png", "edit.json", MARKER}


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


def write_dicom(path, h=48, w=40, photometric="MONOCHROME2", pixels=None, **tags):
    """A 12-bit DX DICOM (default pixels: a ramp modulo 4096); `tags` are set as given."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = h, w, 16, 12, 11
    ds.PixelRepresentation, ds.SamplesPerPixel, ds.PhotometricInterpretation = 0, 1, photometric
    for key, value in tags.items():
        setattr(ds, key, value)
    if pixels is None:
        pixels = np.arange(h * w).reshape(h, w) % 4096
    ds.PixelData = np.asarray(pixels).astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_requests_csv_in_batches_of_two_same_seed_same_result(tmp_path, capsys, model_dir):
    write_png16(tmp_path / "a.png")
    write_png16(tmp_path / "b.png", 32, 32)
    # Rows 0 and 2 are the same edit; they run in different calls (the second padded to the batch of 2).
    (tmp_path / "e.csv").write_text("image,instruction,seed\na.png,Add the finding of edema.,3\n"
                                    "b.png,Remove the finding of pneumothorax.,\na.png,Add the finding of edema.,3\n")
    code, out, err = run(capsys, "--model", model_dir, "--requests", tmp_path / "e.csv", "--out", tmp_path / "o",
                         "--steps", 1, "--batch-size", 2)
    assert code == 0, err
    assert "deprecated" not in err
    o = tmp_path / "o"
    assert sorted(p.name for p in o.iterdir()) == [MARKER, "0000_a", "0001_b", "0002_a"]
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


@pytest.mark.slow
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
    from tests.oracle import TINY_UNET

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
        args = ["--model", model_dir, "--requests", tmp_path / "e.csv", "--out", out, "--steps", 1]
    elif case == "resolution":
        args += ["--resolution", 30]
    elif case == "seed_in_batch":
        (tmp_path / "e.csv").write_text(f"image,instruction,seed\n{good},Add the finding of edema.,-1\n")
        args = ["--model", model_dir, "--requests", tmp_path / "e.csv", "--out", out, "--steps", 1]
    elif case == "empty_instruction_in_batch":
        (tmp_path / "e.csv").write_text(f"image,instruction\n{good},Add the finding of edema.\n{good},\n")
        args = ["--model", model_dir, "--requests", tmp_path / "e.csv", "--out", out, "--steps", 1]
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


@pytest.mark.slow
def test_long_instruction_is_truncated_with_a_warning(tmp_path, capsys, model_dir):
    img = write_png16(tmp_path / "in.png", 32, 32)
    text = "Add the finding of edema. " + "Remove the finding of pneumothorax. " * 20
    code, out, err = run(capsys, "--model", model_dir, "--image", img, "--instruction", text, "--out",
                         tmp_path / "o", "--steps", 1)
    assert code == 0, err
    assert "truncated" in out
    assert any("truncated" in w for w in json.loads((tmp_path / "o" / "edit.json").read_text())["warnings"])


@pytest.mark.slow
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
    (out / MARKER).write_text('{"command": "x2x-edit", "files": ["keep.txt"]}')  # an earlier edit: may be replaced
    code, _, err = run(capsys, "--model", model_dir, "--image", tmp_path / "missing.png", "--instruction",
                       "Add the finding of edema.", "--out", out, "--steps", 1)
    assert code == 2 and err.startswith("error: ") and "missing.png" in err
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "keep.txt"]
    assert (out / "keep.txt").read_text() == "earlier results"


@pytest.mark.slow
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

    from x2x_jax.convert.guidance import save_guidance
    from x2x_jax.models.guidance import GuidancePredictor, init_params

    model = GuidancePredictor(latent_channels=4, cross_attention_dim=cross_attention_dim, block_out_channels=(8, 16),
                              attention_heads=2)
    return save_guidance(dst, model, init_params(model, jax.random.key(seed), (8, 8)))


@pytest.mark.slow
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
@pytest.mark.slow
def test_learned_guidance_on_the_shipped_model(tmp_path, capsys):
    code, out, err = run(capsys, "--guidance", "learned", "--steps", 2, "--out", tmp_path / "o")
    assert code == 0, err
    assert {p.name for p in (tmp_path / "o").iterdir()} == OUTPUTS
    record = json.loads((tmp_path / "o" / "edit.json").read_text())
    assert record["guidance"]["method"] == "learned"
    assert record["guidance"]["predictor"] == str(api.DEFAULT_MODEL / api.GUIDANCE_FOLDER)
    assert 0.0 < record["mask_fraction"] < 1.0


# ---------------------------------------------------------------------------------------------------------------
# Full resolution: outside mask.png the input comes back bit for bit; DICOM in -> DICOM out


def _gradient_pixels(h, w, top, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    smooth = 0.5 + 0.35 * np.sin(y / 9.0) * np.cos(x / 13.0)
    return np.clip(np.rint((smooth + rng.normal(0, 0.05, (h, w))) * top), 0, top)


def _write_dicom_windowed(path, h, w, photometric, seed):
    from pydicom.uid import generate_uid

    return write_dicom(path, h, w, photometric, _gradient_pixels(h, w, 4095, seed),
                       StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid(), PatientID="ANON-7",
                       RescaleSlope=2, RescaleIntercept=-1024,  # modality values -1024 .. 7166
                       WindowCenter=2500, WindowWidth=6000)


def _fullres_inputs(folder):
    """An 8-bit PNG, a 16-bit PNG, a JPEG, a MONOCHROME1 and a MONOCHROME2 DICOM; none square, none a multiple of
    the model size. -> {name: (path, expected input pixels as stored)}"""
    inputs = {}
    png8 = _gradient_pixels(150, 110, 255, 1).astype(np.uint8)
    Image.fromarray(png8).save(folder / "png8.png")
    inputs["png8"] = (folder / "png8.png", png8)
    png16 = _gradient_pixels(97, 131, 65535, 2).astype(np.uint16)
    Image.fromarray(png16).save(folder / "png16.png")
    inputs["png16"] = (folder / "png16.png", png16)
    Image.fromarray(_gradient_pixels(120, 77, 255, 3).astype(np.uint8)).save(folder / "jpeg.jpg", quality=85)
    inputs["jpeg"] = (folder / "jpeg.jpg", np.asarray(Image.open(folder / "jpeg.jpg")))  # the decoded values
    for name, photometric, hw in (("mono1", "MONOCHROME1", (140, 101)), ("mono2", "MONOCHROME2", (66, 90))):
        path = _write_dicom_windowed(folder / f"{name}.dcm", *hw, photometric, seed=len(name) + hw[0])
        inputs[name] = (path, pydicom.dcmread(path).pixel_array)
    return inputs


def _bilinear_mask(guidance, size, box, height, width, tau):
    """An independent bilinear interpolation of G (latent grid over the canvas) at the input's pixel centres."""
    from scipy import ndimage

    top, left, h, w = box
    f = size / guidance.shape[0]
    rows = (top + (np.arange(height) + 0.5) * h / height) / f - 0.5
    cols = (left + (np.arange(width) + 0.5) * w / width) / f - 0.5
    yy, xx = np.meshgrid(rows, cols, indexing="ij")
    g = ndimage.map_coordinates(guidance.astype(np.float64), [yy, xx], order=1, mode="nearest")
    return g >= tau, np.abs(g - tau) < 1e-5


@pytest.mark.slow
def test_fullres_batch_of_mixed_formats_and_sizes_keeps_every_outside_pixel(tmp_path, capsys, model_dir):
    from x2x_jax.data.io import load_source

    inputs = _fullres_inputs(tmp_path)
    rows = "".join(f"{path.name},Add the finding of left pleural effusion.,{i}\n"
                   for i, (path, _) in enumerate(inputs.values()))
    (tmp_path / "e.csv").write_text("image,instruction,seed\n" + rows)
    code, out, err = run(capsys, "--model", model_dir, "--batch", tmp_path / "e.csv", "--out", tmp_path / "o",
                         "--steps", 2, "--tau", 0.15, "--batch-size", 2)
    assert code == 0, err
    # the old spelling of --requests still works, with a one-line deprecation warning
    assert "warning: --batch is deprecated (it read like --batch-size): use --requests CSV" in err.splitlines()
    for i, (name, (path, stored)) in enumerate(inputs.items()):
        o = tmp_path / "o" / f"{i:04d}_{path.stem}"
        record = json.loads((o / "edit.json").read_text())
        mask = np.asarray(Image.open(o / "mask.png")) > 0
        assert mask.shape == stored.shape[:2], name
        assert 0 < mask.mean() < 1, name  # a partial mask: the check below means something
        assert record["mask_fraction"] == pytest.approx(mask.mean())
        # mask.png is bilinear G >= tau at the input's pixels, not the latent grid blown up.
        expected, ties = _bilinear_mask(np.load(o / "guidance.npy"), 32, record["input"]["content_box"],
                                        *stored.shape[:2], 0.15)
        assert np.array_equal(mask[~ties], expected[~ties]), name
        edited = np.asarray(Image.open(o / "edited.png"))
        if name.startswith("mono"):
            assert (o / "edited.dcm").is_file() and "edited.dcm" in record["outputs"]
            written = pydicom.dcmread(o / "edited.dcm").pixel_array
            np.testing.assert_array_equal(written[~mask], stored[~mask])
            assert not np.array_equal(written[mask], stored[mask])  # the edit did change the inside
            # edited.png holds the displayed values: outside the mask, exactly the input's display.
            source = load_source(path)
            display = np.rint(source.to_display(source.pixels) * 65535)
            assert edited.dtype == np.uint16
            np.testing.assert_array_equal(edited[~mask], display[~mask])
        else:
            assert not (o / "edited.dcm").exists() and "edited.dcm" not in record["outputs"]
            assert edited.dtype == stored.dtype and edited.shape == stored.shape
            np.testing.assert_array_equal(edited[~mask], stored[~mask])
            assert not np.array_equal(edited[mask], stored[mask])
        assert record["output"]["size"] == list(stored.shape[:2])
        assert record["output"]["feather_px"] >= 1 and record["output"]["keep_detail"] is api.KEEP_DETAIL_DEFAULT
        assert record["timings"]["composite_s"] >= 0


@pytest.mark.slow
def test_dicom_out_tags_and_stored_values(tmp_path, capsys, model_dir):
    src = _write_dicom_windowed(tmp_path / "in.dcm", 140, 101, "MONOCHROME1", seed=3)
    code, out, err = run(capsys, "--model", model_dir, "--image", src, "--instruction",
                         "Add the finding of right pleural effusion.", "--out", tmp_path / "o", "--steps", 1,
                         "--tau", 0.15, "--feather", 0)
    assert code == 0, err
    before, after = pydicom.dcmread(src), pydicom.dcmread(tmp_path / "o" / "edited.dcm")
    for tag in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                "PhotometricInterpretation", "RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth",
                "StudyInstanceUID", "PatientID", "SOPClassUID"):
        assert after[tag].value == before[tag].value, tag
    assert after.SOPInstanceUID != before.SOPInstanceUID
    assert after.file_meta.MediaStorageSOPInstanceUID == after.SOPInstanceUID
    assert after.SeriesInstanceUID != before.SeriesInstanceUID
    assert list(after.ImageType) == ["DERIVED", "SECONDARY"]
    assert "right pleural effusion" in after.DerivationDescription
    assert after.SourceImageSequence[0].ReferencedSOPInstanceUID == before.SOPInstanceUID
    added = {e.keyword for e in after} - {e.keyword for e in before}
    assert added <= {"ImageType", "DerivationDescription", "SourceImageSequence"}  # no identifiers added
    mask = np.asarray(Image.open(tmp_path / "o" / "mask.png")) > 0
    np.testing.assert_array_equal(after.pixel_array[~mask], before.pixel_array[~mask])
    assert after.pixel_array.min() >= 0 and after.pixel_array.max() <= 4095  # within BitsStored
    record = json.loads((tmp_path / "o" / "edit.json").read_text())
    assert record["output"]["feather_px"] == 0 and record["output"]["dicom"] is True


@pytest.mark.slow
def test_no_dicom_out_and_feather_recorded(tmp_path, capsys, model_dir):
    src = _write_dicom_windowed(tmp_path / "in.dcm", 66, 90, "MONOCHROME2", seed=4)
    code, _, err = run(capsys, "--model", model_dir, "--image", src, "--instruction", "Add the finding of edema.",
                       "--out", tmp_path / "o", "--steps", 1, "--no-dicom-out", "--feather", 3, "--no-keep-detail")
    assert code == 0, err
    assert {p.name for p in (tmp_path / "o").iterdir()} == OUTPUTS
    record = json.loads((tmp_path / "o" / "edit.json").read_text())
    assert record["output"]["feather_px"] == 3 and record["output"]["keep_detail"] is False
    assert record["output"]["feather_rule"].startswith("given")


def _big_png(path, width, height):
    """A valid 8-bit grey PNG of width x height (all black), written without holding it in memory."""
    import struct
    import zlib

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    comp, row, parts = zlib.compressobj(9), b"\x00" * (width + 1), []
    for _ in range(height):
        parts.append(comp.compress(row))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts))
                     + chunk(b"IEND", b""))
    return path


def _cmyk_jpeg(path):
    Image.new("CMYK", (64, 64), (10, 20, 30, 40)).save(path, format="JPEG")
    return path


def _fullres_bad_case(case, tmp_path):
    """-> (extra args replacing --image, expected words in the error)."""
    from tests.data import test_io

    if case == "dicom_without_pixel_data":
        test_io._no_pixel_data(tmp_path / "x.dcm")
        return ["--image", tmp_path / "x.dcm"], "no pixel data"
    if case == "multi_frame_dicom":
        test_io._multiframe_dicom(tmp_path / "x.dcm")
        return ["--image", tmp_path / "x.dcm"], "multi-frame"
    if case == "rgb_dicom":
        test_io._rgb_dicom(tmp_path / "x.dcm")
        return ["--image", tmp_path / "x.dcm"], "PhotometricInterpretation 'RGB'"
    if case == "ybr_dicom":
        ds = test_io.dicom_dataset(np.zeros((4, 4, 3), np.uint8), photometric="YBR_FULL", bits_stored=8,
                                   bits_allocated=8)
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
        return ["--image", tmp_path / "x.dcm"], "PhotometricInterpretation 'YBR_FULL'"
    if case == "compressed_without_decoder":
        from pydicom.encaps import encapsulate
        from pydicom.uid import JPEGLSLossless

        ds = test_io.dicom_dataset(np.zeros((40, 40), np.uint8), bits_stored=8, bits_allocated=8,
                                   syntax=JPEGLSLossless)
        ds.PixelData = encapsulate([b"\xff\xd8" + b"\0" * 30])
        ds["PixelData"].VR = "OB"
        ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
        return ["--image", tmp_path / "x.dcm"], "pip install"
    if case == "truncated_png":
        (tmp_path / "x.png").write_bytes(test_io._png_bytes()[:-20])
        return ["--image", tmp_path / "x.png"], "cannot decode PNG"
    if case == "cmyk_jpeg":
        return ["--image", _cmyk_jpeg(tmp_path / "x.jpg")], "CMYK"
    if case == "short_side_below_32":
        return ["--image", write_png16(tmp_path / "x.png", 31, 200)], "at least 32"
    if case == "above_pixel_limit":
        return ["--image", _big_png(tmp_path / "x.png", 8000, 5001)], "megapixels"
    if case == "negative_feather":
        return ["--image", write_png16(tmp_path / "x.png"), "--feather", -1], "--feather"
    if case == "out_not_writable":  # --out under a regular file: no folder can be made there
        (tmp_path / "file").write_text("x")
        return ["--image", write_png16(tmp_path / "x.png"), "--out", tmp_path / "file" / "o"], "is a file"
    if case == "dicom_out_for_png":
        return ["--image", write_png16(tmp_path / "x.png"), "--dicom-out"], "DICOM"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["dicom_without_pixel_data", "multi_frame_dicom", "rgb_dicom", "ybr_dicom",
                                  "compressed_without_decoder", "truncated_png", "cmyk_jpeg", "short_side_below_32",
                                  "above_pixel_limit", "negative_feather", "out_not_writable", "dicom_out_for_png"])
def test_fullres_bad_input_one_line_error_nothing_written(tmp_path, capsys, model_dir, case):
    extra, words = _fullres_bad_case(case, tmp_path)
    args = ["--model", model_dir, "--instruction", "Add the finding of edema.", "--out", tmp_path / "o",
            "--steps", 1, *extra]
    before = {p.name for p in tmp_path.iterdir()}
    code, _, err = run(capsys, *args)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err
    assert {p.name for p in tmp_path.iterdir()} == before  # no --out, no temporary folder


def test_shipped_examples_are_what_the_generator_makes():
    """The example files are reproducible: generate_example at the stated index and size, as 8-bit PNGs."""
    from x2x_jax.data.synthetic import generate_example

    folder = api.DEFAULT_EXAMPLE.parent
    for index, size in ((207, 256), (0, 64)):
        ex = generate_example(0, index, size, split="test")
        stem = folder / f"synth_test_{index:04d}"
        for suffix, image in (("", ex["past"]), ("_current", ex["current"])):
            expected = np.rint((image + 1) * 127.5).astype(np.uint8)
            np.testing.assert_array_equal(np.asarray(Image.open(f"{stem}{suffix}.png")), expected)
        np.testing.assert_array_equal(np.asarray(Image.open(f"{stem}_change_mask.png")) == 255, ex["mask"])
        assert stem.with_suffix(".txt").read_text().strip() == ex["instruction"]
    assert api.DEFAULT_EXAMPLE.name == "synth_test_0207.png"
