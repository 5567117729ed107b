import numpy as np
import pytest
from PIL import Image

from x2x_jax.data import instructions
from x2x_jax.data import synthetic as S
from x2x_jax.errors import ConfigError

IMAGE_KEYS = ("past", "current", "mask")


@pytest.fixture(scope="module")
def sample64():
    return [S.generate_example(0, i, 64) for i in range(200)]


@pytest.fixture(scope="module")
def sample_v2():
    return [S.generate_example(5, i, 32, v2=True, split="val") for i in range(40)]


def _same(a, b):
    for k in IMAGE_KEYS:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    for k in ("instruction", "edits", "identity", "acquisition", "past_findings", "current_findings", "patient_id"):
        assert a[k] == b[k], k


def test_same_seed_same_bytes():
    _same(S.generate_example(3, 7, 64), S.generate_example(3, 7, 64))
    other = S.generate_example(4, 7, 64)
    assert other["past"].tobytes() != S.generate_example(3, 7, 64)["past"].tobytes()


def test_order_independent():
    forward = list(S.iterate_split("val", 6, 48, seed=1))
    backward = [S.generate_example(1, i, 48, split="val") for i in reversed(range(6))][::-1]
    for a, b in zip(forward, backward, strict=True):
        _same(a, b)


def test_mask_is_exactly_the_changed_pixels(sample64):
    for ex in sample64:
        diff = np.abs(ex["current"].astype(np.float64) - ex["past"])
        assert ex["mask"].any(), ex["example_id"]
        np.testing.assert_array_equal(diff > 0, ex["mask"], err_msg=ex["example_id"])
        assert diff[ex["mask"]].min() >= S.CHANGE_THRESHOLD * (1 - 1e-5), ex["example_id"]
        # The threshold is > 2 grey levels, so the guarantee survives 8-bit encoding.
        d8 = np.abs(S.to_uint8(ex["current"]).astype(int) - S.to_uint8(ex["past"]))
        np.testing.assert_array_equal(d8 > 0, ex["mask"], err_msg=ex["example_id"])


def test_mask_stays_inside_the_thorax(sample64):
    # The neck, shoulders and the air above them are identity: no edit may touch them. (The lateral border may
    # be reached: a wide patient fills the field, like on a real film.)
    for ex in sample64:
        m = ex["mask"]
        assert not m[:5].any() and not m[:10, :8].any() and not m[:10, -8:].any(), ex["example_id"]


def test_identity_unchanged(sample64):
    by_patient = {}
    for ex in sample64:
        assert ex["acquisition"] == ex["acquisition_current"]
        by_patient.setdefault(ex["patient_id"], []).append(ex["identity"])
    assert len(by_patient) == len(sample64) // S.PAIRS_PER_PATIENT
    for ids in by_patient.values():
        assert all(i == ids[0] for i in ids)
    ages = [ids[0]["age_years"] for ids in by_patient.values()]
    assert 20 <= min(ages) and max(ages) <= 90
    assert {ids[0]["sex"] for ids in by_patient.values()} == {"F", "M"}


def test_jitter_reacquires_current_only():
    plain = S.generate_example(2, 11, 64)
    jit = S.generate_example(2, 11, 64, jitter=True)
    assert jit["identity"] == plain["identity"] and jit["edits"] == plain["edits"]
    assert jit["past"].tobytes() == plain["past"].tobytes()
    acq, cur = jit["acquisition"], jit["acquisition_current"]
    assert acq != cur and abs(acq["rotation_deg"] - cur["rotation_deg"]) < 3
    assert (jit["current"] != jit["past"])[~jit["mask"]].mean() > 0.5  # a new acquisition differs everywhere
    inter = (jit["mask"] & plain["mask"]).sum()
    assert inter / (jit["mask"] | plain["mask"]).sum() > 0.5


def test_every_finding_and_op_occurs(sample64):
    seen = np.zeros(len(S.SYNTH_FINDINGS), int)
    edited, ops = set(), set()
    for ex in sample64:
        seen += ex["past_labels"] | ex["current_labels"]
        for e in ex["edits"]:
            edited.update(e.findings)
            ops.add(e.op)
    assert (seen > 0).all(), dict(zip(S.SYNTH_FINDINGS, seen))
    assert edited == set(S.SYNTH_FINDINGS)
    assert ops == {"add", "remove", "change"}


def test_instruction_parses_back(sample64, sample_v2):
    for ex in sample64 + sample_v2:
        parsed = instructions.parse(ex["instruction"])
        assert parsed.complete, ex["instruction"]
        assert parsed.edits == ex["edits"], ex["instruction"]
    assert all(e.severity is None and e.location is None for ex in sample64 for e in ex["edits"])


def test_v2_severity_and_location_match_the_labels(sample_v2):
    sides = {"right": {"right"}, "left": {"left"}, "bilateral": {"left", "right"}, None: set()}
    for ex in sample_v2:
        before = {f["name"]: f for f in ex["past_findings"]}
        after = {f["name"]: f for f in ex["current_findings"]}
        for e in ex["edits"]:
            (name,) = e.findings
            f = after[name] if e.op == "add" else before[name]
            if e.op != "change":
                assert e.severity == f["level"]
            assert e.location == f["location"]
            assert instructions.location_sides(e.location) == sides[f["laterality"]], e


