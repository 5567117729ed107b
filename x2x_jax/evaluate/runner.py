"""The evaluation suite: edit a test split with each method and measure localization, preservation, instruction
following, identity preservation, realism and seed stability.

    python -m x2x_jax.evaluate --out DIR                      # shipped tiny model, synthetic test split
    python -m x2x_jax.evaluate --model M --data synth_cxr_edit --split test --out DIR [--methods ip2p,rse_correct]
    python -m x2x_jax.evaluate --model M --data /tfds/mimic_edit_instruction/v1_256/1.0.0 --classifier C --out DIR

Methods (rows of the report):
  ip2p         plain InstructPix2Pix: tau = 0, so M is the whole image and nothing is composited
  rse_paper    RSE with the original code's off-by-one background re-noising (--renoise paper)
  rse_correct  RSE with the corrected re-noising (the editor's default)
  rse_learned  RSE with the learned guidance map (Editor(..., guidance="learned"), model_dir/guidance/); skipped
               with the reason written into the report when the editor or the model has none

Every edit goes through edit.py's code path: the inputs are written as 8-bit PNGs at --image-size (default: the
model's resolution), as the TFDS set stores them, `Editor.prepare` brings them to the model, `Editor.run` edits, and
`x2x_jax.editing.fullres.composite` (edit.py's default feather) puts the edit back at the image's own size. Every
metric is measured on that composited output, against the input file's own pixels: what a user gets. G is the
guidance map the edit program computed, resampled bilinearly to the image's pixels as the composite does; M is the
composite's mask (G >= tau there; the whole image for ip2p). The main table uses the editor's default keep-detail
(`api.KEEP_DETAIL_DEFAULT`); the "Full resolution" table compares keep-detail off and on, two composites of the
same model outputs. G does not depend on the number of DDIM steps, so the extra seeds of the seed-stability metric
run the same program with one step. Metric definitions: `x2x_jax.evaluate.metrics`; the table's columns:
`report.COLUMNS` and `report.FULLRES_COLUMNS`.

The tau sweep edits the first --sweep-examples examples as rse_correct at every --sweep-taus, with G from one
relevance draw and from --sweep-draws: the preservation vs instruction-following trade-off the method implies
(tau_sweep.png). Every average has a 95 % bootstrap interval over the examples (`metrics.PerExample`).

Outputs (computed in a temporary folder and moved into --out at the end; nothing is written on failure):
report.md, metrics.json, bars.png, tau_sweep.png, examples_<method>.png.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from x2x_jax import outputs
from x2x_jax.data import synthetic
from x2x_jax.data.io import MIN_EDIT_SIDE, resize_to_model
from x2x_jax.editing import fullres
from x2x_jax.editing.api import (
    DEFAULT_MODEL,
    KEEP_DETAIL_DEFAULT,
    Editor,
    Request,
    Settings,
    resolve_model_dir,
)
from x2x_jax.editing.render import resize_map
from x2x_jax.errors import ConfigError, DataError, WeightsError
from x2x_jax.evaluate import classifiers, report
from x2x_jax.evaluate import metrics as M
from x2x_jax.evaluate.metrics import (
    edit_ops_per_finding,
    frechet_distance,
    instruction_following,
    mean_abs_laplacian,
    seed_stability,
    summarize,
)

METHODS = {
    # name: (tau from --tau?, renoise, guidance, description)
    "ip2p": (False, "correct", None, "plain InstructPix2Pix (tau = 0: M is the whole image)"),
    "rse_paper": (True, "paper", None, "RSE, the original code's re-noising (--renoise paper)"),
    "rse_correct": (True, "correct", None, "RSE, corrected re-noising"),
    "rse_learned": (True, "correct", "learned", "RSE with the learned guidance map"),
}
SYNTH_DATA = "synth_cxr_edit"
PSNR_CAP_DB = 60.0  # per-image PSNR is capped here (identical pixels give inf); ~ the PSNR of 8-bit rounding
COMMAND = "x2x-evaluate"  # the marker of its output folders (x2x_jax.outputs)


@dataclasses.dataclass
class Config:
    out: str
    model: str | None = None  # None: the shipped tiny model
    data: str = SYNTH_DATA
    split: str = "test"
    data_dir: str | None = None
    methods: tuple[str, ...] = tuple(METHODS)
    num_examples: int = 160  # paired intervals of ~±3 points on instruction accuracy; see README for the time
    steps: int = 50
    seeds: int = 3
    seed: int = 0
    batch_size: int = 20  # a divisor of num_examples: a padded last batch costs as much as a full one
    tau: float = 0.1
    noise_level: float = 0.8  # of the relevance map (the paper's); the learned map does not use it
    relevance_draws: int = 1  # relevance maps averaged into G (the paper: 1)
    classifier: str | None = None  # None: the shipped synthetic classifier (synthetic data only)
    num_grid: int = 6
    image_size: int | None = None  # px of the images edited and measured; None: the model's resolution
    sweep_taus: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)  # the tau sweep (rse_correct's edit)
    sweep_examples: int = 40  # the first N examples edited at every sweep tau; 0: no sweep
    sweep_draws: int = 4  # the sweep's second curve: G averaged over K relevance draws (--relevance-draws)
    overwrite: bool = False  # replace a non-empty --out that holds no earlier evaluation (x2x_jax.outputs)
    command: str = ""

    def check(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ConfigError(f"--methods: unknown method(s) {unknown or '(none given)'}; choose from "
                              f"{', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"--methods lists a method twice: {','.join(self.methods)}")
        for name, low in (("num_examples", 2), ("steps", 1), ("seeds", 1), ("batch_size", 1), ("num_grid", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")
        if self.image_size is not None:
            if self.image_size < MIN_EDIT_SIDE:
                raise ConfigError(f"--image-size must be >= {MIN_EDIT_SIDE} (the editor's smallest input), got "
                                  f"{self.image_size}")
        if self.sweep_examples < 0 or self.sweep_draws < 1:
            raise ConfigError(f"--sweep-examples must be >= 0 and --sweep-draws >= 1, got {self.sweep_examples} and "
                              f"{self.sweep_draws}")
        if self.sweep_examples and (not self.sweep_taus or not all(0.0 <= t <= 1.0 for t in self.sweep_taus)):
            raise ConfigError(f"--sweep-taus must be values in [0, 1], got {','.join(map(str, self.sweep_taus))}")
        if not 0.0 < self.tau <= 1.0:
            raise ConfigError(f"--tau must be in (0, 1] (tau = 0 is the ip2p method), got {self.tau}")
        if not (0 <= self.seed and self.seed + self.seeds <= 2**32):
            raise ConfigError(f"--seed must be in [0, 2**32 - seeds), got {self.seed}")
        if self.data != SYNTH_DATA and self.classifier is None:
            raise ConfigError(f"--classifier is required for --data {self.data} (the shipped classifier knows only "
                              "the synthetic findings)")


# ----------------------------------------------------------------------------------------------------------------
# Data: a list of examples, each a dict with past/current [-1, 1] float images, instruction, edits and, where the
# data has them, the true change mask, labels and identity.


def _to_float(u8: np.ndarray) -> np.ndarray:
    return np.asarray(u8, np.float32).reshape(u8.shape[0], u8.shape[1]) / 127.5 - 1.0


def load_examples(cfg: Config, size: int) -> list[dict]:
    """The first ``cfg.num_examples`` examples of the split, images at ``size`` px, rounded to 8 bits."""
    if cfg.data == SYNTH_DATA:
        if cfg.split not in synthetic.SPLITS:
            raise ConfigError(f"--split must be one of {sorted(synthetic.SPLITS)}, got {cfg.split!r}")
        q = lambda a: synthetic.to_uint8(a).astype(np.float32) / 127.5 - 1.0  # noqa: E731  (the TFDS rounding)
        out = []
        for ex in synthetic.iterate_split(cfg.split, cfg.num_examples, size):
            out.append({"id": ex["example_id"], "past": q(ex["past"]), "current": q(ex["current"]),
                        "instruction": ex["instruction"], "edits": ex["edits"], "mask": ex["mask"],
                        "current_labels": ex["current_labels"],
                        "identity": {"age": ex["identity"]["age_years"], "male": ex["identity"]["sex"] == "M",
                                     "habitus": ex["identity"]["habitus"]}})
        return out
    return _load_tfds(cfg, size)


def _load_tfds(cfg: Config, size: int) -> list[dict]:
    """A TFDS dataset (a prepared directory, or a name with --data-dir) with past/current/instruction/edits; the
    synthetic set's mask/labels/identity are used when present (MIMIC has none of them)."""
    import tensorflow_datasets as tfds

    import x2x_jax.data.tfds  # noqa: F401  (registers our builders)
    from x2x_jax.data.tfds._common import edits_from_json

    try:
        if Path(cfg.data).is_dir():
            builder = tfds.builder_from_directory(cfg.data)
        else:
            builder = tfds.builder(cfg.data, data_dir=cfg.data_dir)
        source = builder.as_data_source(cfg.split)
    except Exception as e:  # tfds raises many types for a missing / unbuilt dataset or split
        raise DataError(f"--data {cfg.data} --split {cfg.split}: cannot open the dataset "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from e
    n = min(cfg.num_examples, len(source))
    if n < 2:
        raise DataError(f"--data {cfg.data} --split {cfg.split}: {len(source)} examples, need at least 2")

    def img(a):
        a = _to_float(np.asarray(a))
        if a.shape != (size, size):
            a = resize_to_model((a + 1) / 2, size) * 2 - 1
        return a

    out = []
    for i in range(n):
        r = source[i]
        text = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731
        ex = {"id": text(r.get("example_id", str(i))), "past": img(r["past"]), "current": img(r["current"]),
              "instruction": text(r["instruction"]), "edits": edits_from_json(r["edits"]), "mask": None,
              "current_labels": None, "identity": None}
        if "mask" in r:
            m = np.asarray(r["mask"]).reshape(np.asarray(r["mask"]).shape[:2]) > 0
            if m.shape != (size, size):
                m = resize_to_model(m.astype(np.float32), size) > 0.5
            ex["mask"] = m
        if "current_labels" in r:
            ex["current_labels"] = np.asarray(r["current_labels"], np.uint8)
        if "identity" in r:
            ident = r["identity"]
            ex["identity"] = {"age": float(ident["age_years"]), "male": text(ident["sex"]) == "M",
                              "habitus": float(ident["habitus"])}
        out.append(ex)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Editing


def _make_editor(model: str | None, guidance: str | None):
    """(Editor, None) or (None, reason) when this editor cannot do `guidance`."""
    model_dir = resolve_model_dir(DEFAULT_MODEL if model is None else model)
    if guidance is None:
        return Editor(model_dir), None
    if not (model_dir / "guidance").is_dir():
        return None, f"the model has no guidance/ folder ({model_dir / 'guidance'})"
    try:
        return Editor(model_dir, guidance=guidance), None
    except TypeError as e:
        if "guidance" in str(e):
            return None, f"this Editor does not accept guidance={guidance!r} ({e})"
        raise
    except (ConfigError, WeightsError) as e:
        return None, f"the learned guidance could not be loaded ({' '.join(str(e).split())})"


def run_edits(editor, prepared: list, settings, tau: float, seed_override: int | None = None) -> dict:
    """Edit every prepared request in batches; returns stacked numpy arrays: decoded (the VAE decode over the model
    canvas, [-1, 1]) and guidance (G, latent resolution)."""
    keep = ("decoded", "guidance")
    res = {k: [] for k in keep}
    compile_s = run_s = 0.0
    for start in range(0, len(prepared), settings.batch_size):
        chunk = prepared[start:start + settings.batch_size]
        if seed_override is not None:
            chunk = [dataclasses.replace(p, request=dataclasses.replace(p.request, seed=seed_override))
                     for p in chunk]
        outs, t = editor.run(chunk, settings, tau=tau)
        compile_s += t["compile_s"]
        run_s += t["run_s"]
        for o in outs:
            for k in keep:
                res[k].append(o[k])
    out = {k: np.stack(v) for k, v in res.items()}
    out["timing_s"] = {"compile": round(compile_s, 1), "run": round(run_s, 1)}
    return out


def _signed(grey: np.ndarray) -> np.ndarray:
    """Display grey in [0, 1] -> float32 [-1, 1] (source and outputs alike, so unchanged pixels compare equal)."""
    return np.asarray(grey, np.float32) * 2.0 - 1.0


def composite(editor, prepared: list, sources: list, result: dict, tau: float) -> dict:
    """Every edit composited at its input's own geometry as edit.py writes it (`fullres.composite` with the default
    feather), with keep-detail off and on: two composites of the same model outputs. Returns g [N, H, W] (G
    resampled bilinearly to the image's pixels), mask [N, H, W] (the composite's M = g >= tau), keep_detail
    {False: [N, H, W], True: [N, H, W]} (outputs in [-1, 1]), edited (those with the editor's default) and
    feather_px."""
    size, g, masks, outs = editor.resolution, [], [], {False: [], True: []}
    for p, src, decoded, guidance in zip(prepared, sources, result["decoded"], result["guidance"], strict=True):
        height, width, box = src.meta.height, src.meta.width, p.meta.content_box
        feather = fullres.default_feather(height, width, box[2:])
        for keep, images in outs.items():
            full = fullres.composite(src, decoded, p.image, guidance, tau, size=size, box=box, feather=feather,
                                     keep_detail=keep)
            images.append(_signed(src.to_display(full.pixels)))
        masks.append(full.mask)
        g.append(fullres.guidance_to_original(guidance, size, box, height, width))
    detail = {keep: np.stack(images) for keep, images in outs.items()}
    return {"g": np.stack(g), "mask": np.stack(masks), "keep_detail": detail, "edited": detail[KEEP_DETAIL_DEFAULT],
            "feather_px": feather}


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def _capped(psnr: np.ndarray) -> np.ndarray:
    return np.minimum(psnr, PSNR_CAP_DB)


def _mean(values) -> float | None:
    s = summarize(values)
    return None if s["n"] == 0 else s["mean"]


def _sharpness(images: np.ndarray, mask: np.ndarray) -> dict:
    """Per-image mean |Laplacian| inside M, outside M, and their ratio (NaN where either side is empty)."""
    inside, outside = mean_abs_laplacian(images, mask), mean_abs_laplacian(images, ~mask)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"in_m": inside, "out_m": outside, "ratio": inside / outside}


