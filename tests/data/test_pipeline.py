"""The grain input pipeline: sharding, resumption, determinism and laterality-aware joint augmentation."""

import numpy as np
import pytest

from x2x_jax.data import instructions
from x2x_jax.data import pipeline as P
from x2x_jax.data.tfds import SynthCxrEdit, SynthCxrEditConfig
from x2x_jax.data.tfds._common import edits_from_json, edits_to_json

SIZE = 32
NUM_TRAIN = 10


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    config = SynthCxrEditConfig(name="pipe", resolution=SIZE, v2=True,
                                split_sizes=(("train", NUM_TRAIN), ("val", 0), ("test", 0)))
    SynthCxrEdit(config=config, data_dir=data_dir).download_and_prepare()
    return P.open_source("synth_cxr_edit/pipe", "train", data_dir)


def _signed(image) -> np.ndarray:
    """uint8 / bool (H, W[, 1]) -> float32 [-1, 1] (or {0, 1} for bool), computed as the pipeline does."""
    image = np.asarray(image)
    image = image[..., 0] if image.ndim == 3 else image
    if image.dtype == np.bool_:
        return image.astype(np.float32)
    return image.astype(np.float32) / np.float32(255.0) * 2.0 - 1.0


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _iterator(source, **kwargs):
    kwargs = {"batch_size": 4, "seed": 7, "shard_index": 0, "shard_count": 1, **kwargs}
    return P.make_iterator(source, **kwargs)


@pytest.mark.parametrize("num_records,shard_count", [(10, 3), (12, 4), (5, 1), (4, 5)])
def test_record_indices_are_disjoint_and_cover_every_epoch(num_records, shard_count):
    epochs = 3
    shards = [list(P.record_indices(num_records, seed=3, num_epochs=epochs, shard_index=k, shard_count=shard_count))
              for k in range(shard_count)]
    for epoch in range(epochs):
        per_shard = [[i for e, i in shard if e == epoch] for shard in shards]
        seen = [i for indices in per_shard for i in indices]
        assert sorted(seen) == list(range(num_records))  # covering, and disjoint (no index twice)
    assert sum(map(len, shards)) == epochs * num_records
    # Epochs are shuffled differently.
    first = [i for e, i in P.record_indices(num_records, seed=3, num_epochs=2) if e == 0]
    second = [i for e, i in P.record_indices(num_records, seed=3, num_epochs=2) if e == 1]
    assert num_records < 5 or first != second


def test_pipeline_shards_are_disjoint_and_cover_the_dataset(source):
    seen = []
    for k in range(3):
        it = _iterator(source, batch_size=1, num_epochs=1, drop_remainder=False, shard_index=k, shard_count=3)
        seen.append([int(b["record_index"][0]) for b in it])
    flat = [i for shard in seen for i in shard]
    assert sorted(flat) == list(range(NUM_TRAIN))
    assert [len(s) for s in seen] == [4, 3, 3]


def test_default_shard_is_this_jax_process():
    import jax

    assert P.process_shard() == (jax.process_index(), jax.process_count())


def test_resume_from_saved_state_gives_the_same_batches(source):
    it = _iterator(source)
    for _ in range(2):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]  # records 8..19 of the stream: crosses into epoch 1
    assert {int(e) for b in expected for e in b["epoch"]} == {0, 1}

    resumed = _iterator(source)
    resumed.set_state(state)
    for want in expected:
        assert _equal(next(resumed), want)


def test_same_seed_same_batches_other_seed_other_batches(source):
    a, b, c = _iterator(source, seed=1), _iterator(source, seed=1), _iterator(source, seed=2)
    batches_a = [next(a) for _ in range(3)]
    assert all(_equal(x, next(b)) for x in batches_a)
    batches_c = [next(c) for _ in range(3)]
    assert not all(np.array_equal(x["past"], y["past"]) for x, y in zip(batches_a, batches_c))


def test_augmentation_depends_on_seed_epoch_and_record_only(source):
    """A record's augmentation is the same whatever the shard count and batch size."""
    one = _iterator(source, batch_size=2, num_epochs=2)
    three = [_iterator(source, batch_size=1, num_epochs=2, shard_index=k, shard_count=3) for k in range(3)]
    by_key = {}
    for batch in one:
        for j in range(2):
            by_key[int(batch["epoch"][j]), int(batch["record_index"][j])] = batch["current"][j]
    for it in three:
        for batch in it:
            np.testing.assert_array_equal(batch["current"][0], by_key[int(batch["epoch"][0]),
                                                                      int(batch["record_index"][0])])


def _record(text: str) -> dict:
    past = np.zeros((16, 16), np.uint8)
    past[4:12, 1:5] = 200  # a block on the image left
    current = past.copy()
    current[2:6, 10:15] = 90
    edits = edits_to_json(instructions.parse(text).edits)
    return {"past": past[..., None], "current": current[..., None], "mask": (current != past)[..., None],
            "instruction": text.encode(), "edits": edits.encode()}


