import csv

import numpy as np
import pytest

from x2x_jax.data import synthetic
from x2x_jax.data.instructions import FINDINGS, Edit, location_sides
from x2x_jax.editing import priors
from x2x_jax.editing.priors import prior_for_edits, prior_for_instruction, region_mask
from x2x_jax.errors import ConfigError, DataError

S = 64
LUNG_FINDINGS = ("pleural effusion", "atelectasis", "pneumothorax", "pneumonia", "consolidation", "lung opacity",
                 "edema", "infection", "contusion", "emphysema", "hypoxemia")


def _edit(finding, location=None, op="add"):
    return Edit(op, (finding,), location=location)


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


# --- every finding has a regional prior -------------------------------------------------------------------------


@pytest.mark.parametrize("finding", FINDINGS)
def test_every_finding_has_a_regional_prior(finding):
    prior, info = prior_for_edits([_edit(finding)], S, S)
    assert prior.shape == (S, S) and prior.dtype == np.float32
    assert prior.min() >= 0.0 and prior.max() == 1.0
    assert not info.whole_image and info.warnings == ()
    assert info.findings == (finding,) and info.sources == {finding: "builtin"}
    covered = (prior > 0).mean()
    assert 0.02 < covered < 0.85, covered  # neither empty nor (nearly) the whole image


