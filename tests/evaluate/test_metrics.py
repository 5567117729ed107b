import math

import numpy as np
import pytest

from x2x_jax.data.instructions import Edit
from x2x_jax.evaluate import metrics as M


def _square(size=16, y0=4, y1=10, x0=3, x1=9):
    m = np.zeros((size, size), bool)
    m[y0:y1, x0:x1] = True
    return m


# ---------------------------------------------------------------------------------------------------- localization


def test_iou_known_overlap_and_batching():
    true = _square(16, 0, 4, 0, 4)  # 16 px
    pred = _square(16, 0, 4, 2, 6)  # 16 px, 8 shared -> 8 / 24
    assert M.iou(pred, true) == pytest.approx(8 / 24)
    assert M.iou(true, true) == 1.0
    assert M.iou(~true, true) == 0.0
    batch = M.iou(np.stack([pred, true, ~true]), np.stack([true] * 3))
    np.testing.assert_allclose(batch, [8 / 24, 1.0, 0.0])


def test_empty_true_mask_is_nan_and_counted():
    true = np.stack([_square(), np.zeros((16, 16), bool)])
    pred = np.stack([_square(), np.zeros((16, 16), bool)])
    for values in (M.iou(pred, true), M.map_auroc(pred.astype(float), true), M.pointing_game(pred, true)):
        assert values[0] == 1.0 and np.isnan(values[1])
        s = M.summarize(values)
        assert s == {"mean": 1.0, "n": 1, "n_undefined": 1}
    assert math.isnan(M.summarize([np.nan])["mean"])


def test_thresholded_iou_uses_greater_equal():
    true = _square()
    score = np.where(true, 0.7, 0.2)
    assert M.thresholded_iou(score, true, 0.7) == 1.0
    assert M.thresholded_iou(score, true, 0.2) == pytest.approx(true.sum() / true.size)
    assert M.thresholded_iou(score, true, 0.71) == 0.0


def test_roc_auc_against_pairwise_definition():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    labels = rng.random(60) < 0.4
    pos, neg = scores[labels], scores[~labels]
    brute = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (pos.size * neg.size)
    assert M.roc_auc(scores, labels) == pytest.approx(brute)
    assert math.isnan(M.roc_auc(scores, np.zeros(60, bool)))
    assert math.isnan(M.roc_auc(scores, np.ones(60, bool)))


def test_map_auroc_mask_shuffled_constant_and_inverse():
    rng = np.random.default_rng(1)
    true = np.zeros((64, 64), bool)
    true[10:40, 20:50] = True
    assert M.map_auroc(true.astype(float), true) == 1.0
    assert M.map_auroc(-true.astype(float), true) == 0.0
    assert M.map_auroc(np.zeros((64, 64)), true) == 0.5  # all tied
    shuffled = np.stack([rng.permutation(true.ravel()).reshape(64, 64).astype(float) for _ in range(20)])
    aucs = M.map_auroc(shuffled + 0.01 * rng.random(shuffled.shape), np.broadcast_to(true, shuffled.shape))
    assert aucs.shape == (20,)
    assert abs(aucs.mean() - 0.5) < 0.02
    # A blurred-ish map that is higher on the mask, with noise, sits strictly between.
    noisy = true + rng.normal(0, 0.7, true.shape)
    assert 0.7 < M.map_auroc(noisy, true) < 1.0


def test_pointing_game_hit_miss_and_ties():
    true = _square()
    score = np.zeros((16, 16))
    score[5, 5] = 1.0
    assert M.pointing_game(score, true) == 1.0
    score[5, 5], score[0, 15] = 0.0, 1.0
    assert M.pointing_game(score, true) == 0.0
    # A constant map: every pixel is a maximum -> the mask's area fraction, not 0 or 1.
    assert M.pointing_game(np.ones((16, 16)), true) == pytest.approx(true.mean())


# ---------------------------------------------------------------------------------------------------- preservation


def test_identical_images_are_perfectly_preserved():
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (3, 32, 32))
    region = np.zeros((32, 32), bool)
    region[8:16, 8:16] = True
    assert np.all(M.psnr_outside(x, x, region) == np.inf)
    np.testing.assert_allclose(M.ssim_outside(x, x, region), 1.0)
    np.testing.assert_array_equal(M.mae_outside(x, x, region), 0.0)


