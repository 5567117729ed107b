"""TFDS builder `mimic_edit_instruction`: MIMIC-EDIT-INSTRUCTION (past image, instruction, current image) triples.

The release cannot be downloaded automatically (MIMIC-CXR needs a PhysioNet credential), so the builder reads a
manual directory laid out as released:

    <manual_dir>/instructions.csv         columns split (train|val|test), current_dicom_id, past_dicom_id,
                                          instruction, and any others (location, severity, ...)
    <manual_dir>/past/<past_dicom_id>     the image, with or without its extension in the id:
    <manual_dir>/current/<current_dicom_id>   <id>, <id>.jpg, <id>.jpeg, <id>.png, <id>.dcm, <id>.dicom (any case)

A config `vN` first looks for `instructions_vN.csv`, then `instructions.csv`. "validate"/"validation" in the split
column mean val.

Build (TensorFlow is not needed):

    tfds build mimic_edit_instruction --imports x2x_jax.data.tfds --config v1 \
        --manual_dir /data/mimic-edit-instruction --data_dir ~/tensorflow_datasets

or from Python:

    builder = MimicEditInstruction(config="v1_256", data_dir=..., max_bad_fraction=0.02, num_workers=8)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=...))
    source = builder.as_data_source("train")      # or tfds.data_source("mimic_edit_instruction/v1_256", ...)

Without `--config` the CLI builds every config. Configs: v1, v2 (512 px), v1_256, v2_256. They differ only in the
resolution and which CSV they prefer; the text is stored as written and parsed by `x2x_jax.data.instructions`.

Stored per example (ArrayRecord, so `tfds.data_source` can read it):
    past, current     uint8 (R, R, 1) grey, PNG-encoded on disk; `data_source` decodes them with Pillow. Images go
                      through `io.load_array` (DICOM windowing, MONOCHROME1 inversion) and `io.resize_to_model`
                      (config `fit`, default "pad": aspect kept, black margins, as at inference) and are rounded
                      to 8 bits: MIMIC-CXR-JPG, which the paper trained on, is 8-bit, and TFDS decodes 16-bit PNG
                      only through OpenCV.
    instruction       text as written.  edits: JSON list of `Edit` fields (`_common.edits_from_json`).
    parse_complete    whether the whole instruction parsed into edits.
    example_id, past_dicom_id, current_dicom_id, csv_row (0-based data row), past_original_hw, current_original_hw.
    one text feature per config `extra_columns` (default location, severity; "" when the CSV has no such column),
    extra             JSON object of every other CSV column.
Text comes back from `data_source` as bytes.

Bad rows (image missing or unreadable, unknown split, empty instruction) are skipped and listed with the reason in
`<data_dir>/mimic_edit_instruction/<config>/<version>/skipped_rows.csv`; counts go to the build log. When more
than `max_bad_fraction` of the CSV's rows are bad (default 1 %; builder argument `max_bad_fraction`, else
$X2X_MAX_BAD_FRACTION, else the config's field) the build fails with a `DataError`, nothing is written as a
dataset, and the list goes to `<data_dir>/mimic_edit_instruction/<config>/skipped_rows-<version>-FAILED.csv`.
Missing files are counted before any image is decoded, so a wrong manual_dir fails in seconds.

Decoding and resizing full-size radiographs dominates the build; `num_workers` (builder argument or
$X2X_TFDS_BUILD_WORKERS) > 0 spreads it over that many processes, keeping the output identical.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import itertools
import json
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from x2x_jax.data import instructions
from x2x_jax.data import io as image_io
from x2x_jax.data.tfds._common import edits_to_json, encode_png, unit_to_uint8
from x2x_jax.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"validate": "val", "validation": "val", "valid": "val"}
REQUIRED_COLUMNS = ("split", "current_dicom_id", "past_dicom_id", "instruction")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".dcm", ".dicom")
DEFAULT_MAX_BAD_FRACTION = 0.01
MAX_BAD_FRACTION_ENV = "X2X_MAX_BAD_FRACTION"
BUILD_WORKERS_ENV = "X2X_TFDS_BUILD_WORKERS"
REPORT_NAME = "skipped_rows.csv"
REPORT_COLUMNS = ("csv_row", "split", "past_dicom_id", "current_dicom_id", "reason")
_BUILTIN_FEATURES = (
    "past", "current", "instruction", "edits", "parse_complete", "example_id", "past_dicom_id",
    "current_dicom_id", "csv_row", "past_original_hw", "current_original_hw", "extra",
)


@dataclasses.dataclass(eq=False)
class MimicEditInstructionConfig(tfds.core.BuilderConfig):
    """resolution: stored image side (px). style: "v1" | "v2", picks instructions_<style>.csv when present.
    fit: `io.resize_to_model` fit. max_bad_fraction: the default limit on skipped rows (see the module doc).
    extra_columns: CSV columns stored as their own text features."""

    resolution: int = 512
    style: str = "v1"
    fit: str = "pad"
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION
    extra_columns: tuple[str, ...] = ("location", "severity")

    def __post_init__(self):
        if self.style not in ("v1", "v2"):
            raise ConfigError(f"MimicEditInstructionConfig.style must be 'v1' or 'v2', got {self.style!r}")
        if self.fit not in image_io.FITS:
            raise ConfigError(f"MimicEditInstructionConfig.fit must be one of {image_io.FITS}, got {self.fit!r}")
        if not 16 <= int(self.resolution) <= 4096:
            raise ConfigError(f"MimicEditInstructionConfig.resolution must be in [16, 4096], got {self.resolution}")
        clash = set(self.extra_columns) & set(_BUILTIN_FEATURES + REQUIRED_COLUMNS)
        if clash:
            raise ConfigError(f"MimicEditInstructionConfig.extra_columns may not name {sorted(clash)}")


@dataclasses.dataclass(frozen=True)
class _Row:
    csv_row: int
    split: str
    past_dicom_id: str
    current_dicom_id: str
    instruction: str
    columns: dict  # every CSV column -> value


@dataclasses.dataclass(frozen=True)
class _Job:
    """What a worker needs to load one row's images (picklable, no builder)."""

    past_path: str
    current_path: str
    resolution: int
    fit: str


