"""Evaluation metrics for region-specific editing: pure NumPy functions, batched over leading axes.

Conventions
-----------
* Maps and masks are ``[..., H, W]``; a per-image metric returns an array of shape ``[...]`` (a NumPy scalar for
  one image). Images are single-channel floats in [-1, 1], so the PSNR/SSIM data range defaults to 2.
* A metric that is undefined for an image (an empty true change mask, no pixel outside the region, a constant
  variable) is NaN, never a silent 0 or 1. `summarize` averages over the defined values and says how many were
  undefined, so a report can show both.

Groups: localization (`iou`, `thresholded_iou`, `roc_auc`, `map_auroc`, `pointing_game`), preservation outside a
region (`mae_outside`, `psnr_outside`, `ssim_outside`), sharpness (`mean_abs_laplacian`), realism
(`frechet_distance`), seed stability (`seed_stability`), instruction following (`edit_ops_per_finding`,
`instruction_following`), identity preservation (`pearson`, `binary_accuracy`, `identity_preservation`) and
uncertainty (`PerExample`, `bootstrap_indices`, `percentile_interval`: bootstrap confidence intervals over examples).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

DATA_RANGE = 2.0  # images live in [-1, 1]


def summarize(values) -> dict:
    """Mean over the defined (non-NaN) values, with the counts: ``{"mean", "n", "n_undefined"}``.

    ``mean`` is NaN when no value is defined. Infinite values (e.g. PSNR of identical images) are kept, so the
    mean of a set containing ``inf`` is ``inf``; report a PSNR median or cap it if that matters.
    """
    v = np.asarray(values, np.float64).ravel()
    defined = ~np.isnan(v)
    n = int(defined.sum())
    return {"mean": float(v[defined].mean()) if n else float("nan"), "n": n, "n_undefined": int(v.size - n)}


# ----------------------------------------------------------------------------------------------------------------
# Localization


def _flat_hw(x: np.ndarray) -> np.ndarray:
    if x.ndim < 2:
        raise ValueError(f"expected [..., H, W] arrays, got shape {x.shape}")
    return x.reshape(x.shape[:-2] + (-1,))


def iou(pred_mask, true_mask) -> np.ndarray:
    """Intersection over union of binary masks ``[..., H, W]`` -> ``[...]``; NaN where the true mask is empty."""
    pred = _flat_hw(np.asarray(pred_mask, bool))
    true = _flat_hw(np.asarray(true_mask, bool))
    pred, true = np.broadcast_arrays(pred, true)
    inter = (pred & true).sum(-1)
    union = (pred | true).sum(-1)
    has_true = true.any(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(has_true, inter / np.maximum(union, 1), np.nan)


def thresholded_iou(score_map, true_mask, threshold: float) -> np.ndarray:
    """`iou` of ``score_map >= threshold`` vs the true mask (the RSE mask is ``G >= tau``)."""
    return iou(np.asarray(score_map) >= threshold, true_mask)


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve of 1-D ``scores`` for binary ``labels`` (rank-based: Mann-Whitney U).

    Tied scores get their average rank, so a tie between a positive and a negative counts one half. NaN when
    there are no positives or no negatives.
    """
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels, bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in size: {s.shape} vs {y.shape}")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array, ties sharing the mean of the ranks they span."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    # Boundaries of runs of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]
    run_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(x.size, np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def map_auroc(score_map, true_mask) -> np.ndarray:
    """Pixel-level AUROC of a continuous map vs the true mask, per image ``[..., H, W]`` -> ``[...]``.

    NaN where the true mask is empty (or covers the whole image).
    """
    scores = _flat_hw(np.asarray(score_map, np.float64))
    labels = _flat_hw(np.asarray(true_mask, bool))
    scores, labels = np.broadcast_arrays(scores, labels)
    batch = scores.shape[:-1]
    out = np.array([roc_auc(s, y) for s, y in zip(scores.reshape(-1, scores.shape[-1]),
                                                   labels.reshape(-1, labels.shape[-1]), strict=True)])
    return out.reshape(batch)


def pointing_game(score_map, true_mask) -> np.ndarray:
    """Whether the map's maximum falls inside the true mask, per image ``[..., H, W]`` -> ``[...]`` in [0, 1].

    When several pixels share the maximum the score is the fraction of them inside the mask (so a constant map
    scores the mask's area fraction, chance level, rather than an arbitrary 0 or 1). NaN where the mask is empty.
    """
    scores = _flat_hw(np.asarray(score_map, np.float64))
    labels = _flat_hw(np.asarray(true_mask, bool))
    scores, labels = np.broadcast_arrays(scores, labels)
    is_max = scores == scores.max(-1, keepdims=True)
    hits = (is_max & labels).sum(-1) / is_max.sum(-1)
    return np.where(labels.any(-1), hits, np.nan)


# ----------------------------------------------------------------------------------------------------------------
# Preservation outside a region


def _outside(region, shape) -> np.ndarray:
    out = ~np.asarray(region, bool)
    return np.broadcast_to(out, shape)


def mae_outside(x, y, region) -> np.ndarray:
    """Mean |x - y| over the pixels outside ``region``, per image -> ``[...]``; NaN if nothing is outside."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    w = _flat_hw(_outside(region, np.broadcast_shapes(x.shape, y.shape)))
    err = _flat_hw(np.abs(x - y))
    n = w.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (err * w).sum(-1) / n, np.nan)


def psnr_outside(x, y, region, data_range: float = DATA_RANGE) -> np.ndarray:
    """PSNR in dB over the pixels outside ``region``: ``10 log10(R^2 / MSE)``; ``inf`` when they are identical,
    NaN if nothing is outside."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    w = _flat_hw(_outside(region, np.broadcast_shapes(x.shape, y.shape)))
    sq = _flat_hw((x - y) ** 2)
    n = w.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mse = np.where(n > 0, (sq * w).sum(-1) / n, np.nan)
        return np.where(mse == 0, np.inf, 10.0 * np.log10(data_range**2 / mse))


def gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
    """Normalized 1-D Gaussian taps (radius ``round(truncate * sigma)``; 11 taps for the SSIM default)."""
    radius = int(truncate * sigma + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-0.5 * (t / sigma) ** 2)
    return g / g.sum()


def _gaussian_filter(img: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable filter over the last two axes with reflected borders (same size out)."""
    r = taps.size // 2
    pad = [(0, 0)] * (img.ndim - 2) + [(r, r), (r, r)]
    p = np.pad(img, pad, mode="symmetric")
    h, w = img.shape[-2:]
    rows = sum(taps[k] * p[..., k:k + h, :] for k in range(taps.size))
    return sum(taps[k] * rows[..., :, k:k + w] for k in range(taps.size))


def ssim_map(x, y, data_range: float = DATA_RANGE, sigma: float = 1.5) -> np.ndarray:
    """Per-pixel SSIM (Wang et al. 2004; Gaussian window, K1 = 0.01, K2 = 0.03, population statistics) computed
    on the full images ``[..., H, W]`` with reflected borders."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    x, y = np.broadcast_arrays(x, y)
    taps = gaussian_window(sigma)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mx, my = _gaussian_filter(x, taps), _gaussian_filter(y, taps)
    vx = _gaussian_filter(x * x, taps) - mx * mx
    vy = _gaussian_filter(y * y, taps) - my * my
    cxy = _gaussian_filter(x * y, taps) - mx * my
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def ssim_outside(x, y, region, data_range: float = DATA_RANGE, sigma: float = 1.5) -> np.ndarray:
    """Mean of `ssim_map` (computed on the full images) over the pixels outside ``region`` -> ``[...]``.

    Windows near the region's border see some edited pixels; that is intended: a seam at the region's edge is a
    preservation failure. NaN if nothing is outside.
    """
    s = ssim_map(x, y, data_range, sigma)
    w = _flat_hw(_outside(region, s.shape))
    n = w.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (_flat_hw(s) * w).sum(-1) / n, np.nan)


def mean_abs_laplacian(x, region) -> np.ndarray:
    """Sharpness: the mean |5-point Laplacian| of ``x`` over the pixels inside ``region`` (edges replicated), per
    image -> ``[...]``; blur lowers it. NaN where the region is empty."""
    x = np.asarray(x, np.float64)
    p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
    laplacian = p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:] - 4.0 * x
    return mae_outside(laplacian, 0.0, ~np.asarray(region, bool))  # the mean |laplacian - 0| inside the region