def test_regional_priors_sit_where_the_anatomy_is():
    def centroid(mask):
        rows, cols = np.nonzero(mask >= 0.5)
        return rows.mean() / S, cols.mean() / S

    assert centroid(region_mask("lung_left", S, S))[1] > 0.5  # patient's left = image right
    assert centroid(region_mask("lung_right", S, S))[1] < 0.5
    assert centroid(region_mask("heart", S, S))[1] > 0.5  # the heart lies mostly to the patient's left
    assert centroid(region_mask("costophrenic_angle", S, S))[0] > 0.75
    assert centroid(region_mask("clavicle", S, S))[0] < 0.25
    assert centroid(region_mask("gastric", S, S))[1] > 0.6
    assert centroid(region_mask("upper_abdomen", S, S))[0] > centroid(region_mask("lung", S, S))[0]
    # the pleural margin is a band along the lung edge, not the lung
    margin, lung = region_mask("pleural_margin", S, S) >= 0.5, region_mask("lung", S, S) >= 0.5
    assert margin.sum() < 0.6 * lung.sum()
    assert margin[:, S // 4].sum() < lung[:, S // 4].sum()  # the centre of each lung field is not margin


def test_lung_zones():
    rows = (np.arange(S) + 0.5) / S
    apices = priors.lung_zone_mask("apical", S, S, side="left")
    bases = priors.lung_zone_mask("basal", S, S)
    assert apices[:, : S // 2].max() == 0.0 and apices[rows > 0.32].max() == 0.0 and apices.max() == 1.0
    assert bases[rows < 0.52].max() == 0.0 and bases[:, : S // 2].max() == 1.0 and bases[:, S // 2:].max() == 1.0
    assert (priors.lung_zone_mask("upper", S, S) <= region_mask("lung", S, S)).all()
    with pytest.raises(ConfigError):
        priors.lung_zone_mask("hilar", S, S)


def test_rendered_masks_are_cached_and_read_only():
    a = region_mask("lung", 40, 48)
    assert a is region_mask("lung", 40, 48) and a.shape == (40, 48)
    with pytest.raises(ValueError):
        a[0, 0] = 1.0
    with pytest.raises(ConfigError):
        region_mask("liver", S, S)
    with pytest.raises(ConfigError):
        region_mask("lung", 0, S)


# --- refinement by location words -------------------------------------------------------------------------------


@pytest.mark.parametrize("finding", LUNG_FINDINGS)
def test_side_words_restrict_lung_priors_to_one_half(finding):
    both, _ = prior_for_edits([_edit(finding)], S, S)
    left, info = prior_for_edits([_edit(finding, "left")], S, S)
    right, _ = prior_for_edits([_edit(finding, "right")], S, S)
    bilateral, _ = prior_for_edits([_edit(finding, "bilateral")], S, S)
    # radiological convention: the patient's left is the image's right half
    assert left[:, : S // 2].max() == 0.0 and left[:, S // 2:].max() == 1.0
    assert right[:, S // 2:].max() == 0.0 and right[:, : S // 2].max() == 1.0
    np.testing.assert_array_equal(bilateral, both)
    np.testing.assert_array_equal(np.maximum(left, right), both)
    assert any("patient's left" in r for r in info.refinements)


def test_side_words_leave_midline_regions_alone():
    plain, _ = prior_for_edits([_edit("cardiomegaly")], S, S)
    left, info = prior_for_edits([_edit("cardiomegaly", "left")], S, S)
    np.testing.assert_array_equal(left, plain)
    assert any("not applied" in r for r in info.refinements)
    # heart failure: the lung part follows the side, the cardiac envelope stays whole
    hf_right, _ = prior_for_edits([_edit("heart failure", "right")], S, S)
    envelope = region_mask("cardiac_envelope", S, S)
    np.testing.assert_array_equal(hf_right[:, S // 2:], envelope[:, S // 2:])
    assert hf_right[:, : S // 2].max() == 1.0


def test_zone_words_restrict_focal_lung_priors_vertically():
    rows = (np.arange(S) + 0.5) / S
    upper, info = prior_for_edits([_edit("pneumonia", "right upper lung")], S, S)
    lower, _ = prior_for_edits([_edit("pneumonia", "right lower lung")], S, S)
    assert upper[rows > 0.5].max() == 0.0 and upper[rows < 0.35].max() == 1.0
    assert lower[rows < 0.42].max() == 0.0 and lower[rows > 0.6].max() == 1.0
    assert upper[:, S // 2:].max() == 0.0  # still one side
    assert any("restrict" in r for r in info.refinements)
    apical, _ = prior_for_edits([_edit("consolidation", "left apical")], S, S)
    assert apical[rows > 0.32].max() == 0.0 and apical.max() == 1.0
    mid_low, _ = prior_for_edits([_edit("lung opacity", "mid to lower lung")], S, S)  # several zones: union
    mid, _ = prior_for_edits([_edit("lung opacity", "mid lung")], S, S)
    assert (mid_low >= mid).all() and mid_low.sum() > mid.sum()


def test_zone_words_add_emphasis_to_diffuse_findings_without_removing():
    rows = (np.arange(S) + 0.5) / S
    plain, _ = prior_for_edits([_edit("edema")], S, S)
    basal, info = prior_for_edits([_edit("edema", "bibasilar")], S, S)
    assert (basal >= plain).all()
    lung = region_mask("lung", S, S)
    assert basal[(rows[:, None] > 0.65) & (lung == 1.0)].min() == 1.0
    assert plain[(rows[:, None] > 0.65) & (lung == 1.0)].max() < 1.0  # the emphasis is new
    assert any("added as primary" in r for r in info.refinements)


def test_zone_words_are_noted_where_they_do_not_apply():
    plain, _ = prior_for_edits([_edit("thymoma")], S, S)
    upper, info = prior_for_edits([_edit("thymoma", "upper")], S, S)
    np.testing.assert_array_equal(upper, plain)
    assert any("not applied" in r for r in info.refinements)
    _, info = prior_for_edits([_edit("pneumonia", "medial left lower lung")], S, S)
    assert any("medial" in w for w in info.warnings)


# --- fallbacks and unions -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "Make the image look healthier.", "Add the finding of pericardial effusion.",
                                  "Add the finding of edema and pericardial effusion.",
                                  "Add the finding of edema. Also rotate the patient."])
def test_unreadable_instructions_give_the_whole_image_with_a_warning(text):
    prior, info = prior_for_instruction(text, S, S)
    np.testing.assert_array_equal(prior, np.ones((S, S), np.float32))
    assert info.whole_image and info.warnings and "whole image" in info.warnings[0]


def test_no_edits_or_an_unknown_finding_give_the_whole_image_with_a_warning():
    for edits in ([], [Edit("add", ("tumor",))]):
        prior, info = prior_for_edits(edits, S, S)
        assert (prior == 1.0).all() and info.whole_image and info.warnings
    _, info = prior_for_instruction("pleural effusion got worse", S, S)
    assert info.whole_image and any("pleural effusion" in w for w in info.warnings)


def test_several_findings_and_edits_take_the_union():
    effusion, _ = prior_for_edits([_edit("pleural effusion", "left")], S, S)
    heart, _ = prior_for_edits([_edit("cardiomegaly")], S, S)
    ptx, _ = prior_for_edits([_edit("pneumothorax", "right")], S, S)
    both, info = prior_for_edits([Edit("add", ("pleural effusion",), location="left"),
                                  Edit("remove", ("pneumothorax",), location="right")], S, S)
    np.testing.assert_array_equal(both, np.maximum(effusion, ptx))
    assert info.findings == ("pleural effusion", "pneumothorax")
    one_edit, _ = prior_for_edits([Edit("add", ("pleural effusion", "cardiomegaly"), location="left")], S, S)
    np.testing.assert_array_equal(one_edit, np.maximum(effusion, heart))
    text, _ = prior_for_instruction("Add the findings of left pleural effusion and cardiomegaly.", S, S)
    np.testing.assert_array_equal(text, np.maximum(effusion, heart))


# --- resolution independence -------------------------------------------------------------------------------------


@pytest.mark.parametrize("finding", FINDINGS)
def test_priors_agree_across_resolutions(finding):
    small, _ = prior_for_edits([_edit(finding)], 64, 64)
    large, _ = prior_for_edits([_edit(finding)], 256, 256)
    pooled = large.reshape(64, 4, 64, 4).mean(axis=(1, 3))
    assert _iou(small >= 0.5, pooled >= 0.5) > 0.9
    assert np.abs(small - pooled).mean() < 0.02


def test_non_square_priors_use_the_same_normalized_geometry():
    wide, _ = prior_for_edits([_edit("pneumonia", "left")], 64, 128)
    square, _ = prior_for_edits([_edit("pneumonia", "left")], 128, 128)
    pooled = square.reshape(64, 2, 128, 1).mean(axis=(1, 3))
    assert _iou(wide >= 0.5, pooled >= 0.5) > 0.9


# --- MS-CXR box priors --------------------------------------------------------------------------------------------


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


MS_HEADER = ["dicom_id", "study_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width",
             "image_height"]


@pytest.fixture
def ms_cxr(tmp_path):
    meta = _write_csv(tmp_path / "meta.csv", ["dicom_id", "subject_id", "ViewPosition"],
                      [["pa1", 1, "PA"], ["pa2", 2, "PA"], ["ap1", 3, "AP"], ["lat1", 4, "LATERAL"]])
    rows = [
        # 1000 x 800 image: x, w scale by 64 / 1000, y, h by 64 / 800
        ["pa1", 10, "Pleural effusion", "left effusion", "p", 500, 400, 250, 200, 1000, 800],
        ["pa2", 20, "Pneumonia", "rll pneumonia", "p", 0, 0, 125, 100, 1000, 800],
        ["pa2", 20, "Pneumonia", "lul pneumonia", "p", 875, 700, 125, 100, 1000, 800],
        ["ap1", 30, "Cardiomegaly", "enlarged heart", "p", 0, 0, 1000, 800, 1000, 800],  # AP: dropped
        ["pa1", 10, "Lung Opacity", "opacity", "p", 250, 200, 500, 400, 1000, 800],
        ["pa1", 10, "Nodule", "nodule", "p", 0, 0, 10, 10, 1000, 800],  # no canonical finding
    ]
    boxes = _write_csv(tmp_path / "ms_cxr.csv", MS_HEADER, rows)
    return boxes, meta


def test_ms_cxr_priors_are_unions_of_pa_boxes(ms_cxr):
    boxes, meta = ms_cxr
    with pytest.warns(UserWarning, match="Nodule"):
        table = priors.priors_from_ms_cxr(boxes, meta, S, S)
    assert set(table) == {"pleural effusion", "pneumonia", "lung opacity"}  # AP cardiomegaly dropped
    want = np.zeros((S, S), np.float32)
    want[32:48, 32:48] = 1.0
    np.testing.assert_array_equal(table["pleural effusion"], want)
    want = np.zeros((S, S), np.float32)
    want[0:8, 0:8] = 1.0
    want[56:64, 56:64] = 1.0
    np.testing.assert_array_equal(table["pneumonia"], want)
    assert table["lung opacity"][16:48, 16:48].all() and table["lung opacity"].sum() == 32 * 32


def test_ms_cxr_categories_map_to_canonical_findings():
    names = {"Atelectasis": "atelectasis", "Cardiomegaly": "cardiomegaly", "Consolidation": "consolidation",
             "Edema": "edema", "Lung Opacity": "lung opacity", "Pleural Effusion": "pleural effusion",
             "Pleural effusion": "pleural effusion", "Effusion": "pleural effusion", "Pneumonia": "pneumonia",
             "Pneumothorax": "pneumothorax"}
    for category, finding in names.items():
        assert priors.ms_cxr_category_finding(category) == finding
    assert priors.ms_cxr_category_finding("Nodule") is None


def test_ms_cxr_table_replaces_builtin_priors(ms_cxr):
    boxes, meta = ms_cxr
    with pytest.warns(UserWarning):
        table = priors.priors_from_ms_cxr(boxes, meta, S, S)
    prior, info = prior_for_edits([_edit("pneumonia")], S, S, table=table)
    np.testing.assert_array_equal(prior, table["pneumonia"])
    assert info.sources == {"pneumonia": "table"}
    left, info = prior_for_instruction("Add the finding of left upper lung pneumonia.", S, S, table=table)
    assert left[:, : S // 2].max() == 0.0 and left[56:, 56:].min() == 1.0
    assert any("zone words" in r for r in info.refinements)
    builtin, _ = prior_for_edits([_edit("cardiomegaly")], S, S)
    heart, info = prior_for_edits([_edit("cardiomegaly")], S, S, table=table)
    np.testing.assert_array_equal(heart, builtin)
    assert info.sources == {"cardiomegaly": "builtin"} and any("not in the table" in r for r in info.refinements)
    with pytest.raises(ConfigError, match="shape"):
        prior_for_edits([_edit("pneumonia")], 32, 32, table=table)
    with pytest.raises(ConfigError, match="canonical"):
        prior_for_edits([_edit("pneumonia")], S, S, table={"nodule": np.zeros((S, S))})


def test_ms_cxr_errors_name_the_file_and_column(ms_cxr, tmp_path):
    boxes, meta = ms_cxr
    no_h = _write_csv(tmp_path / "no_h.csv", [c for c in MS_HEADER if c != "h"],
                      [["pa1", 1, "Pneumonia", "t", "p", 0, 0, 10, 100, 100]])
    with pytest.raises(DataError, match=r"no_h\.csv.*'h'"):
        priors.priors_from_ms_cxr(no_h, meta, S, S)
    no_view = _write_csv(tmp_path / "no_view.csv", ["dicom_id"], [["pa1"]])
    with pytest.raises(DataError, match=r"no_view\.csv.*ViewPosition"):
        priors.priors_from_ms_cxr(boxes, no_view, S, S)
    with pytest.raises(DataError, match="missing.csv"):
        priors.priors_from_ms_cxr(tmp_path / "missing.csv", meta, S, S)
    bad = _write_csv(tmp_path / "bad.csv", MS_HEADER, [["pa1", 1, "Pneumonia", "t", "p", "x?", 0, 10, 10, 100, 100]])
    with pytest.raises(DataError, match=r"bad\.csv: line 2"):
        priors.priors_from_ms_cxr(bad, meta, S, S)
    ap_only = _write_csv(tmp_path / "ap_only.csv", MS_HEADER,
                         [["ap1", 1, "Pneumonia", "t", "p", 0, 0, 10, 10, 100, 100]])
    with pytest.raises(DataError, match="no box"):
        priors.priors_from_ms_cxr(ap_only, meta, S, S)


# --- alignment with the synthetic benchmark ---------------------------------------------------------------------


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_synthetic_change_masks_lie_inside_the_prior(v2):
    """The true change mask of a synthetic edit lies (>= 90 %) where the prior of the instruction is >= 0.5."""
    inside, total, per_example = 0, 0, []
    per_finding: dict[str, list[int]] = {}
    for index in range(120):
        ex = synthetic.generate_example(0, index, S, v2, split="val")
        prior, info = prior_for_instruction(ex["instruction"], S, S)
        assert not info.whole_image, (ex["instruction"], info.warnings)
        mask = ex["mask"]
        hit = int((prior[mask] >= 0.5).sum())
        inside, total = inside + hit, total + int(mask.sum())
        per_example.append(hit / mask.sum())
        if len(ex["edits"]) == 1:
            counts = per_finding.setdefault(ex["edits"][0].findings[0], [0, 0])
            counts[0], counts[1] = counts[0] + hit, counts[1] + int(mask.sum())
    per_example = np.array(per_example)
    assert inside / total >= 0.95
    assert np.median(per_example) >= 0.95 and (per_example < 0.9).mean() <= 0.05
    assert set(per_finding) == set(synthetic.SYNTH_FINDINGS)
    for finding, (hit, n) in per_finding.items():
        assert hit / n >= 0.9, finding
    # and the prior is specific: it is not close to the whole image
    assert np.mean([(prior_for_instruction(t, S, S)[0] >= 0.5).mean() for t in
                    ("Add the finding of cardiomegaly.", "Add the finding of left pneumothorax.")]) < 0.4


def test_synthetic_locations_refine_the_prior():
    """A one-sided v2 synthetic edit gets a one-sided prior, and its change mask is on that side too."""
    checked = 0
    for index in range(60):
        ex = synthetic.generate_example(0, index, S, True, split="val")
        sides = location_sides(ex["edits"][0].location)
        if len(ex["edits"]) != 1 or len(sides) != 1:
            continue
        prior, info = prior_for_instruction(ex["instruction"], S, S)
        other = slice(0, S // 2) if sides == {"left"} else slice(S // 2, S)  # the image half of the other side
        assert prior[:, other].max() == 0.0
        assert not ex["mask"][:, other].any()
        assert any("restricted to the patient's" in r for r in info.refinements)
        checked += 1
    assert checked >= 10
