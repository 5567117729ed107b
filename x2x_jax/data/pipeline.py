"""Training input pipeline: grain over a random-access source of (past, instruction, current) records.

    source = open_source("synth_cxr_edit/v1", "train", data_dir)        # or any len() + __getitem__ source
    it = make_iterator(source, batch_size=32, seed=0, tokenize_fn=clip_tokenize_fn())
    batch = next(it)            # {"past", "current": float32 (B, H, W) in [-1, 1], "input_ids": int32 (B, 77), ...}
    state = it.get_state()      # save with the checkpoint; `it.set_state(state)` resumes with the same batches

Records are dicts with `past`, `current` (2-D or (H, W, 1) images: uint8 / uint16 scaled by their range, bool, or
float already in [0, 1]), `instruction` (str or bytes) and optionally `edits` (JSON, see
`x2x_jax.data.tfds._common`; parsed from the instruction when absent), `mask` and `example_id`.

Order, sharding and determinism
    The stream is a sequence of (epoch, record index) pairs: epoch e is a permutation of all records (grain's
    index shuffle, seed + e), epochs are concatenated, and process k of P takes positions k, k + P, k + 2P, ...
    So within every epoch the processes' records are disjoint and together cover the dataset, and each epoch
    partitions the records anew (a global shuffle, not a fixed per-host subset). Process counts default to
    `jax.process_index()` / `jax.process_count()`. When the record count is not a multiple of P, processes can
    differ by one record per epoch: with `num_epochs=None` (repeat forever, the training default) that never
    matters; for finite evaluation use drop_remainder or pad.
    Augmentation draws from `np.random.default_rng([seed, epoch, record index])`, so a record's augmentation
    does not depend on worker count, thread count, shard count or position. Batches are formed after the
    worker processes, which keep the element order (worker i works on positions i, i + W, ... and grain
    interleaves them round-robin), so the batches are the same for every `worker_count`.

Augmentation (`Augmentation`): one rotation angle, uniform in +-rotation_deg (bilinear, black corners), applied
identically to past, current and mask (nearest for the mask, which stays binary), then a horizontal flip with
probability flip_prob of all three. A flip swaps "left" <-> "right" in the instruction and in the edits'
locations (`instructions.swap_laterality`): a flipped radiograph shows the patient's sides swapped, so the text
must follow (the original code flipped the images only). Note that a flipped film also puts the heart on the
right; set flip_prob=0 to train on anatomically normal orientation only.

Batches are numpy dicts: past, current (and mask) float32 (B, H, W) in [-1, 1] (mask in {0, 1}); instruction,
edits, example_id object arrays of str (host-only: drop them with `device_batch` before sharding onto a mesh);
flipped bool (B,), rotation_deg float32 (B,), epoch / record_index int64 (B,); input_ids int32 (B, 77) and
truncated bool (B,) when `tokenize_fn` is given. With accum_steps > 1 every array is (accum_steps, B /
accum_steps, ...) for gradient accumulation.

Worker processes (`worker_count` > 0) need the usual multiprocessing care: run under
`if __name__ == "__main__":`; outside `absl.app.run` absl flags must be marked parsed (done here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags
from PIL import Image

from x2x_jax.data import instructions
from x2x_jax.data.tfds._common import edits_from_json, edits_to_json
from x2x_jax.errors import ConfigError
from x2x_jax.models import tokenizer


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """rotation_deg: the angle is uniform in [-rotation_deg, rotation_deg]. flip_prob: horizontal flip chance."""

    rotation_deg: float = 2.0
    flip_prob: float = 0.5


NO_AUGMENTATION = Augmentation(rotation_deg=0.0, flip_prob=0.0)


def open_source(name: str, split: str, data_dir: str | None = None):
    """`tfds.data_source` of one of our builders ("synth_cxr_edit/v1", "mimic_edit_instruction/v2_256", ...)."""
    import tensorflow_datasets as tfds

    import x2x_jax.data.tfds  # noqa: F401  (registers the builders)

    return tfds.data_source(name, split=split, data_dir=data_dir)


def process_shard(shard_index: int | None = None, shard_count: int | None = None) -> tuple[int, int]:
    """(index, count) of this process' shard; missing values come from jax.process_index() / process_count()."""
    if shard_index is None or shard_count is None:
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not (isinstance(shard_count, int) and shard_count >= 1 and 0 <= shard_index < shard_count):
        raise ConfigError(f"shard_index must be in [0, shard_count), got {shard_index} of {shard_count}")
    return shard_index, shard_count


class _WithEpoch:
    """Position in the repeated stream -> (epoch, record index)."""

    def __init__(self, num_records: int):
        self.num_records = num_records

    def __call__(self, position: int, record_index: int) -> tuple[int, int]:
        return position // self.num_records, int(record_index)


