"""Training batches: one checkpointable iterator over a record source, shaped for the train step.

A record source is anything with len() and __getitem__: the TFDS build of the config's data set (`image_source`,
building the synthetic set on first use) or a latent cache (training/latent_cache.py). Both go through the same
grain pipeline (x2x_jax/data/pipeline.py: global shuffle per epoch, multi-host blocks, deterministic
augmentation), so a stage differs only in which source it reads, whether records are augmented, and which keys
of a batch its step takes.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from x2x_jax.data.pipeline import Augmentation, make_iterator, open_source
from x2x_jax.errors import ConfigError, DataError
from x2x_jax.models.tokenizer import tokenize


def dataset_name(config) -> str:
    return f"{config.data.name}/{config.data.builder_config}"


def ensure_built(config) -> None:
    """Build the dataset into data.data_dir if it is not there (synthetic: generated; MIMIC: from manual_dir)."""
    import tensorflow_datasets as tfds  # slow to import: only when a stage reads the TFDS build

    import x2x_jax.data.tfds  # noqa: F401  (registers the builders)

    builder = tfds.builder(dataset_name(config), data_dir=config.data.data_dir)
    if builder.is_prepared():
        return
    if config.data.name == "mimic_edit_instruction":
        if not config.data.manual_dir:
            raise ConfigError("data.manual_dir: mimic_edit_instruction needs the released layout "
                              "(instructions.csv, past/, current/)")
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=os.path.abspath(config.data.manual_dir)))
    else:
        print(f"building {dataset_name(config)} into {config.data.data_dir} (first use)", flush=True)
        builder.download_and_prepare()


def image_source(config):
    """The config's training split as a random-access source of (past, instruction, current[, mask]) records."""
    ensure_built(config)
    return open_source(dataset_name(config), config.data.train_split, config.data.data_dir)


def stage_batches(config, source, keys: tuple[str, ...], **kwargs) -> Callable[..., "Batches"]:
    """A stage's data function (process_index, process_count, accum, local_micro) -> `batches` over `source`, or
    over the config's training split (`image_source`, opened only when the stream is made) when it is None."""

    def make(process_index: int, process_count: int, accum: int, local_micro: int) -> Batches:
        src = source if source is not None else image_source(config)
        return batches(config, src, keys, process_index, process_count, accum, local_micro, **kwargs)

    return make


class Batches:
    """Iterator of numpy batches {key: (accum, local_micro, ...)} with the stage's keys; get_state / set_state
    checkpoint the pipeline underneath. `add(batch)` computes host-side arrays from a pipeline batch first."""

    def __init__(self, it, accum: int, local_micro: int, keys: tuple[str, ...],
                 add: Callable[[dict], dict] | None = None):
        self._it, self._accum, self._micro, self._keys, self._add = it, accum, local_micro, keys, add

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._it)
        if self._add is not None:
            batch = self._add(batch)
        return {k: np.asarray(batch[k]).reshape(self._accum, self._micro, *np.shape(batch[k])[1:])
                for k in self._keys}

    def get_state(self):
        return self._it.get_state()

    def set_state(self, state):
        self._it.set_state(state)


def batches(config, source, keys: tuple[str, ...], process_index: int, process_count: int, accum: int,
            local_micro: int, *, tokenizer=None, augment: bool = True, with_mask: bool = False,
            worker_count: int | None = None, add: Callable[[dict], dict] | None = None) -> Batches:
    """The training stream of `source` for one process: the config's seed and augmentation (augment=False: records
    pass through as they are), instructions tokenized when a tokenizer is given, processes taking whole
    micro-batch blocks in turn (the same global batches whatever the process count)."""
    if len(source) < accum * local_micro:
        cache = config.data.get("latent_cache")
        what = (f"the latent cache {cache}" if cache else
                f"{dataset_name(config)}: split {config.data.train_split!r}")
        raise DataError(f"{what} has {len(source)} examples, fewer than one per-process batch "
                        f"({accum * local_micro})")
    augmentation = Augmentation(config.data.rotation_deg, config.data.flip_p) if augment else None
    tokenize_fn = None if tokenizer is None else (lambda texts: tokenize(tokenizer, list(texts)))
    it = make_iterator(source, batch_size=accum * local_micro, seed=config.seed, augmentation=augmentation,
                       with_mask=with_mask, tokenize_fn=tokenize_fn, shard_index=process_index,
                       shard_count=process_count, shard_block=local_micro,
                       worker_count=config.data.worker_count if worker_count is None else worker_count)
    return Batches(it, accum, local_micro, keys, add)
