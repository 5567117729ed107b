"""Training batches from the TFDS builds through the grain pipeline (building the synthetic set on first use)."""

from __future__ import annotations

import os

import numpy as np

from x2x_jax.errors import ConfigError, DataError

TRAIN_KEYS = ("past", "current", "input_ids")


def dataset_name(config) -> str:
    return f"{config.data.name}/{config.data.builder_config}"


def ensure_built(config) -> None:
    """Build the dataset into data.data_dir if it is not there (synthetic: generated; MIMIC: from manual_dir)."""
    import tensorflow_datasets as tfds

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


class TrainBatches:
    """Iterator of numpy batches {past, current, input_ids} (or, from a latent cache, {current_mean,
    current_logvar, past_latent, input_ids}) shaped (accum, local_micro, ...)."""

    def __init__(self, it, accum: int, local_micro: int, keys: tuple[str, ...] = TRAIN_KEYS):
        self._it, self._accum, self._micro, self._keys = it, accum, local_micro, keys

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._it)
        return {k: np.asarray(batch[k]).reshape(self._accum, self._micro, *np.shape(batch[k])[1:])
                for k in self._keys}

    def get_state(self):
        return self._it.get_state()

    def set_state(self, state):
        self._it.set_state(state)


def make_train_iterator(config, process_index: int, process_count: int, accum: int, local_micro: int,
                        tokenizer) -> TrainBatches:
    from x2x_jax.convert.tokenizer import tokenize
    from x2x_jax.data.pipeline import Augmentation, make_iterator, open_source

    if config.data.get("latent_cache"):
        from x2x_jax.training import latent_cache

        it = latent_cache.make_cached_iterator(config, process_index, process_count, accum * local_micro,
                                               local_micro)
        return TrainBatches(it, accum, local_micro, latent_cache.ARRAYS)
    ensure_built(config)
    source = open_source(dataset_name(config), config.data.train_split, config.data.data_dir)
    if len(source) < accum * local_micro:
        raise DataError(f"{dataset_name(config)}: split {config.data.train_split!r} has {len(source)} examples, "
                        f"fewer than one per-process batch ({accum * local_micro})")
    it = make_iterator(
        source, batch_size=accum * local_micro, seed=config.seed,
        augmentation=Augmentation(config.data.rotation_deg, config.data.flip_p),
        tokenize_fn=lambda texts: tokenize(tokenizer, list(texts)), accum_steps=1,
        shard_index=process_index, shard_count=process_count, worker_count=config.data.worker_count,
        shard_block=local_micro)
    return TrainBatches(it, accum, local_micro)