def test_changes_inside_the_region_are_ignored_by_mae_and_psnr():
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (32, 32))
    region = _square(32, 8, 20, 8, 20)
    y = np.where(region, -x, x)
    assert M.mae_outside(x, y, region) == 0.0
    assert M.psnr_outside(x, y, region) == np.inf
    assert M.mae_outside(x, y, np.zeros_like(region)) > 0.1


def test_psnr_and_mae_known_values():
    x = np.zeros((2, 16, 16))
    region = _square()
    y = x + np.array([0.1, 0.5])[:, None, None]
    np.testing.assert_allclose(M.mae_outside(x, y, region), [0.1, 0.5])
    np.testing.assert_allclose(M.psnr_outside(x, y, region), 10 * np.log10(4.0 / np.array([0.01, 0.25])))
    np.testing.assert_allclose(M.psnr_outside(x, y, region, data_range=1.0), 10 * np.log10(1.0 / np.array([0.01, 0.25])))


def test_nothing_outside_is_nan():
    x = np.zeros((8, 8))
    full = np.ones((8, 8), bool)
    for f in (M.mae_outside, M.psnr_outside, M.ssim_outside):
        assert np.isnan(f(x, x + 1, full))


def test_ssim_constant_images_closed_form():
    a, b = 0.3, -0.2
    c1 = (0.01 * 2.0) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)  # zero variances: the structure term is c2 / c2
    got = M.ssim_outside(np.full((16, 16), a), np.full((16, 16), b), np.zeros((16, 16), bool))
    assert got == pytest.approx(expected)


def test_ssim_matches_scipy_gaussian_filter_reference():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(4)
    x = rng.uniform(-1, 1, (24, 24))
    y = np.clip(x + rng.normal(0, 0.2, x.shape), -1, 1)

    def filt(z):  # scipy's "reflect" is NumPy's "symmetric"; 11 taps for sigma 1.5, truncate 3.5
        return ndimage.gaussian_filter(z, 1.5, truncate=3.5, mode="reflect")

    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
    ref = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    np.testing.assert_allclose(M.ssim_map(x, y), ref, atol=1e-12)
    region = _square(24, 0, 12, 0, 24)
    assert M.ssim_outside(x, y, region) == pytest.approx(ref[12:].mean())
    assert 0 < M.ssim_outside(x, y, region) < 1


def test_ssim_drops_with_noise():
    rng = np.random.default_rng(5)
    x = np.clip(rng.normal(0, 0.3, (32, 32)), -1, 1)
    none = np.zeros((32, 32), bool)
    s = [M.ssim_outside(x, x + rng.normal(0, sd, x.shape), none) for sd in (0.01, 0.1, 0.5)]
    assert s[0] > s[1] > s[2]


def test_mean_abs_laplacian_known_values_and_blur():
    ramp = np.tile(np.arange(8.0), (8, 1))  # linear: zero Laplacian away from the replicated edges
    inner = np.zeros((8, 8), bool)
    inner[1:-1, 1:-1] = True
    assert M.mean_abs_laplacian(ramp, inner) == 0.0
    spike = np.zeros((2, 5, 5))
    spike[:, 2, 2] = 1.0  # |Laplacian| = 4 at the spike, 1 at its 4 neighbours
    np.testing.assert_allclose(M.mean_abs_laplacian(spike, np.ones((5, 5), bool)), [8 / 25] * 2)
    assert np.isnan(M.mean_abs_laplacian(spike[0], np.zeros((5, 5), bool)))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 32))
    blurred = (x + np.roll(x, 1, 0) + np.roll(x, 1, 1) + np.roll(x, (1, 1), (0, 1))) / 4
    everywhere = np.ones((32, 32), bool)
    assert M.mean_abs_laplacian(blurred, everywhere) < 0.5 * M.mean_abs_laplacian(x, everywhere)


# ---------------------------------------------------------------------------------------------------- realism


def _exact_gaussian_sample(rng, n, d):
    """n samples whose sample mean is exactly 0 and sample covariance exactly I."""
    z = rng.standard_normal((n, d))
    z -= z.mean(0)
    l = np.linalg.cholesky(np.cov(z, rowvar=False))
    return z @ np.linalg.inv(l).T


def test_frechet_identical_sets_is_zero():
    rng = np.random.default_rng(6)
    a = rng.standard_normal((200, 8)) @ rng.standard_normal((8, 8))
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert M.frechet_distance(a, a[::-1]) == pytest.approx(0.0, abs=1e-8)