def _classifier_inputs(images: np.ndarray, clf_size: int) -> np.ndarray:
    if images.shape[-1] == clf_size:
        return images
    return np.stack([resize_map(a, clf_size, clf_size) for a in images])


def classify(clf, images: np.ndarray) -> dict:
    x = _classifier_inputs(images, clf.config["image_size"])
    out = classifiers.predict(clf, x)
    out["features"] = classifiers.features(clf, x)
    return out


def instruction_targets(examples: list[dict], findings: list[str], source_pred: dict) -> tuple[np.ndarray, ...]:
    """(targets [N, F], ops [N, F]): the data's current labels where it has them; otherwise the edited findings
    take their op's label (add/change -> present, remove -> absent) and the others keep the classifier's call on
    the source."""
    ops = np.stack([edit_ops_per_finding(ex["edits"], findings) for ex in examples])
    if all(ex["current_labels"] is not None for ex in examples):
        return np.stack([ex["current_labels"] for ex in examples]).astype(bool), ops
    target = source_pred["labels"] >= 0.5
    target = np.where(ops == "remove", False, np.where((ops == "add") | (ops == "change"), True, target))
    return target, ops


def follow_metrics(pred_labels, targets, ops, findings, rec: M.PerExample, key: str = "instruction_following") -> dict:
    """`instruction_following` plus the accuracy over the edited cells, overall and per finding; every accuracy
    is also recorded in `rec` (cells grouped by example) for its confidence interval."""
    r = instruction_following(pred_labels, targets, ops, findings)
    correct = (np.asarray(pred_labels) >= 0.5) == targets
    edited = ops != ""

    def cells(name, selected):
        return rec.ratio(f"{key}.{name}", (correct & selected).sum(1), selected.sum(1))

    r["accuracy_edited"] = cells("accuracy_edited", edited)
    r["n_edited_cells"] = int(edited.sum())
    for op in r["per_op"]:
        cells(f"per_op.{op}", ops == ("" if op == "untouched" else op))
    r["per_finding_edited"] = {f: cells(f"per_finding_edited.{f}", edited & (np.arange(len(findings)) == i))
                               for i, f in enumerate(findings)}
    r["per_finding_edited_counts"] = {f: int(edited[:, i].sum()) for i, f in enumerate(findings)}
    return r