class _BlockShard(grain.MapDataset):
    """Process k of P takes positions whose block (position // block) is k modulo P.

    With block = the per-process micro-batch, each global micro-batch that `make_array_from_process_local_data`
    assembles (process 0's rows, then process 1's, ...) holds the same records in the same order whatever the
    process count, so a multi-host run sees exactly the batches of a single-host run.
    """

    def __init__(self, parent: grain.MapDataset, block: int, shard_index: int, shard_count: int):
        super().__init__(parent)
        self._block, self._k, self._p = block, shard_index, shard_count

    def __len__(self) -> int:
        n, group = len(self._parent), self._block * self._p
        full, rem = divmod(n, group)
        return full * self._block + min(max(rem - self._k * self._block, 0), self._block)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        group, offset = divmod(index, self._block)
        return self._parent[(group * self._p + self._k) * self._block + offset]

    def __str__(self) -> str:
        return f"BlockShard(block={self._block}, shard={self._k}/{self._p})"


def record_indices(num_records: int, *, seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                   shard_index: int = 0, shard_count: int = 1, block: int = 1) -> grain.MapDataset:
    """The (epoch, record index) pairs one process reads, in order (see the module doc).

    Process k takes blocks k, k + P, ... of `block` consecutive positions (block 1: positions k, k + P, ...).
    """
    if num_records < 1:
        raise ConfigError("the data source is empty (0 records)")
    if not 0 <= seed < 2**32:
        raise ConfigError(f"seed must be in [0, 2**32), got {seed}")
    if num_epochs is not None and num_epochs < 1:
        raise ConfigError(f"num_epochs must be >= 1 or None (repeat forever), got {num_epochs}")
    ds = grain.MapDataset.range(num_records)
    if shuffle:
        ds = ds.shuffle(seed=seed)  # epoch e uses seed + e
    ds = ds.repeat(num_epochs).map_with_index(_WithEpoch(num_records))
    if block == 1:
        return ds[shard_index::shard_count]
    return _BlockShard(ds, block, shard_index, shard_count)