def test_frechet_shift_and_scale_closed_forms():
    rng = np.random.default_rng(7)
    z = _exact_gaussian_sample(rng, 500, 6)
    shift = np.arange(6.0)
    # Same covariance, shifted mean: |shift|^2.
    assert M.frechet_distance(z, z + shift) == pytest.approx((shift**2).sum(), rel=1e-9)
    # Diagonal covariances s1^2, s2^2: sum (s1 - s2)^2 (+ mean term).
    s1 = np.array([1.0, 2.0, 0.5, 1.0, 3.0, 1.0])
    s2 = np.array([2.0, 2.0, 1.0, 0.1, 1.0, 1.0])
    expected = ((s1 - s2) ** 2).sum() + (shift**2).sum()
    assert M.frechet_distance(z * s1, _exact_gaussian_sample(rng, 300, 6) * s2 + shift) == pytest.approx(expected)


def test_frechet_matches_scipy_sqrtm_formulation():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(8)
    a = rng.standard_normal((300, 5)) @ rng.standard_normal((5, 5))
    b = rng.standard_normal((250, 5)) @ rng.standard_normal((5, 5)) + 0.5
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = np.real(linalg.sqrtm(ca @ cb))
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * covmean)
    assert M.frechet_distance(a, b) == pytest.approx(ref, rel=1e-7)


def test_frechet_rejects_bad_shapes():
    with pytest.raises(ValueError):
        M.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError):
        M.frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


# ---------------------------------------------------------------------------------------------------- seed stability


def test_seed_stability():
    a = _square(16, 0, 4, 0, 4).astype(float)
    b = _square(16, 0, 4, 2, 6).astype(float)
    assert M.seed_stability(np.stack([a, a, a]), 0.5) == 1.0
    # Pairs (a,a) = 1, (a,b) = (a,b) = 8 / 24.
    assert M.seed_stability(np.stack([a, a, b]), 0.5) == pytest.approx((1 + 1 / 3 + 1 / 3) / 3)
    # Batched over images; an image whose maps are all empty is NaN.
    maps = np.stack([np.stack([a, np.zeros_like(a)]), np.stack([b, np.zeros_like(a)])])  # [S=2, N=2, H, W]
    out = M.seed_stability(maps, 0.5)
    assert out.shape == (2,) and out[0] == pytest.approx(1 / 3) and np.isnan(out[1])
    with pytest.raises(ValueError):
        M.seed_stability(a[None], 0.5)


# ---------------------------------------------------------------------------------------------------- instruction following


FINDINGS = ("a", "b", "c")


def test_edit_ops_per_finding():
    edits = (Edit("add", ("a", "c")), Edit("change", ("b",), level_from="mild", level_to="severe"),
             Edit("remove", ("zzz",)))
    assert M.edit_ops_per_finding(edits, FINDINGS).tolist() == ["add", "change", "add"]
    assert M.edit_ops_per_finding((), FINDINGS).tolist() == ["", "", ""]


def test_instruction_following_per_finding_and_op():
    target = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    pred = np.array([[0.9, 0.1, 0.2], [0.4, 0.8, 0.0], [0.1, 0.9, 0.6], [0.0, 0.0, 0.3]])
    # binary: [[1,0,0],[0,1,0],[0,1,1],[0,0,0]] -> correct: [[T,T,T],[T,T,T],[F,T,F],[T,T,F]]
    ops = np.array([["add", "", ""], ["", "change", ""], ["add", "", "remove"], ["", "", "add"]], dtype=object)
    r = M.instruction_following(pred, target, ops, FINDINGS)
    assert r["per_finding"] == {"a": 0.75, "b": 1.0, "c": 0.5}
    assert r["per_op"] == {"add": pytest.approx(1 / 3), "change": 1.0, "remove": 0.0, "untouched": 1.0}
    assert r["op_counts"] == {"add": 3, "change": 1, "remove": 1, "untouched": 7}
    assert r["exact_match"] == 0.5
    assert r["mean_per_finding"] == pytest.approx(0.75)
    # One op per example: the op's accuracy averages all findings of its examples.
    r1 = M.instruction_following(pred > 0.5, target, ["add", "change", "add", "remove"], FINDINGS)
    assert r1["per_op"] == {"add": pytest.approx(4 / 6), "change": 1.0, "remove": pytest.approx(2 / 3)}
    with pytest.raises(ValueError):
        M.instruction_following(pred, target, ["add"], FINDINGS)


# ---------------------------------------------------------------------------------------------------- identity