def identity_metrics(source: dict, other: dict, rec: M.PerExample, key: str = "identity") -> dict:
    """`identity_preservation`'s numbers (age and habitus: Pearson r and MAE; sex: agreement), each recorded in
    `rec` for its confidence interval."""
    out = {}
    for k in ("age", "habitus"):
        a, b = np.asarray(other[k], np.float64), np.asarray(source[k], np.float64)
        out[f"{k}_pearson"] = rec.pearson(f"{key}.{k}_pearson", a, b)
        out[f"{k}_mae"] = rec.mean(f"{key}.{k}_mae", np.abs(a - b))
    agree = (np.asarray(other["sex"]) >= 0.5) == (np.asarray(source["sex"]) >= 0.5)
    out["sex_agreement"] = rec.mean(f"{key}.sex_agreement", agree)
    return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in out.items()}


def fullres_metrics(edited, source, current, true, mask, truth: dict, rec: M.PerExample, key: str) -> dict:
    """One composite variant at the image's own size: outside the true change vs the source, outside M (0 by
    construction), inside the true change vs the true current image, and sharpness inside vs outside M (`truth`:
    `_sharpness` of the true current images, the reference)."""
    sharp = _sharpness(edited, mask)
    with np.errstate(invalid="ignore", divide="ignore"):
        vs_true = sharp["in_m"] / truth["in_m"]
    mean = lambda name, v: rec.mean(f"{key}.{name}", v)  # noqa: E731
    out = {"mae_outside_own_mask": mean("mae_outside_own_mask", M.mae_outside(edited, source, mask)),
           "sharpness_in_m": mean("sharpness_in_m", sharp["in_m"]),
           "sharpness_out_m": mean("sharpness_out_m", sharp["out_m"]),
           "sharpness_ratio": mean("sharpness_ratio", sharp["ratio"]),
           "sharpness_in_m_vs_true": mean("sharpness_in_m_vs_true", vs_true),
           "psnr_out": None, "mae_out": None, **inside_error(edited, current, true, rec, key)}
    if true is not None:
        out.update(psnr_out=mean("psnr_out", _capped(M.psnr_outside(edited, source, true))),
                   mae_out=mean("mae_out", M.mae_outside(edited, source, true)))
    return out