def _to_unit(image: Any) -> np.ndarray:
    """2-D float32 in [0, 1] from uint8 / uint16 / bool / float [0, 1], (H, W) or (H, W, 1)."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim != 2:
        raise ValueError(f"expected a grey (H, W) or (H, W, 1) image, got shape {image.shape}")
    if image.dtype == np.bool_:
        return image.astype(np.float32)
    if np.issubdtype(image.dtype, np.integer):
        return image.astype(np.float32) / np.float32(np.iinfo(image.dtype).max)
    return image.astype(np.float32)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _rotate(image: np.ndarray, angle: float, resample: Image.Resampling) -> np.ndarray:
    # Counter-clockwise about the centre; corners outside the source become 0 (black).
    return np.asarray(Image.fromarray(image).rotate(angle, resample=resample, fillcolor=0.0), dtype=np.float32)


def augment_example(record: dict, rng: np.random.Generator, augmentation: Augmentation = Augmentation(),
                    with_mask: bool = False) -> dict:
    """One record -> training example (see the module doc); the randomness comes from `rng` only."""
    past, current = _to_unit(record["past"]), _to_unit(record["current"])
    if past.shape != current.shape:
        raise ValueError(f"past {past.shape} and current {current.shape} differ in size")
    # Masks are stored as 0/1 (synth_cxr_edit) or 0/255: any non-zero value is "changed".
    mask = (_to_unit(record["mask"]) > 0).astype(np.float32) if with_mask else None
    text = _text(record["instruction"])
    edits = _text(record["edits"]) if "edits" in record else edits_to_json(instructions.parse(text).edits)

    # Both draws happen always, so a record's flip does not depend on rotation_deg.
    angle = float(rng.uniform(-1.0, 1.0)) * augmentation.rotation_deg
    flip = bool(rng.random() < augmentation.flip_prob)
    if angle != 0.0:
        past = _rotate(past, angle, Image.Resampling.BILINEAR)
        current = _rotate(current, angle, Image.Resampling.BILINEAR)
        if mask is not None:
            mask = _rotate(mask, angle, Image.Resampling.NEAREST)
    if flip:
        past, current = past[:, ::-1], current[:, ::-1]
        mask = None if mask is None else mask[:, ::-1]
        text = instructions.swap_laterality(text)
        edits = edits_to_json(instructions.swap_laterality(edits_from_json(edits)))

    example = {
        "past": np.ascontiguousarray(past * 2.0 - 1.0, dtype=np.float32),
        "current": np.ascontiguousarray(current * 2.0 - 1.0, dtype=np.float32),
        "instruction": text,
        "edits": edits,
        "flipped": np.bool_(flip),
        "rotation_deg": np.float32(angle),
    }
    if mask is not None:
        example["mask"] = np.ascontiguousarray(mask, dtype=np.float32)
    if "example_id" in record:
        example["example_id"] = _text(record["example_id"])
    return example


class _Prepare:
    """(epoch, record index) -> augmented example. A class, not a closure, so worker processes can pickle it."""

    def __init__(self, source, seed: int, augmentation: Augmentation | None, with_mask: bool):
        self.source, self.seed, self.augmentation, self.with_mask = source, seed, augmentation, with_mask

    def __call__(self, item: tuple[int, int]) -> dict:
        epoch, index = item
        if self.augmentation is None:  # records that are already examples (e.g. a latent cache's arrays)
            example = dict(self.source[index])
        else:
            rng = np.random.default_rng([self.seed, epoch, index])
            example = augment_example(self.source[index], rng, self.augmentation, self.with_mask)
        example["epoch"], example["record_index"] = np.int64(epoch), np.int64(index)
        return example


def collate(examples: Sequence[dict]) -> dict:
    """Stack each key; strings become object arrays."""
    batch = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        if isinstance(values[0], str):
            batch[key] = np.array(values, dtype=object)
        else:
            batch[key] = np.stack(values)
    return batch


class _Finish:
    """Batch-level steps in the main process: tokenization, then the accumulation reshape."""

    def __init__(self, tokenize_fn: Callable | None, accum_steps: int):
        self.tokenize_fn, self.accum_steps = tokenize_fn, accum_steps

    def __call__(self, batch: dict) -> dict:
        if self.tokenize_fn is not None:
            out = self.tokenize_fn(list(batch["instruction"]))
            ids, truncated = out if isinstance(out, tuple) else (out, None)
            batch["input_ids"] = np.asarray(ids, dtype=np.int32)
            if truncated is not None:
                batch["truncated"] = np.asarray(truncated, dtype=np.bool_)
        if self.accum_steps > 1:
            size = len(next(iter(batch.values())))
            if size % self.accum_steps:
                raise ValueError(f"batch of {size} does not split into accum_steps={self.accum_steps} "
                                 "(use drop_remainder=True)")
            batch = {k: v.reshape(self.accum_steps, size // self.accum_steps, *v.shape[1:])
                     for k, v in batch.items()}
        return batch


def make_dataset(
    source,
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    augmentation: Augmentation | None = Augmentation(),
    with_mask: bool = False,
    tokenize_fn: Callable[[list[str]], Any] | None = None,
    accum_steps: int = 1,
    drop_remainder: bool = True,
    shard_index: int | None = None,
    shard_count: int | None = None,
    worker_count: int = 0,
    read_threads: int = 4,
    prefetch: int | None = None,
    shard_block: int = 1,
) -> grain.IterDataset:
    """The pipeline of the module doc as a grain IterDataset; `iter()` of it is a checkpointable iterator.

    batch_size: per process (global batch = batch_size * shard_count). augmentation=None: the source's records are
    examples already (dicts of arrays, e.g. a latent cache) and pass through unchanged. tokenize_fn(texts) -> ids (B, 77) or
    (ids, truncated), e.g. `clip_tokenize_fn()`. worker_count: 0 decodes / augments in this process with
    `read_threads` threads; > 0 uses that many grain worker processes. prefetch: examples buffered per reader
    (default 2 * batch_size). shard_block: processes take whole blocks of this many consecutive positions in turn
    (training passes the per-process micro-batch, so the global batches that `make_array_from_process_local_data`
    assembles are the same whatever the process count).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if accum_steps < 1 or batch_size % accum_steps:
        raise ConfigError(f"batch_size {batch_size} must be a multiple of accum_steps {accum_steps}")
    if worker_count < 0 or read_threads < 1:
        raise ConfigError(f"worker_count must be >= 0 and read_threads >= 1, got {worker_count}, {read_threads}")
    shard_index, shard_count = process_shard(shard_index, shard_count)
    indices = record_indices(len(source), seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                             shard_index=shard_index, shard_count=shard_count,
                             block=shard_block)
    ds = indices.map(_Prepare(source, seed, augmentation, with_mask))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                              prefetch_buffer_size=prefetch or 2 * batch_size))
    if worker_count > 0:
        _mark_absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=collate)
    return ds.map(_Finish(tokenize_fn, accum_steps))


def make_iterator(source, **kwargs) -> grain.DatasetIterator:
    """`iter(make_dataset(source, **kwargs))`: has get_state() / set_state(state)."""
    return iter(make_dataset(source, **kwargs))


def device_batch(batch: dict) -> dict:
    """The numeric arrays of a batch (what can be put on devices); drops the str / object arrays."""
    return {k: v for k, v in batch.items() if v.dtype != object}


def clip_tokenize_fn(diffusers_dir: str | None = None) -> Callable[[list[str]], tuple[np.ndarray, np.ndarray]]:
    """tokenize_fn for `make_dataset` from the project's CLIP tokenizer (x2x_jax.models.tokenizer)."""
    tok = tokenizer.load_tokenizer(diffusers_dir)
    return lambda texts: tokenizer.tokenize(tok, texts)


def _mark_absl_flags_parsed() -> None:
    # grain's worker processes read absl flags; outside absl.app.run they would raise UnparsedFlagAccessError.

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