def test_disjoint_patients_across_splits():
    ids = {s: {ex["patient_id"] for ex in S.iterate_split(s, 4, 16)} for s in S.SPLITS}
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    # Not just renamed: patient 0 of each split is a different person.
    idents = [S.generate_example(0, 0, 16, split=s)["identity"] for s in S.SPLITS]
    assert idents[0] != idents[1] != idents[2] != idents[0]


@pytest.mark.parametrize("size", [64, 256])
def test_shapes_dtypes_ranges(size):
    ex = S.generate_example(0, 3, size)
    for k in ("past", "current"):
        assert ex[k].shape == (size, size) and ex[k].dtype == np.float32
        assert -1 < ex[k].min() and ex[k].max() < 1
    assert ex["mask"].shape == (size, size) and ex["mask"].dtype == bool
    n = len(S.SYNTH_FINDINGS)
    for prefix in ("past", "current"):
        assert ex[f"{prefix}_labels"].shape == (n,) and ex[f"{prefix}_labels"].dtype == np.uint8
        assert ex[f"{prefix}_levels"].dtype == np.int8 and ex[f"{prefix}_laterality"].dtype == np.int8
        assert ex[f"{prefix}_severity"].dtype == np.float32
    assert isinstance(ex["instruction"], str) and ex["instruction"]
    assert all(isinstance(e, instructions.Edit) for e in ex["edits"])
    img = S.to_uint8(ex["past"])
    assert img.dtype == np.uint8 and img.shape == (size, size)


def test_it_looks_like_a_radiograph(sample64):
    # Dark air outside, lungs darker than the mediastinum, abdomen bright.
    for ex in sample64[:20]:
        img = ex["past"]
        assert img[:4, :4].mean() < -0.6  # air above the shoulder
        lung_r, lung_l = img[22:30, 14:20].mean(), img[22:30, 44:50].mean()
        mediastinum, abdomen = img[10:24, 30:34].mean(), img[58:62, 24:40].mean()
        assert max(lung_r, lung_l) < mediastinum - 0.3, ex["example_id"]
        assert abdomen > 0.2


def test_edit_semantics(sample64):
    for ex in sample64:
        for e in ex["edits"]:
            for name in e.findings:
                i = S.SYNTH_FINDINGS.index(name)
                past, cur = ex["past_labels"][i], ex["current_labels"][i]
                if e.op == "add":
                    assert (past, cur) == (0, 1)
                elif e.op == "remove":
                    assert (past, cur) == (1, 0)
                    assert ex["current_levels"][i] == 0 and ex["past_levels"][i] > 0
                else:
                    assert (past, cur) == (1, 1)
                    assert ex["past_levels"][i] == S.LEVELS.index(e.level_from) + 1
                    assert ex["current_levels"][i] == S.LEVELS.index(e.level_to) + 1
                    assert (ex["current_severity"][i] > ex["past_severity"][i]) == (
                        ex["current_levels"][i] > ex["past_levels"][i])
        untouched = np.ones(len(S.SYNTH_FINDINGS), bool)
        untouched[[S.SYNTH_FINDINGS.index(n) for e in ex["edits"] for n in e.findings]] = False
        np.testing.assert_array_equal(ex["past_severity"][untouched], ex["current_severity"][untouched])


def test_cardiomegaly_severity_is_the_ctr(sample64):
    checked = 0
    for ex in sample64:
        for e in ex["edits"]:
            if e.findings == ("cardiomegaly",):
                if e.op == "change":
                    bigger = S.LEVELS.index(e.level_to) > S.LEVELS.index(e.level_from)
                else:
                    bigger = e.op == "add"
                assert (ex["current_ctr"] > ex["past_ctr"]) == bigger
                assert 0.38 <= min(ex["past_ctr"], ex["current_ctr"]) and max(ex["past_ctr"], ex["current_ctr"]) < 0.76
                checked += 1
    assert checked > 5


def test_laterality_is_radiological(sample64):
    # The patient's right is on the image left.
    checked = 0
    for ex in sample64:
        if len(ex["edits"]) != 1 or len(ex["edits"][0].findings) != 1:
            continue
        (f,) = [f for f in ex["past_findings"] + ex["current_findings"] if f["name"] == ex["edits"][0].findings[0]][:1]
        if f["laterality"] in ("left", "right"):
            col = np.nonzero(ex["mask"])[1].mean()
            assert (col < 32) == (f["laterality"] == "right"), (ex["instruction"], col)
            checked += 1
    assert checked > 20


def test_same_content_at_any_size():
    small, big = S.generate_example(0, 9, 64), S.generate_example(0, 9, 128)
    assert small["edits"] == big["edits"] and small["identity"] == big["identity"]
    assert small["past_findings"] == big["past_findings"]
    down = big["mask"].reshape(64, 2, 64, 2).mean((1, 3)) > 0.5
    assert (down & small["mask"]).sum() / (down | small["mask"]).sum() > 0.7


def test_bad_arguments():
    with pytest.raises(ConfigError):
        S.generate_example(0, 0, 64, split="dev")
    with pytest.raises(ConfigError):
        next(S.iterate_split("holdout", 1, 64))


def test_contact_sheet_cli(tmp_path, capsys):
    out = tmp_path / "sheet.png"
    S.main(["--out", str(out), "--n", "2", "--size", "64", "--split", "test", "--v2"])
    img = Image.open(out)
    assert img.width == 3 * 64 and img.height > 2 * 64
    assert "wrote" in capsys.readouterr().out