def inside_error(images, current, true, rec: M.PerExample, key: str) -> dict:
    """MAE and PSNR inside the true change mask against the true current images (None without true masks)."""
    if true is None:
        return {"mae_in": None, "psnr_in": None}
    return {"mae_in": rec.mean(f"{key}.mae_in", M.mae_outside(images, current, ~true)),
            "psnr_in": rec.mean(f"{key}.psnr_in", _capped(M.psnr_outside(images, current, ~true)))}


def true_masks(examples: list[dict]) -> np.ndarray | None:
    """The true change masks [N, H, W], or None when the data lacks them."""
    masks = [ex["mask"] for ex in examples]
    return np.stack(masks) if all(m is not None for m in masks) else None


def method_metrics(examples, source, result, clf_out, src_out, targets, ops, findings, real_feats, tau,
                   uses_g: bool, rec: M.PerExample) -> dict:
    """All per-method numbers (per-image arrays averaged over the images where they are defined), measured on the
    full-resolution composite; each average is also recorded in `rec` for its bootstrap interval."""
    edited, mask, true = result["edited"], result["mask"], true_masks(examples)
    out: dict = {"localization": None, "preservation": None}
    if true is not None:
        g = result["g"]
        loc = {"iou_m": rec.mean("localization.iou_m", M.iou(mask, true)),
               "auroc_m": rec.mean("localization.auroc_m", M.map_auroc(mask.astype(np.float32), true)),
               "mask_fraction": rec.mean("localization.mask_fraction", mask.mean((-2, -1))),
               "true_mask_fraction": float(true.mean())}
        if uses_g:
            loc.update(iou_g=rec.mean("localization.iou_g", M.thresholded_iou(g, true, tau)),
                       auroc_g=rec.mean("localization.auroc_g", M.map_auroc(g, true)),
                       pointing_g=rec.mean("localization.pointing_g", M.pointing_game(g, true)))
        else:
            loc.update(iou_g=None, auroc_g=None, pointing_g=None)
        out["localization"] = loc
        psnr = M.psnr_outside(edited, source, true)
        out["preservation"] = {
            "psnr_out": rec.mean("preservation.psnr_out", _capped(psnr)),
            "psnr_out_median": float(np.nanmedian(psnr)),
            "psnr_out_n_capped": int(np.sum(psnr > PSNR_CAP_DB)),
            "ssim_out": rec.mean("preservation.ssim_out", M.ssim_outside(edited, source, true)),
            "mae_out": rec.mean("preservation.mae_out", M.mae_outside(edited, source, true)),
        }
    # Outside the method's own mask: 0 for RSE by construction (the composite), undefined for ip2p (M = all).
    out["preservation"] = {**(out["preservation"] or {}), "mae_outside_own_mask": rec.mean(
        "preservation.mae_outside_own_mask", M.mae_outside(edited, source, mask))}
    current = np.stack([ex["current"] for ex in examples])
    truth = _sharpness(current, mask)
    out["full_resolution"] = {"feather_px": result["feather_px"],
                              "true_current_sharpness_ratio": _mean(truth["ratio"])}
    for keep, images in result["keep_detail"].items():
        name = f"keep_detail_{'on' if keep else 'off'}"
        out["full_resolution"][name] = fullres_metrics(images, source, current, true, mask, truth, rec,
                                                       f"full_resolution.{name}")
    out["instruction_following"] = follow_metrics(clf_out["labels"], targets, ops, findings, rec)
    out["identity"] = identity_metrics(src_out, clf_out, rec)
    out["realism"] = {"frechet_distance": M.frechet_distance(clf_out["features"], real_feats),
                      "n_edited": len(edited), "n_real": len(real_feats)}
    return out