def test_pearson_and_binary_accuracy():
    rng = np.random.default_rng(9)
    a = rng.normal(size=100)
    assert M.pearson(a, 3 * a + 1) == pytest.approx(1.0)
    assert M.pearson(a, -a) == pytest.approx(-1.0)
    assert abs(M.pearson(a, rng.normal(size=100))) < 0.3
    assert math.isnan(M.pearson(a, np.ones(100)))
    assert M.binary_accuracy([0.9, 0.2, 0.6, 0.4], [1, 0, 0, 0]) == 0.75
    assert M.binary_accuracy(np.array([True, False]), np.array([0.7, 0.7])) == 0.5


def test_identity_preservation():
    src = {"age": np.array([30.0, 50.0, 70.0]), "habitus": np.array([0.9, 1.0, 1.1]), "sex": np.array([0.9, 0.1, 0.8])}
    same = M.identity_preservation(src, src)
    assert same == {"age_pearson": pytest.approx(1.0), "age_mae": 0.0, "habitus_pearson": pytest.approx(1.0),
                    "habitus_mae": 0.0, "sex_agreement": 1.0}
    edited = {"age": src["age"] + 5.0, "habitus": src["habitus"][::-1], "sex": np.array([0.9, 0.6, 0.8])}
    r = M.identity_preservation(src, edited)
    assert r["age_pearson"] == pytest.approx(1.0) and r["age_mae"] == pytest.approx(5.0)
    assert r["habitus_pearson"] == pytest.approx(-1.0)
    assert r["sex_agreement"] == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------------------------------------------
# Bootstrap intervals


def test_bootstrap_mean_interval_matches_the_normal_approximation():
    # 100 coin flips, half heads: the mean's 95 % interval is 0.5 +- 1.96 * sqrt(0.25 / 100) = [0.402, 0.598]
    rec = M.PerExample(100)
    assert rec.mean("p", np.r_[np.zeros(50), np.ones(50)]) == 0.5
    idx = M.bootstrap_indices(100, draws=4000, seed=0)
    lo, hi = M.percentile_interval(rec.draws(idx)["p"])
    assert abs(lo - 0.402) < 0.015 and abs(hi - 0.598) < 0.015


def test_bootstrap_known_cases():
    idx = M.bootstrap_indices(5, draws=200, seed=1)
    assert idx.shape == (200, 5) and idx.min() >= 0 and idx.max() <= 4
    assert (idx == M.bootstrap_indices(5, draws=200, seed=1)).all()  # same seed, same resamples
    rec = M.PerExample(5)
    assert rec.mean("constant", [3.0] * 5) == 3.0
    # NaN examples are left out, as in summarize: the mean of the defined values, resampled
    assert rec.mean("with_nan", [1.0, np.nan, 1.0, 1.0, 1.0]) == 1.0
    # cells grouped by example: 3 of 6 edited cells right
    assert rec.ratio("acc", [1, 0, 2, 0, 0], [1, 1, 2, 1, 1]) == 0.5
    assert rec.pearson("r", [1, 2, 3, 4, 5], [2, 4, 6, 8, 10]) == pytest.approx(1.0)
    d = rec.draws(idx)
    assert M.percentile_interval(d["constant"]) == [3.0, 3.0]
    assert M.percentile_interval(d["with_nan"]) == [1.0, 1.0]  # a resample of only the NaN example is undefined
    # a resample's ratio is the sum of its examples' hits over the sum of their cells
    want = np.array([sum([1, 0, 2, 0, 0][i] for i in row) / sum([1, 1, 2, 1, 1][i] for i in row) for row in idx])
    np.testing.assert_allclose(d["acc"], want)
    r = d["r"][~np.isnan(d["r"])]  # a resample of one repeated example has no correlation
    np.testing.assert_allclose(r, 1.0)
    # two identical rows resampled alike: their paired difference is exactly 0
    other = M.PerExample(5)
    other.ratio("acc", [1, 0, 2, 0, 0], [1, 1, 2, 1, 1])
    assert M.percentile_interval(d["acc"] - other.draws(idx)["acc"]) == [0.0, 0.0]


def test_percentile_interval_needs_most_samples_defined():
    assert M.percentile_interval([np.nan] * 6 + [1.0] * 4) is None
    assert M.percentile_interval(np.arange(101.0), level=0.9) == pytest.approx([5.0, 95.0])
    with pytest.raises(ValueError, match="expected 3 per-example values"):
        M.PerExample(3).mean("x", [1.0, 2.0])
