"""TFDS builder `synth_cxr_edit`: the procedural synthetic edit pairs of `x2x_jax.data.synthetic`.

Build (TensorFlow is not needed; nothing is downloaded):

    tfds build synth_cxr_edit --imports x2x_jax.data.tfds --config v1 --data_dir ~/tensorflow_datasets

    # a quick smoke build: --max_examples_per_split 8

or from Python, with any sizes:

    config = SynthCxrEditConfig(name="tiny", resolution=32, split_sizes=(("train", 8), ("val", 2), ("test", 2)))
    builder = SynthCxrEdit(config=config, data_dir=...)
    builder.download_and_prepare()
    source = builder.as_data_source("train")

Configs: v1 / v2 (64 px, the default), v1_128, v2_128, v1_256, v2_256, v1_512, v2_512. "v2" instructions carry
severity and location words. Default sizes are CPU-friendly: 5,000 train / 500 val / 500 test. Rendering takes
~0.07 s per pair at 64 px and ~1.2 s at 512 px on one CPU core.

Stored per example (ArrayRecord; `tfds.data_source` returns numpy, text as bytes):
    past, current     uint8 (R, R, 1) grey, PNG-encoded (`synthetic.to_uint8` of the [-1, 1] rendering). The
                      change mask's threshold (0.02 in [-1, 1], ~2.5 grey levels) survives the 8-bit rounding.
    mask              uint8 (R, R, 1), 1 where the edit changed pixels, PNG-encoded.
    instruction       text; edits: JSON list of `Edit` fields (`_common.edits_from_json`).
    example_id, patient_id, index
    identity          patient attributes an edit must keep (age_years, sex, habitus, ...).
    acquisition, acquisition_current    exposure / geometry of the two images.
    past_findings, current_findings     JSON lists of finding dicts (name, level, severity, laterality, ...).
    {past,current}_{labels,levels,severity,laterality}   per `synthetic.SYNTH_FINDINGS`; laterality is the
                      patient's side (0 n/a, 1 right, 2 left, 3 bilateral). past_ctr, current_ctr.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import tensorflow_datasets as tfds

from x2x_jax.data import synthetic
from x2x_jax.data.tfds._common import edits_to_json, encode_png
from x2x_jax.errors import ConfigError, DataError

RESOLUTIONS = (64, 128, 256, 512)
_LABEL_DTYPES = {"labels": np.uint8, "levels": np.int8, "severity": np.float32, "laterality": np.int8}


@dataclasses.dataclass(eq=False)
class SynthCxrEditConfig(tfds.core.BuilderConfig):
    """resolution: image side (px). v2: v2 instructions. split_sizes: ((split, count), ...) over train/val/test.
    seed / jitter: passed to `synthetic.iterate_split`."""

    resolution: int = synthetic.DEFAULT_SIZE
    v2: bool = False
    split_sizes: tuple[tuple[str, int], ...] = tuple(synthetic.DEFAULT_SPLIT_SIZES.items())
    seed: int = 0
    jitter: bool = False

    def __post_init__(self):
        self.split_sizes = tuple((str(s), int(n)) for s, n in dict(self.split_sizes).items())
        for split, count in self.split_sizes:
            if split not in synthetic.SPLITS or count < 0:
                raise ConfigError(f"SynthCxrEditConfig.split_sizes: bad entry ({split!r}, {count}); splits are "
                                  f"{sorted(synthetic.SPLITS)}, counts >= 0")


def _configs() -> list[SynthCxrEditConfig]:
    configs = []
    for size in RESOLUTIONS:
        for v2 in (False, True):
            style = "v2" if v2 else "v1"
            name = style if size == synthetic.DEFAULT_SIZE else f"{style}_{size}"
            configs.append(SynthCxrEditConfig(name=name, resolution=size, v2=v2,
                                              description=f"{style} instructions, {size} px"))
    return configs


@functools.cache
def _probe() -> dict:
    """One tiny example: the keys and value types of the identity / acquisition dicts."""
    return synthetic.generate_example(0, 0, 16)


def _scalar_feature(value):
    if isinstance(value, str):
        return tfds.features.Text()
    if isinstance(value, (bool, np.bool_)):
        return np.bool_
    if isinstance(value, (int, np.integer)):
        return np.int64
    return np.float32


def _dict_feature(example_key: str) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({k: _scalar_feature(v) for k, v in _probe()[example_key].items()})


class SynthCxrEdit(tfds.core.GeneratorBasedBuilder):
    """Synthetic chest X-ray edit pairs with ground-truth change masks and identity attributes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "8-bit PNG past/current/mask, edits as JSON, identity, labels."}
    BUILDER_CONFIGS = _configs()

    def __init__(self, *, file_format=None, **kwargs):
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.resolution
        image = tfds.features.Image(shape=(size, size, 1), dtype=np.uint8, encoding_format="png")
        n = len(synthetic.SYNTH_FINDINGS)
        labels = {
            f"{when}_{name}": tfds.features.Tensor(shape=(n,), dtype=dtype)
            for when in ("past", "current") for name, dtype in _LABEL_DTYPES.items()
        }
        features = {
            "past": image,
            "current": image,
            "mask": image,
            "instruction": tfds.features.Text(),
            "edits": tfds.features.Text(),
            "example_id": tfds.features.Text(),
            "patient_id": tfds.features.Text(),
            "index": np.int64,
            "identity": _dict_feature("identity"),
            "acquisition": _dict_feature("acquisition"),
            "acquisition_current": _dict_feature("acquisition_current"),
            "past_findings": tfds.features.Text(),
            "current_findings": tfds.features.Text(),
            **labels,
            "past_ctr": np.float32,
            "current_ctr": np.float32,
        }
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0] + f" Findings (label order): {', '.join(synthetic.SYNTH_FINDINGS)}.",
            features=tfds.features.FeaturesDict(features),
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split, count)
                for split, count in self.builder_config.split_sizes if count > 0}

    def _generate_examples(self, split: str, count: int):
        config = self.builder_config
        examples = synthetic.iterate_split(split, count, config.resolution, seed=config.seed, v2=config.v2,
                                           jitter=config.jitter)
        for example in examples:
            yield example["index"], self._record(example)

    def _record(self, ex: dict) -> dict:
        try:
            record = {
                "past": encode_png(synthetic.to_uint8(ex["past"])),
                "current": encode_png(synthetic.to_uint8(ex["current"])),
                "mask": encode_png(ex["mask"].astype(np.uint8)),
                "instruction": ex["instruction"],
                "edits": edits_to_json(ex["edits"]),
                "example_id": ex["example_id"],
                "patient_id": ex["patient_id"],
                "index": ex["index"],
                "identity": ex["identity"],
                "acquisition": ex["acquisition"],
                "acquisition_current": ex["acquisition_current"],
                "past_findings": json.dumps(list(ex["past_findings"])),
                "current_findings": json.dumps(list(ex["current_findings"])),
                **{f"{when}_{name}": ex[f"{when}_{name}"] for when in ("past", "current") for name in _LABEL_DTYPES},
                "past_ctr": ex["past_ctr"],
                "current_ctr": ex["current_ctr"],
            }
        except KeyError as e:
            raise DataError(f"synthetic.generate_example no longer returns key {e}; update synth_cxr_edit") from e
        return record
