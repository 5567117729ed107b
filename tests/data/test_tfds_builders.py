"""The TFDS builders build and read back without TensorFlow; bad MIMIC rows are reported or fail the build."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from x2x_jax.data import instructions, io, synthetic
from x2x_jax.data.tfds import MimicEditInstruction, MimicEditInstructionConfig, SynthCxrEdit, SynthCxrEditConfig
from x2x_jax.data.tfds._common import edits_from_json, unit_to_uint8
from x2x_jax.data.tfds.mimic_edit_instruction import MAX_BAD_FRACTION_ENV, REPORT_NAME
from x2x_jax.errors import DataError

REPO = Path(__file__).resolve().parents[2]
TINY = 64


def _no_tensorflow():
    assert importlib.util.find_spec("tensorflow") is None
    assert "tensorflow" not in sys.modules


def _dicom_id(i: int, role: str) -> str:
    """MIMIC-CXR-style dicom id: five dash-separated 8-hex-digit groups."""
    rng = np.random.default_rng([i, role == "past"])
    return "-".join(f"{int(rng.integers(2**32)):08x}" for _ in range(5))


def _write_dicom(path: Path, pixels: np.ndarray) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def _write_image(folder: Path, image_id: str, kind: str, seed: int) -> Path:
    """A non-square grey image (so fit="pad" matters) from the synthetic renderer, as PNG / JPEG / DICOM."""
    image = synthetic.to_uint8(synthetic.generate_example(seed, 0, 48)["past"])[:, 6:42]
    if kind == "dcm":
        path = folder / f"{image_id}.dcm"
        _write_dicom(path, image.astype(np.uint16) * 16)
    else:
        path = folder / f"{image_id}.{kind}"
        Image.fromarray(image).save(path)
    return path


def make_release(root: Path, good: int = 9, missing: int = 1, corrupt: int = 1) -> dict:
    """A fake MIMIC-EDIT-INSTRUCTION manual dir; returns {csv_row: (past_path, current_path)} of the good rows."""
    (root / "past").mkdir(parents=True)
    (root / "current").mkdir()
    texts = ["Add the finding of left pleural effusion.", "Remove the finding of edema.",
             "Change the level of cardiomegaly from mild to severe."]
    kinds = ["png", "jpg", "dcm"]
    rows, good_paths = [], {}
    for i in range(good + missing + corrupt):
        past_id, current_id = _dicom_id(i, "past"), _dicom_id(i, "current")
        if i < good:
            past = _write_image(root / "past", past_id, kinds[i % 3], seed=2 * i)
            current = _write_image(root / "current", current_id, kinds[(i + 1) % 3], seed=2 * i + 1)
            good_paths[i] = (past, current)
            if i % 2:  # the released CSV may name the file with its extension
                past_id = past.name
        elif i < good + missing:
            _write_image(root / "past", past_id, "png", seed=i)  # current never written
        else:
            _write_image(root / "past", past_id, "png", seed=i)
            (root / "current" / f"{current_id}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        rows.append({"split": ("train", "val", "test")[i % 3], "current_dicom_id": current_id,
                     "past_dicom_id": past_id, "instruction": texts[i % 3],
                     "location": "left" if i % 3 == 0 else "", "severity": "", "radiologist": f"r{i}"})
    with open(root / "instructions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return good_paths


def _tiny_mimic(**kwargs) -> MimicEditInstructionConfig:
    return MimicEditInstructionConfig(name=f"test{TINY}", resolution=TINY, **kwargs)


def _prepare(builder, manual_dir):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))


def test_mimic_builds_without_tensorflow_reads_back_and_reports_bad_rows(tmp_path):
    good = make_release(tmp_path / "release")
    builder = MimicEditInstruction(config=_tiny_mimic(), data_dir=tmp_path / "data", max_bad_fraction=0.25)
    _prepare(builder, tmp_path / "release")
    _no_tensorflow()

    sources = {s: tfds.data_source(f"mimic_edit_instruction/test{TINY}", split=s, data_dir=tmp_path / "data")
               for s in ("train", "val", "test")}
    records = {int(r["csv_row"]): r for src in sources.values() for r in src}
    assert sorted(records) == sorted(good)
    assert [len(sources[s]) for s in ("train", "val", "test")] == [3, 3, 3]

    for row, (past_path, current_path) in good.items():
        record = records[row]
        for key, path in (("past", past_path), ("current", current_path)):
            assert record[key].dtype == np.uint8 and record[key].shape == (TINY, TINY, 1)
            expected = unit_to_uint8(io.resize_to_model(io.load_array(path)[0], TINY, "pad"))
            np.testing.assert_array_equal(record[key][..., 0], expected)
        text = record["instruction"].decode()
        assert edits_from_json(record["edits"]) == instructions.parse(text).edits
        assert record["parse_complete"]
        assert record["location"] == (b"left" if row % 3 == 0 else b"")
        assert json.loads(record["extra"]) == {"radiologist": f"r{row}"}
        assert tuple(record["past_original_hw"]) == (48, 36)

    report = tmp_path / "data" / "mimic_edit_instruction" / f"test{TINY}" / "1.0.0" / REPORT_NAME
    with open(report) as f:
        skipped = list(csv.DictReader(f))
    assert [int(r["csv_row"]) for r in skipped] == [9, 10]
    assert skipped[0]["reason"].startswith("current image missing")
    assert skipped[1]["reason"].startswith("current image unreadable") and ".jpg" in skipped[1]["reason"]


def test_mimic_build_fails_over_the_bad_fraction(tmp_path, monkeypatch):
    make_release(tmp_path / "release", good=8, missing=0, corrupt=2)  # found only when decoding
    monkeypatch.delenv(MAX_BAD_FRACTION_ENV, raising=False)
    builder = MimicEditInstruction(config=_tiny_mimic(), data_dir=tmp_path / "data")  # default limit: 1 %
    with pytest.raises(DataError, match=r"2 of 10 rows \(20\.00%\) are bad, more than the allowed 1\.00%"):
        _prepare(builder, tmp_path / "release")
    config_dir = tmp_path / "data" / "mimic_edit_instruction" / f"test{TINY}"
    assert not (config_dir / "1.0.0").exists()
    with open(config_dir / "skipped_rows-1.0.0-FAILED.csv") as f:
        assert len(list(csv.DictReader(f))) == 2

    # The environment variable raises the limit; a successful build removes the stale failure report.
    monkeypatch.setenv(MAX_BAD_FRACTION_ENV, "0.2")
    _prepare(MimicEditInstruction(config=_tiny_mimic(), data_dir=tmp_path / "data"), tmp_path / "release")
    assert (config_dir / "1.0.0" / REPORT_NAME).is_file()
    assert not (config_dir / "skipped_rows-1.0.0-FAILED.csv").exists()


def test_mimic_missing_files_fail_before_decoding(tmp_path, monkeypatch):
    make_release(tmp_path / "release", good=3, missing=3, corrupt=0)
    builder = MimicEditInstruction(config=_tiny_mimic(), data_dir=tmp_path / "data", max_bad_fraction=0.1)
    monkeypatch.setattr("x2x_jax.data.tfds.mimic_edit_instruction._load_pair",
                        lambda job: pytest.fail("decoded an image although the build must fail first"))
    with pytest.raises(DataError, match="3 of 6 rows"):
        _prepare(builder, tmp_path / "release")


def test_mimic_csv_without_required_column_names_the_file(tmp_path):
    root = tmp_path / "release"
    for folder in ("past", "current"):
        (root / folder).mkdir(parents=True)
    (root / "instructions.csv").write_text("split,past_dicom_id,instruction\ntrain,a,Add edema\n")
    builder = MimicEditInstruction(config=_tiny_mimic(), data_dir=tmp_path / "data")
    with pytest.raises(DataError, match=r"instructions\.csv: missing column\(s\) \['current_dicom_id'\]"):
        _prepare(builder, root)


def test_synthetic_builds_tiny_split_and_reads_back(tmp_path):
    config = SynthCxrEditConfig(name="tiny", resolution=32, v2=True,
                                split_sizes=(("train", 4), ("val", 2), ("test", 0)))
    SynthCxrEdit(config=config, data_dir=tmp_path).download_and_prepare()
    _no_tensorflow()
    train = tfds.data_source("synth_cxr_edit/tiny", split="train", data_dir=tmp_path)
    assert len(train) == 4
    assert len(tfds.data_source("synth_cxr_edit/tiny", split="val", data_dir=tmp_path)) == 2
    for record in train:
        expected = synthetic.generate_example(0, int(record["index"]), 32, v2=True, split="train")
        np.testing.assert_array_equal(record["past"][..., 0], synthetic.to_uint8(expected["past"]))
        np.testing.assert_array_equal(record["current"][..., 0], synthetic.to_uint8(expected["current"]))
        np.testing.assert_array_equal(record["mask"][..., 0], expected["mask"].astype(np.uint8))
        assert record["instruction"].decode() == expected["instruction"]
        assert edits_from_json(record["edits"]) == expected["edits"]
        assert record["example_id"].decode() == expected["example_id"]
        assert record["identity"]["sex"].decode() == expected["identity"]["sex"]
        assert record["identity"]["age_years"] == pytest.approx(expected["identity"]["age_years"], rel=1e-6)
        np.testing.assert_array_equal(record["current_labels"], expected["current_labels"])
        np.testing.assert_array_equal(record["past_laterality"], expected["past_laterality"])


def test_named_configs():
    assert [c.name for c in MimicEditInstruction.BUILDER_CONFIGS] == ["v1", "v2", "v1_256", "v2_256"]
    assert {c.name: c.resolution for c in SynthCxrEdit.BUILDER_CONFIGS}["v1"] == 64
    assert {(c.resolution, c.v2) for c in SynthCxrEdit.BUILDER_CONFIGS} == {
        (r, v2) for r in (64, 128, 256, 512) for v2 in (False, True)}


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["synth_cxr_edit", "mimic_edit_instruction"])
def test_build_cli_without_tensorflow(tmp_path, dataset):
    command = [sys.executable, "-m", "x2x_jax.data.tfds", "build", dataset, "--data_dir", str(tmp_path / "data")]
    env = {**os.environ, MAX_BAD_FRACTION_ENV: "0.3"}
    if dataset == "synth_cxr_edit":
        command += ["--config", "v2", "--max_examples_per_split", "2"]
        expected = {"train": 2, "val": 2, "test": 2}
    else:
        make_release(tmp_path / "release", good=6)
        command += ["--config", "v1_256", "--manual_dir", str(tmp_path / "release")]
        expected = {"train": 2, "val": 2, "test": 2}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    config = "v2" if dataset == "synth_cxr_edit" else "v1_256"
    for split, n in expected.items():
        assert len(tfds.data_source(f"{dataset}/{config}", split=split, data_dir=tmp_path / "data")) == n
    if dataset == "mimic_edit_instruction":
        assert "skipped 2 (25.00%: 1 current image missing, 1 current image unreadable)" in done.stderr


@pytest.mark.slow
def test_mimic_build_with_worker_processes_writes_the_same_records(tmp_path):
    make_release(tmp_path / "release", good=6, missing=0, corrupt=1)
    records = []
    for workers in (0, 2):
        builder = MimicEditInstruction(config=_tiny_mimic(), data_dir=tmp_path / f"data{workers}",
                                       max_bad_fraction=0.2, num_workers=workers)
        _prepare(builder, tmp_path / "release")
        records.append({int(r["csv_row"]): r for split in ("train", "val", "test")
                        for r in builder.as_data_source(split)})
    assert sorted(records[0]) == sorted(records[1]) == [0, 1, 2, 3, 4, 5]
    for row, record in records[0].items():
        for key in ("past", "current", "edits", "extra"):
            np.testing.assert_array_equal(record[key], records[1][row][key])