class _ImageIndex:
    """Finds `<folder>/<id>` or `<folder>/<id><ext>`; lists the folder once instead of stat-ing per row."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.names = {entry.name for entry in os.scandir(folder) if entry.is_file()}

    def find(self, image_id: str) -> Path | None:
        if not image_id:
            return None
        if "/" in image_id or os.sep in image_id:  # ids with sub-folders: look them up directly
            for name in (image_id, *(image_id + ext for ext in _all_case(IMAGE_EXTENSIONS))):
                if (self.folder / name).is_file():
                    return self.folder / name
            return None
        for name in (image_id, *(image_id + ext for ext in _all_case(IMAGE_EXTENSIONS))):
            if name in self.names:
                return self.folder / name
        return None


def _all_case(extensions: Sequence[str]) -> list[str]:
    return [e for ext in extensions for e in (ext, ext.upper())]


def _load_pair(job: _Job) -> tuple[bytes, bytes, tuple[int, int], tuple[int, int]] | str:
    """(past PNG, current PNG, past (h, w), current (h, w)), or the reason the row is bad."""
    out = []
    for role, path in (("past", job.past_path), ("current", job.current_path)):
        try:
            grey, meta = image_io.load_array(path)
        except DataError as e:
            return f"{role} image unreadable: {e}"
        image = image_io.resize_to_model(grey, job.resolution, job.fit)
        out.append((encode_png(unit_to_uint8(image)), (meta.height, meta.width)))
    (past_png, past_hw), (current_png, current_hw) = out
    return past_png, current_png, past_hw, current_hw


def resolve_max_bad_fraction(argument: float | None, config_value: float) -> tuple[float, str]:
    """(limit, where it came from): builder argument, else $X2X_MAX_BAD_FRACTION, else the config."""
    if argument is not None:
        value, source = argument, "builder argument max_bad_fraction"
    elif os.environ.get(MAX_BAD_FRACTION_ENV, "").strip():
        raw = os.environ[MAX_BAD_FRACTION_ENV]
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"${MAX_BAD_FRACTION_ENV}={raw!r} is not a number") from None
        source = f"${MAX_BAD_FRACTION_ENV}"
    else:
        value, source = config_value, "config max_bad_fraction"
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"max_bad_fraction must be in [0, 1], got {value} (from {source})")
    return float(value), source


class _Report:
    """Skipped rows of one build."""

    def __init__(self, total: int):
        self.total = total
        self.skipped: list[dict] = []
        self.written = collections.Counter()
        self.partial_parses = 0

    def skip(self, row: _Row, reason: str) -> None:
        self.skipped.append(dict(csv_row=row.csv_row, split=row.split, past_dicom_id=row.past_dicom_id,
                                 current_dicom_id=row.current_dicom_id, reason=reason))

    @property
    def fraction(self) -> float:
        return len(self.skipped) / self.total if self.total else 0.0

    def reasons(self) -> collections.Counter:
        return collections.Counter(r["reason"].split(":")[0] for r in self.skipped)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=REPORT_COLUMNS)
            writer.writeheader()
            writer.writerows(sorted(self.skipped, key=lambda r: r["csv_row"]))


class MimicEditInstruction(tfds.core.GeneratorBasedBuilder):
    """MIMIC-EDIT-INSTRUCTION: past chest X-ray, edit instruction, current chest X-ray."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Grey 8-bit PNG images at the config's resolution, parsed edits as JSON."}
    BUILDER_CONFIGS = [
        MimicEditInstructionConfig(name="v1", style="v1", resolution=512, description="v1 instructions, 512 px"),
        MimicEditInstructionConfig(name="v2", style="v2", resolution=512, description="v2 instructions, 512 px"),
        MimicEditInstructionConfig(name="v1_256", style="v1", resolution=256,
                                   description="v1 instructions, 256 px"),
        MimicEditInstructionConfig(name="v2_256", style="v2", resolution=256,
                                   description="v2 instructions, 256 px"),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download MIMIC-EDIT-INSTRUCTION (instructions.csv) and the MIMIC-CXR(-JPG) images it names, and lay them out
    as <manual_dir>/instructions.csv, <manual_dir>/past/<past_dicom_id>[.jpg|.png|.dcm],
    <manual_dir>/current/<current_dicom_id>[.jpg|.png|.dcm]. Pass --manual_dir to `tfds build`.
    """

    def __init__(self, *, max_bad_fraction: float | None = None, num_workers: int | None = None,
                 file_format=None, **kwargs):
        self._max_bad_fraction_argument = max_bad_fraction
        self._num_workers_argument = num_workers
        self._report: _Report | None = None
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        size = config.resolution
        image = tfds.features.Image(shape=(size, size, 1), dtype=np.uint8, encoding_format="png")
        features = {
            "past": image,
            "current": image,
            "instruction": tfds.features.Text(),
            "edits": tfds.features.Text(),
            "parse_complete": np.bool_,
            "example_id": tfds.features.Text(),
            "past_dicom_id": tfds.features.Text(),
            "current_dicom_id": tfds.features.Text(),
            "csv_row": np.int64,
            "past_original_hw": tfds.features.Tensor(shape=(2,), dtype=np.int32),
            "current_original_hw": tfds.features.Tensor(shape=(2,), dtype=np.int32),
            **{column: tfds.features.Text() for column in config.extra_columns},
            "extra": tfds.features.Text(),
        }
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict(features),
            homepage="https://github.com/hgminn/InstructX2X",
        )

    # -- reading the manual directory ----------------------------------------------------------------------------

    def _csv_path(self, root: Path) -> Path:
        for name in (f"instructions_{self.builder_config.style}.csv", "instructions.csv"):
            if (root / name).is_file():
                return root / name
        raise DataError(f"{root}: no instructions_{self.builder_config.style}.csv or instructions.csv "
                        "(is --manual_dir the MIMIC-EDIT-INSTRUCTION folder?)")

    def _read_rows(self, path: Path) -> list[_Row]:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
            rows = []
            for index, record in enumerate(reader):
                record = {k: (v or "").strip() for k, v in record.items() if k is not None}
                split = record["split"].lower()
                rows.append(_Row(index, _SPLIT_ALIASES.get(split, split), record["past_dicom_id"],
                                 record["current_dicom_id"], record["instruction"], record))
        if not rows:
            raise DataError(f"{path}: no data rows")
        return rows

    def _split_generators(self, dl_manager):
        root = Path(dl_manager.manual_dir)
        csv_path = self._csv_path(root)
        rows = self._read_rows(csv_path)
        indexes = {}
        for role in ("past", "current"):
            if not (root / role).is_dir():
                raise DataError(f"{root}: no {role}/ image folder")
            indexes[role] = _ImageIndex(root / role)

        report = self._report = _Report(total=len(rows))
        self._csv = csv_path
        by_split: dict[str, list[tuple[_Row, _Job]]] = {s: [] for s in SPLITS}
        ext_hint = "|".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
        for row in rows:
            if row.split not in SPLITS:
                report.skip(row, f"unknown split: {row.columns['split']!r} (expected one of {SPLITS})")
                continue
            if not row.instruction:
                report.skip(row, "empty instruction: the instruction column is blank")
                continue
            paths = {}
            for role, image_id in (("past", row.past_dicom_id), ("current", row.current_dicom_id)):
                paths[role] = indexes[role].find(image_id)
                if paths[role] is None:
                    report.skip(row, f"{role} image missing: no file {root / role / image_id}[.{ext_hint}]")
                    break
            else:
                job = _Job(str(paths["past"]), str(paths["current"]), self.builder_config.resolution,
                           self.builder_config.fit)
                by_split[row.split].append((row, job))
        # Fail before decoding anything when missing files alone are too many.
        self._check_bad_fraction()
        return {split: self._generate_examples(items) for split, items in by_split.items() if items}

    # -- generation ----------------------------------------------------------------------------------------------

    def _num_workers(self) -> int:
        if self._num_workers_argument is not None:
            return int(self._num_workers_argument)
        raw = os.environ.get(BUILD_WORKERS_ENV, "").strip()
        try:
            return int(raw) if raw else 0
        except ValueError:
            raise ConfigError(f"${BUILD_WORKERS_ENV}={raw!r} is not an integer") from None

    def _loaded(self, items: list[tuple[_Row, _Job]]) -> Iterator[tuple[_Row, tuple | str]]:
        workers = self._num_workers()
        if workers <= 0:
            for row, job in items:
                yield row, _load_pair(job)
            return
        # spawn: the parent may hold threads (absl, TFDS). Results come back in row order, so the output is the
        # same as without workers; at most 4 rows per worker are in flight, so memory stays bounded.
        pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            pending = collections.deque()
            queue = iter(items)
            for row, job in itertools.islice(queue, 4 * workers):
                pending.append((row, pool.submit(_load_pair, job)))
            while pending:
                row, future = pending.popleft()
                for next_row, next_job in itertools.islice(queue, 1):
                    pending.append((next_row, pool.submit(_load_pair, next_job)))
                yield row, future.result()
        finally:
            pool.shutdown(cancel_futures=True)

    def _generate_examples(self, items: list[tuple[_Row, _Job]]):
        config = self.builder_config
        report = self._report
        for row, loaded in self._loaded(items):
            if isinstance(loaded, str):
                report.skip(row, loaded)
                continue
            past_png, current_png, past_hw, current_hw = loaded
            parsed = instructions.parse(row.instruction)
            report.partial_parses += not parsed.complete
            report.written[row.split] += 1
            known = set(REQUIRED_COLUMNS) | set(config.extra_columns)
            yield row.csv_row, {
                "past": past_png,
                "current": current_png,
                "instruction": row.instruction,
                "edits": edits_to_json(parsed.edits),
                "parse_complete": parsed.complete,
                "example_id": f"mimic-{row.csv_row:07d}",
                "past_dicom_id": row.past_dicom_id,
                "current_dicom_id": row.current_dicom_id,
                "csv_row": row.csv_row,
                "past_original_hw": np.asarray(past_hw, np.int32),
                "current_original_hw": np.asarray(current_hw, np.int32),
                **{column: row.columns.get(column, "") for column in config.extra_columns},
                "extra": json.dumps({k: v for k, v in row.columns.items() if k not in known}, sort_keys=True),
            }

    # -- the report ----------------------------------------------------------------------------------------------

    def _check_bad_fraction(self) -> None:
        report = self._report
        limit, source = resolve_max_bad_fraction(self._max_bad_fraction_argument,
                                                 self.builder_config.max_bad_fraction)
        if report.fraction <= limit:
            return
        # self.data_dir is the temporary `incomplete.*` folder, which TFDS deletes on failure.
        failed = Path(self.data_dir).parent / f"skipped_rows-{self.version}-FAILED.csv"
        report.write(failed)
        first = "; ".join(f"row {r['csv_row']}: {r['reason']}" for r in report.skipped[:3])
        raise DataError(
            f"{self._csv}: {len(report.skipped)} of {report.total} rows ({report.fraction:.2%}) are bad, more than "
            f"the allowed {limit:.2%} ({source}; raise it with the builder argument max_bad_fraction or "
            f"${MAX_BAD_FRACTION_ENV}). First: {first}. All bad rows: {failed}"
        )

    def _download_and_prepare(self, dl_manager, download_config):
        super()._download_and_prepare(dl_manager, download_config)
        report = self._report
        self._check_bad_fraction()
        report.write(Path(self.data_dir) / REPORT_NAME)
        Path(self.data_dir).parent.joinpath(f"skipped_rows-{self.version}-FAILED.csv").unlink(missing_ok=True)
        final = Path(self.data_dir).parent / str(self.version) / REPORT_NAME
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(report.reasons().items())) or "none"
        written = ", ".join(f"{split} {report.written[split]}" for split in SPLITS)
        logging.info(
            "mimic_edit_instruction/%s: %d of %d CSV rows written (%s); skipped %d (%.2f%%: %s), listed in %s; "
            "%d instructions only partly parsed",
            self.builder_config.name, sum(report.written.values()), report.total, written, len(report.skipped),
            100 * report.fraction, reasons, final, report.partial_parses,
        )
        if report.skipped:
            logging.warning("mimic_edit_instruction/%s: skipped %d bad rows, see %s",
                            self.builder_config.name, len(report.skipped), final)