# ----------------------------------------------------------------------------------------------------------------
# Realism


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(c)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(features_a, features_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, D]`` (the FID formula):
    ``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))``.

    The trace of the matrix square root uses ``tr((C_a C_b)^(1/2)) = tr((S C_b S)^(1/2))`` with ``S = C_a^(1/2)``
    (C_a C_b is similar to the symmetric PSD matrix S C_b S), so two symmetric eigendecompositions replace a
    general `sqrtm` and no complex round-off needs discarding.
    """
    a = np.asarray(features_a, np.float64)
    b = np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected [N, D] feature sets with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need at least 2 samples per set for a covariance, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca = np.atleast_2d(np.cov(a, rowvar=False))
    cb = np.atleast_2d(np.cov(b, rowvar=False))
    s = _psd_sqrt(ca)
    cross = np.linalg.eigvalsh(s @ cb @ s)
    tr_sqrt = np.sqrt(np.clip(cross, 0.0, None)).sum()
    d = float(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2.0 * tr_sqrt)
    return max(d, 0.0)  # round-off can make identical sets come out at -1e-12


# ----------------------------------------------------------------------------------------------------------------
# Seed stability


def seed_stability(score_maps, threshold: float) -> np.ndarray:
    """Mean pairwise IoU between the thresholded maps of different seeds.

    ``score_maps`` is ``[S, ..., H, W]`` (S >= 2 seeds); returns ``[...]``. A pair whose two masks are both empty
    has no IoU and is left out; an image where every pair is so is NaN.
    """
    m = np.asarray(score_maps) >= threshold
    if m.ndim < 3 or m.shape[0] < 2:
        raise ValueError(f"expected [S >= 2, ..., H, W] maps, got shape {m.shape}")
    m = _flat_hw(m)
    vals = []
    for i, j in itertools.combinations(range(m.shape[0]), 2):
        union = (m[i] | m[j]).sum(-1)
        inter = (m[i] & m[j]).sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            vals.append(np.where(union > 0, inter / np.maximum(union, 1), np.nan))
    vals = np.stack(vals)
    defined = ~np.isnan(vals)
    n = defined.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.where(defined, vals, 0.0).sum(0) / np.maximum(n, 1), np.nan)


# ----------------------------------------------------------------------------------------------------------------
# Instruction following


def edit_ops_per_finding(edits, findings: Sequence[str]) -> np.ndarray:
    """The op ("add" | "remove" | "change") each finding receives from an example's `Edit`s, ``""`` where untouched;
    shape ``[len(findings)]``. Findings outside the list are ignored."""
    ops = np.full(len(findings), "", dtype=object)
    index = {f: i for i, f in enumerate(findings)}
    for e in edits:
        for f in e.findings:
            if f in index:
                ops[index[f]] = e.op
    return ops


def instruction_following(pred_labels, target_labels, ops, findings: Sequence[str], threshold: float = 0.5) -> dict:
    """Accuracy of predicted vs target multi-hot labels ``[N, F]``, per finding and per op.

    ``pred_labels``: probabilities (thresholded at ``threshold``) or booleans. ``ops``: either one op per example
    ``[N]`` (then the op's accuracy averages all findings of its examples) or per (example, finding) ``[N, F]``
    from `edit_ops_per_finding` (then only the edited cells count: did an added finding appear, a removed one
    disappear; ``""`` cells form the "untouched" group).

    Returns ``{"per_finding": {name: acc}, "per_op": {op: acc}, "op_counts": {op: cells}, "mean_per_finding",
    "exact_match"}``; a finding or op with no cells is NaN / absent.
    """
    p = np.asarray(pred_labels)
    pred = p >= threshold if p.dtype.kind == "f" else p.astype(bool)
    target = np.asarray(target_labels).astype(bool)
    if pred.shape != target.shape or pred.ndim != 2 or pred.shape[1] != len(findings):
        raise ValueError(f"expected [N, {len(findings)}] predictions and targets, got {pred.shape}, {target.shape}")
    ops = np.asarray(ops, dtype=object)
    if ops.shape == (pred.shape[0],):
        ops = np.repeat(ops[:, None], pred.shape[1], axis=1)
    elif ops.shape != pred.shape:
        raise ValueError(f"ops must have shape [N] or [N, F] = {pred.shape}, got {ops.shape}")
    correct = pred == target
    per_finding = {f: float(correct[:, i].mean()) if len(correct) else float("nan") for i, f in enumerate(findings)}
    per_op, op_counts = {}, {}
    for op in sorted(set(ops.ravel().tolist())):
        sel = ops == op
        name = op if op else "untouched"
        per_op[name] = float(correct[sel].mean())
        op_counts[name] = int(sel.sum())
    return {
        "per_finding": per_finding,
        "per_op": per_op,
        "op_counts": op_counts,
        "mean_per_finding": float(np.mean(list(per_finding.values()))),
        "exact_match": float(correct.all(1).mean()) if len(correct) else float("nan"),
    }


# ----------------------------------------------------------------------------------------------------------------
# Identity preservation


def pearson(a, b) -> float:
    """Pearson correlation of two 1-D arrays; NaN if either is constant or they have < 2 values."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"arrays differ in size: {a.shape} vs {b.shape}")
    if a.size < 2:
        return float("nan")
    da, db = a - a.mean(), b - b.mean()
    denom = np.sqrt((da * da).sum() * (db * db).sum())
    return float((da * db).sum() / denom) if denom > 0 else float("nan")


def binary_accuracy(pred, target, threshold: float = 0.5) -> float:
    """Accuracy of binary predictions (probabilities are thresholded) vs binary targets."""
    p = np.asarray(pred)
    p = p >= threshold if p.dtype.kind == "f" else p.astype(bool)
    t = np.asarray(target)
    t = t >= threshold if t.dtype.kind == "f" else t.astype(bool)
    if p.shape != t.shape:
        raise ValueError(f"arrays differ in shape: {p.shape} vs {t.shape}")
    return float((p == t).mean()) if p.size else float("nan")


def identity_preservation(source: dict, edited: dict, continuous=("age", "habitus"), binary=("sex",)) -> dict:
    """Agreement of an identity predictor on edited vs source images.

    ``source`` / ``edited``: dicts of ``[N]`` predictions (e.g. `classifiers.predict` output). For each continuous
    key: Pearson correlation and mean absolute difference; for each binary key (a probability): agreement of the
    thresholded predictions.
    """
    out = {}
    for k in continuous:
        out[f"{k}_pearson"] = pearson(edited[k], source[k])
        out[f"{k}_mae"] = float(np.mean(np.abs(np.asarray(edited[k], np.float64) - np.asarray(source[k], np.float64))))
    for k in binary:
        out[f"{k}_agreement"] = binary_accuracy(edited[k], source[k])
    return out


# ----------------------------------------------------------------------------------------------------------------
# Uncertainty: bootstrap over examples


def bootstrap_indices(n: int, draws: int = 1000, seed: int = 0) -> np.ndarray:
    """``[draws, n]`` example indices, each row a resample of ``range(n)`` with replacement."""
    return np.random.default_rng([seed, 0xB007]).integers(0, n, size=(draws, n))


def percentile_interval(samples, level: float = 0.95) -> list[float] | None:
    """The percentile interval ``[lo, hi]`` holding ``level`` of the defined (non-NaN) bootstrap samples; None when
    fewer than half of them are defined (a resample left the metric undefined too often to say)."""
    s = np.asarray(samples, np.float64)
    s = s[~np.isnan(s)]
    if 2 * s.size < np.asarray(samples).size or s.size == 0:
        return None
    tail = 100 * (1 - level) / 2
    return [float(np.percentile(s, tail)), float(np.percentile(s, 100 - tail))]


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    da, db = a - a.mean(-1, keepdims=True), b - b.mean(-1, keepdims=True)
    denom = np.sqrt((da * da).sum(-1) * (db * db).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (da * db).sum(-1) / denom, np.nan)


class PerExample:
    """Aggregates of per-example values that remember how they were aggregated, so that each can be recomputed on
    bootstrap resamples of the examples. Every method of an evaluation is resampled with the same indices, so the
    difference of two methods' metrics gets a paired interval.

    Each method returns the point estimate (exactly what the plain aggregate gives; None where undefined) and
    records, under ``key``, a function of ``[draws, n]`` indices -> ``[draws]`` resampled values.
    """

    def __init__(self, n: int):
        self.n = n
        self.stats: dict = {}

    def _values(self, values) -> np.ndarray:
        v = np.asarray(values, np.float64)
        if v.shape != (self.n,):
            raise ValueError(f"expected {self.n} per-example values, got shape {v.shape}")
        return v

    def mean(self, key: str, values) -> float | None:
        """Mean over the examples where the value is defined (as `summarize`)."""
        v = self._values(values)

        def stat(idx):
            r = v[idx]
            defined = ~np.isnan(r)
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(defined, r, 0).sum(-1) / defined.sum(-1)

        self.stats[key] = stat
        s = summarize(v)
        return None if s["n"] == 0 else s["mean"]

    def ratio(self, key: str, hits, counts) -> float | None:
        """sum(hits) / sum(counts) over examples: an accuracy over cells grouped by example."""
        h, c = self._values(hits), self._values(counts)

        def stat(idx):
            with np.errstate(invalid="ignore", divide="ignore"):
                return h[idx].sum(-1) / c[idx].sum(-1)

        self.stats[key] = stat
        return float(h.sum() / c.sum()) if c.sum() else None

    def pearson(self, key: str, a, b) -> float:
        """Pearson correlation of two per-example quantities (NaN where undefined, as `pearson`)."""
        a, b = self._values(a), self._values(b)
        self.stats[key] = lambda idx: _rowwise_pearson(a[idx], b[idx])
        return pearson(a, b)

    def draws(self, idx: np.ndarray) -> dict:
        """{key: [draws] resampled values} for ``idx`` from `bootstrap_indices`."""
        return {k: f(idx) for k, f in self.stats.items()}