def seed_metrics(maps: np.ndarray, tau: float, rec: M.PerExample) -> dict:
    """maps [S, N, h, w]: mean pairwise IoU of G >= tau between seeds, and the per-pixel std of G over seeds."""
    return {"seed_iou": rec.mean("stability.seed_iou", seed_stability(maps, tau)),
            "g_seed_std": rec.mean("stability.g_seed_std", maps.std(0).mean((-2, -1))),
            "num_seeds": int(maps.shape[0])}


def tau_sweep(cfg: Config, editor, prepared: list, sources: list, examples: list, source: np.ndarray, clf,
              targets, ops, findings, settings, log=print) -> list[dict]:
    """The preservation vs instruction-following trade-off: rse_correct's edit of the first cfg.sweep_examples
    examples at every tau of cfg.sweep_taus, with G from one relevance draw and from cfg.sweep_draws (tau = 0 is
    plain IP2P, whatever G). One point per (draws, tau): mask fraction, IoU M, PSNR out and instruction accuracy
    on the edited cells, each with its bootstrap interval over the sweep's examples; with tau = 0 in the sweep, each
    other point also carries `vs_tau0`: its PSNR out and accuracy minus plain IP2P's with the paired interval (the
    same resamples for every point, so the cost of a tau is resolved or not on its own)."""
    n = min(cfg.sweep_examples, len(prepared))
    examples, source, true = examples[:n], source[:n], true_masks(examples[:n])
    idx = M.bootstrap_indices(n, BOOTSTRAP["draws"], BOOTSTRAP["seed"])
    points, base = [], None  # base: the tau = 0 point's value and bootstrap draws per SWEEP_PAIRED key
    for draws in sorted({1, cfg.sweep_draws}):
        s = dataclasses.replace(settings, renoise="correct", relevance_draws=draws)
        for tau in sorted(cfg.sweep_taus):
            if tau == 0 and draws != 1:
                continue  # G is unused at tau = 0: the same edit as the one-draw point
            t0 = time.perf_counter()
            res = run_edits(editor, prepared[:n], s, tau)
            res.update(composite(editor, prepared[:n], sources[:n], res, tau))
            rec = M.PerExample(n)
            point = {"tau": tau, "relevance_draws": draws,
                     "mask_fraction": rec.mean("mask_fraction", res["mask"].mean((-2, -1))),
                     "iou_m": None if true is None else rec.mean("iou_m", M.iou(res["mask"], true)),
                     "psnr_out": None if true is None else rec.mean(
                         "psnr_out", _capped(M.psnr_outside(res["edited"], source, true))),
                     "accuracy_edited": follow_metrics(classify(clf, res["edited"])["labels"], targets[:n], ops[:n],
                                                       findings, rec, key="if")["accuracy_edited"]}
            resampled = rec.draws(idx)
            ci = {k: M.percentile_interval(v, BOOTSTRAP["level"]) for k, v in resampled.items()}
            point["ci95"] = {k: ci.get(SWEEP_KEYS.get(k, k))
                             for k in ("mask_fraction", "iou_m", "psnr_out", "accuracy_edited")}
            here = {k: (point[k], resampled.get(SWEEP_KEYS.get(k, k))) for k in SWEEP_PAIRED}
            if tau == 0:
                base = here
            elif base is not None:
                point["vs_tau0"] = {k: paired_difference(here[k], base[k]) for k in SWEEP_PAIRED}
            point["time_s"] = round(time.perf_counter() - t0, 1)
            points.append(point)
            log(f"tau sweep: tau {tau:g}, {draws} draw(s): {point['time_s']:.0f} s")
    return points