def test_flip_mirrors_images_and_swaps_laterality():
    text = "Add the finding of moderate left pleural effusion and mild right lower lobe atelectasis."
    record = _record(text)
    flip = P.Augmentation(rotation_deg=0.0, flip_prob=1.0)
    out = P.augment_example(record, np.random.default_rng(0), flip, with_mask=True)
    assert out["flipped"]
    np.testing.assert_array_equal(out["past"], _signed(record["past"])[:, ::-1])
    np.testing.assert_array_equal(out["current"], _signed(record["current"])[:, ::-1])
    np.testing.assert_array_equal(out["mask"], _signed(record["mask"])[:, ::-1])
    assert out["instruction"] == ("Add the finding of moderate right pleural effusion and mild left lower lobe "
                                  "atelectasis.")
    edits = edits_from_json(out["edits"])
    assert [e.location for e in edits] == ["right", "left lower lobe"]
    assert edits == instructions.parse(out["instruction"]).edits

    kept = P.augment_example(record, np.random.default_rng(0), P.NO_AUGMENTATION, with_mask=True)
    assert not kept["flipped"] and kept["instruction"] == text
    np.testing.assert_array_equal(kept["past"], _signed(record["past"]))


def test_rotation_is_the_same_for_past_current_and_mask():
    block = np.zeros((64, 64), np.uint8)
    block[10:40, 20:50] = 255
    record = {"past": block, "current": block, "mask": block > 0, "instruction": "Remove the finding of edema"}
    out = P.augment_example(record, np.random.default_rng(5), P.Augmentation(rotation_deg=2.0, flip_prob=0.0),
                            with_mask=True)
    assert 0.0 < abs(out["rotation_deg"]) <= 2.0
    np.testing.assert_array_equal(out["past"], out["current"])
    assert not np.array_equal(out["past"], _signed(block))  # it did rotate
    assert set(np.unique(out["mask"])) <= {0.0, 1.0}
    image_fg, mask_fg = out["past"] > 0, out["mask"] > 0
    assert (image_fg & mask_fg).sum() / (image_fg | mask_fg).sum() > 0.95
    assert edits_from_json(out["edits"]) == instructions.parse("Remove the finding of edema").edits


def test_flips_in_batches_follow_the_source(source):
    """Without rotation, a batch element is its source record, mirrored iff `flipped`, with the text swapped."""
    it = _iterator(source, batch_size=5, augmentation=P.Augmentation(rotation_deg=0.0, flip_prob=0.5), with_mask=True)
    flips = []
    for _ in range(4):
        batch = next(it)
        for j in range(5):
            record = source[int(batch["record_index"][j])]
            flipped = bool(batch["flipped"][j])
            flips.append(flipped)
            view = (lambda a: a[:, ::-1]) if flipped else (lambda a: a)
            np.testing.assert_array_equal(batch["past"][j], view(_signed(record["past"])))
            np.testing.assert_array_equal(batch["mask"][j], view(record["mask"][..., 0].astype(np.float32)))
            text = record["instruction"].decode()
            assert batch["instruction"][j] == (instructions.swap_laterality(text) if flipped else text)
            assert batch["example_id"][j] == record["example_id"].decode()
    assert any(flips) and not all(flips)


def test_batch_layout_tokenization_and_accumulation(source):
    def tokenize(texts):
        ids = np.zeros((len(texts), 77), np.int64)
        ids[:, 0] = [len(t) for t in texts]
        return ids, np.zeros(len(texts), bool)

    batch = next(_iterator(source, batch_size=4, accum_steps=2, tokenize_fn=tokenize, with_mask=True))
    assert batch["past"].shape == batch["current"].shape == batch["mask"].shape == (2, 2, SIZE, SIZE)
    assert batch["past"].dtype == np.float32 and -1.0 <= batch["past"].min() and batch["past"].max() <= 1.0
    assert batch["input_ids"].shape == (2, 2, 77) and batch["input_ids"].dtype == np.int32
    assert batch["input_ids"][1, 0, 0] == len(batch["instruction"][1, 0])
    assert batch["truncated"].shape == (2, 2)
    assert set(P.device_batch(batch)) == set(batch) - {"instruction", "edits", "example_id"}


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume(source):
    in_process = _iterator(source)
    expected = [next(in_process) for _ in range(4)]
    it, resumed = _iterator(source, worker_count=2), _iterator(source, worker_count=2)
    try:
        for want in expected[:2]:
            assert _equal(next(it), want)
        # The state of a worker pipeline has its own layout: resume with the same worker_count.
        resumed.set_state(it.get_state())
        for want in expected[2:]:
            assert _equal(next(resumed), want)
    finally:
        it.close()
        resumed.close()


@pytest.mark.parametrize("num_records,shard_count,block", [(24, 2, 4), (30, 3, 4), (7, 2, 3)])
def test_block_shards_are_disjoint_cover_and_rebuild_the_single_process_order(num_records, shard_count, block):
    single = list(P.record_indices(num_records, seed=5, num_epochs=1))
    shards = [list(P.record_indices(num_records, seed=5, num_epochs=1, shard_index=k, shard_count=shard_count,
                                    block=block)) for k in range(shard_count)]
    assert sorted(i for s in shards for _, i in s) == list(range(num_records))
    # Concatenating each process's b-th block reproduces the single-process stream, block by block.
    rebuilt = []
    for b in range(-(-num_records // (block * shard_count))):
        for s in shards:
            rebuilt += s[b * block:(b + 1) * block]
    assert rebuilt == single