def paired_difference(point: tuple, base: tuple) -> dict | None:
    """(value, bootstrap draws) of a point and of its baseline on the same resamples -> the difference with its
    paired interval; None where either is undefined."""
    (v, d), (v0, d0) = point, base
    if v is None or v0 is None or d is None or d0 is None:
        return None
    return {"difference": v - v0, "ci95": M.percentile_interval(d - d0, BOOTSTRAP["level"])}


SWEEP_KEYS = {"accuracy_edited": "if.accuracy_edited"}  # a sweep point's key -> its recorder key, where they differ
SWEEP_PAIRED = ("psnr_out", "accuracy_edited")  # the sweep's differences against tau = 0, as the paper's claim
BOOTSTRAP = {"draws": 1000, "level": 0.95, "seed": 0}
# The paired differences reported against plain IP2P: the two quantities of the paper's claim.
PAIRED = ("instruction_following.accuracy_edited", "preservation.psnr_out")


def intervals(recorders: dict, n: int) -> tuple[dict, dict]:
    """Bootstrap over examples (one set of resamples for every method, so differences are paired): per row, {key:
    [lo, hi]}; per method, {key: {"difference", "ci95"}} of the PAIRED keys against ip2p."""
    idx = M.bootstrap_indices(n, BOOTSTRAP["draws"], BOOTSTRAP["seed"])
    draws = {row: rec.draws(idx) for row, rec in recorders.items()}
    ci = {row: {k: M.percentile_interval(v, BOOTSTRAP["level"]) for k, v in d.items()} for row, d in draws.items()}
    paired = {}
    for row, d in draws.items():
        if row == "ip2p" or "ip2p" not in draws:
            continue
        paired[row] = {k: {"ci95": M.percentile_interval(d[k] - draws["ip2p"][k], BOOTSTRAP["level"])}
                       for k in PAIRED if k in d and k in draws["ip2p"]}
    return ci, paired


# ----------------------------------------------------------------------------------------------------------------
# The run


def evaluate(cfg: Config, log=print) -> dict:
    """Run the suite; writes cfg.out and returns the metrics dict (also DIR/metrics.json)."""
    t_start = time.perf_counter()
    cfg.check()
    out = Path(cfg.out)
    outputs.check(out, COMMAND, cfg.overwrite)
    clf = classifiers.load_classifier(classifiers.SHIPPED_DIR if cfg.classifier is None else cfg.classifier)
    findings = list(clf.config.get("findings", synthetic.SYNTH_FINDINGS))

    # Editors: one for the relevance-map methods (tau and re-noising are traced: one compiled program), one for
    # the learned map.
    t0 = time.perf_counter()
    editors, skipped = {}, {}
    for m in cfg.methods:
        guidance = METHODS[m][2]
        if guidance not in editors:
            editors[guidance], reason = _make_editor(cfg.model, guidance)
            if reason:
                skipped[m] = reason
        elif editors[guidance] is None:
            skipped[m] = skipped.get(next(k for k in cfg.methods if METHODS[k][2] == guidance))
    any_editor = next((e for e in editors.values() if e is not None), None)
    if any_editor is None:
        raise ConfigError("no method can run: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    size = any_editor.resolution
    image_size = size if cfg.image_size is None else cfg.image_size
    settings = Settings(tau=cfg.tau, steps=cfg.steps, batch_size=cfg.batch_size, noise_level=cfg.noise_level,
                        relevance_draws=cfg.relevance_draws)
    any_editor.check(settings)
    load_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    examples = load_examples(cfg, image_size)
    data_s = time.perf_counter() - t0
    log(f"{len(examples)} examples of {cfg.data}/{cfg.split} at {image_size} px (model {size} px); methods "
        f"{', '.join(cfg.methods)}"
        + (f" (skipping {', '.join(skipped)})" if skipped else ""))

    with outputs.staged(out, COMMAND) as tmp:
        inputs = Path(tempfile.mkdtemp(prefix="inputs-", dir=tmp))
        requests = []
        for i, ex in enumerate(examples):
            path = inputs / f"{i:04d}.png"
            Image.fromarray(synthetic.to_uint8(ex["past"])).save(path)
            requests.append(Request(str(path), ex["instruction"], cfg.seed))
        prepared = {g: [e.prepare(r) for r in requests] for g, e in editors.items() if e is not None}
        sources = [any_editor.source(p) for p in next(iter(prepared.values()))]  # the files as stored
        source = np.stack([_signed(s.grey) for s in sources])
        shutil.rmtree(inputs)

        current = np.stack([ex["current"] for ex in examples])
        src_out = classify(clf, source)
        real_out = classify(clf, current)
        targets, ops = instruction_targets(examples, findings, src_out)

        results, per_method, seed_maps, timings = {}, {}, {}, {"model_load": round(load_s, 1),
                                                                 "data": round(data_s, 1)}
        recorders = {}  # row -> M.PerExample: every average of the report, for its bootstrap interval
        for m in cfg.methods:
            if m in skipped:
                continue
            use_tau, renoise, guidance, _ = METHODS[m]
            s = dataclasses.replace(settings, renoise=renoise)
            t0 = time.perf_counter()
            tau = cfg.tau if use_tau else 0.0
            res = run_edits(editors[guidance], prepared[guidance], s, tau)
            res.update(composite(editors[guidance], prepared[guidance], sources, res, tau))
            results[m] = res
            ed_out = classify(clf, res["edited"])
            rec = recorders[m] = M.PerExample(len(examples))
            per_method[m] = method_metrics(examples, source, res, ed_out, src_out, targets, ops, findings,
                                           real_out["features"], cfg.tau, uses_g=use_tau, rec=rec)
            # Seed stability of G: G depends on the seed (VAE posterior sample, relevance noise) but not on the
            # step count, so the other seeds run the one-step program. Shared by methods with the same map.
            # Seed 0 is run again that way and checked against this run's G.
            if use_tau and cfg.seeds >= 2 and guidance not in seed_maps:
                one = dataclasses.replace(s, steps=1)
                maps = np.stack([run_edits(editors[guidance], prepared[guidance], one, cfg.tau,
                                           seed_override=cfg.seed + k)["guidance"] for k in range(cfg.seeds)])
                seed_maps[guidance] = (maps, float(np.abs(maps[0] - res["guidance"]).max()))
            if use_tau and guidance in seed_maps:
                maps, check = seed_maps[guidance]
                per_method[m]["stability"] = {**seed_metrics(maps, cfg.tau, rec),
                                              "one_step_vs_full_g_max_abs_diff": check}
            else:
                per_method[m]["stability"] = None
            timings[m] = {**res["timing_s"], "total": round(time.perf_counter() - t0, 1)}
            log(f"{m}: {timings[m]['total']:.0f} s")

        sweep = {"points": [], "examples": 0, "skipped": None}
        if cfg.sweep_examples and editors.get(None) is not None:
            t0 = time.perf_counter()
            sweep["points"] = tau_sweep(cfg, editors[None], prepared[None], sources, examples, source, clf, targets,
                                        ops, findings, settings, log)
            n = sweep["examples"] = min(cfg.sweep_examples, len(examples))
            scratch = M.PerExample(n)  # the references on the sweep's examples
            sweep["references"] = {name: follow_metrics(out["labels"][:n], targets[:n], ops[:n], findings,
                                                        scratch)["accuracy_edited"]
                                   for name, out in (("source (unedited)", src_out), ("true current", real_out))}
            timings["tau_sweep"] = {"total": round(time.perf_counter() - t0, 1)}
        elif cfg.sweep_examples:
            sweep["skipped"] = "no relevance-map editor (the sweep edits as rse_correct)"
        src_rec = recorders["source (unedited)"] = M.PerExample(len(examples))
        cur_rec = recorders["true current"] = M.PerExample(len(examples))
        references = {
            "source (unedited)": {
                "instruction_following": follow_metrics(src_out["labels"], targets, ops, findings, src_rec),
                "realism": {"frechet_distance": _fd(src_out, real_out)},
                "full_resolution": inside_error(source, current, true_masks(examples), src_rec, "full_resolution")},
            "true current": {
                "instruction_following": follow_metrics(real_out["labels"], targets, ops, findings, cur_rec),
                "identity": identity_metrics(src_out, real_out, cur_rec)},
        }
        ci, paired = intervals(recorders, len(examples))
        for row, res in {**per_method, **references}.items():
            res["ci95"] = ci[row]
            if row in paired:
                res["vs_ip2p"] = {k: {"difference": _difference(res, per_method["ip2p"], k), **v}
                                  for k, v in paired[row].items()}
        wall = time.perf_counter() - t_start
        metrics = {
            "command": cfg.command, "model": str(any_editor.model_dir), "data": cfg.data, "split": cfg.split,
            "num_examples": len(examples), "resolution": size, "image_size": image_size, "steps": cfg.steps,
            "tau": cfg.tau, "noise_level": cfg.noise_level, "relevance_draws": cfg.relevance_draws,
            "seeds": cfg.seeds, "seed": cfg.seed, "batch_size": cfg.batch_size,
            "classifier": str(classifiers.SHIPPED_DIR if cfg.classifier is None else cfg.classifier),
            "findings": findings, "methods": {m: METHODS[m][3] for m in cfg.methods},
            "skipped": skipped, "results": per_method, "references": references, "tau_sweep": sweep,
            "psnr_cap_db": PSNR_CAP_DB, "bootstrap": {**BOOTSTRAP, "unit": "example", "interval": "percentile",
                                                      "paired": "every row is resampled with the same indices"},
            "timings_s": timings, "wall_time_s": round(wall, 1),
            "load_average": _loadavg(),
        }
        metrics["expected"] = report.expected_outcomes(metrics)
        report.write_all(tmp, metrics, examples, source, results, cfg.num_grid)
        metrics["wall_time_s"] = round(time.perf_counter() - t_start, 1)
        (tmp / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=1, allow_nan=False) + "\n")
        (tmp / "report.md").write_text(report.markdown(metrics))
    return metrics


def _fd(a: dict, b: dict) -> float:
    return frechet_distance(a["features"], b["features"])


def _difference(row: dict, base: dict, key: str) -> float | None:
    """row's metric `key` ("group.metric") minus base's, None where either is undefined."""
    group, name = key.split(".", 1)
    x, y = (row.get(group) or {}).get(name), (base.get(group) or {}).get(name)
    return None if x is None or y is None else x - y


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _jsonable(x):
    """NaN / inf -> None (strict JSON), numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def command_line(argv) -> str:
    return " ".join(["python -m x2x_jax.evaluate", *(argv if argv is not None else sys.argv[1:])])
