"""The evaluation's report: report.md (the main table, methods as rows; the "Full resolution" table, keep-detail off
and on), the expected-outcome checks, and PNG plots drawn with Pillow (matplotlib is not a dependency): bars.png
(one panel per key metric) and examples_<method>.png (input | edited | |edited - input| | G overlay | true mask, one
row per example)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from x2x_jax.editing import render
from x2x_jax.editing.api import KEEP_DETAIL_DEFAULT

# (key, header, (group, metric), format, plotted scale: (lo, hi) or None for 0..max)
COLUMNS = (
    ("iou_g", "IoU G", ("localization", "iou_g"), "{:.3f}", (0, 1)),
    ("iou_m", "IoU M", ("localization", "iou_m"), "{:.3f}", (0, 1)),
    ("auroc_g", "AUROC G", ("localization", "auroc_g"), "{:.3f}", (0, 1)),
    ("pointing_g", "pointing", ("localization", "pointing_g"), "{:.3f}", (0, 1)),
    ("psnr_out", "PSNR out (dB)", ("preservation", "psnr_out"), "{:.2f}", None),
    ("ssim_out", "SSIM out", ("preservation", "ssim_out"), "{:.3f}", (0, 1)),
    ("mae_out", "MAE out", ("preservation", "mae_out"), "{:.4f}", None),
    ("if_acc", "instr. acc (edited)", ("instruction_following", "accuracy_edited"), "{:.3f}", (0, 1)),
    ("age_r", "age r", ("identity", "age_pearson"), "{:.3f}", (0, 1)),
    ("sex_acc", "sex acc", ("identity", "sex_agreement"), "{:.3f}", (0, 1)),
    ("fd", "FD", ("realism", "frechet_distance"), "{:.2f}", None),
    ("seed_iou", "seed IoU", ("stability", "seed_iou"), "{:.3f}", (0, 1)),
)
# The "Full resolution" table, one row per (method, keep-detail): (key in full_resolution.keep_detail_*, header,
# format); its last column is the method's true_current_sharpness_ratio.
FULLRES_COLUMNS = (
    ("psnr_out", "PSNR out (dB)", "{:.2f}"),
    ("mae_out", "MAE out", "{:.4f}"),
    ("mae_outside_own_mask", "MAE out of M", "{:.4f}"),
    ("mae_in", "MAE in", "{:.4f}"),
    ("psnr_in", "PSNR in (dB)", "{:.2f}"),
    ("sharpness_ratio", "sharp. in/out M", "{:.3f}"),
    ("sharpness_in_m_vs_true", "sharp. in M vs true", "{:.3f}"),
)
DASH = "—"


def value(result: dict | None, path: tuple[str, str]):
    group = (result or {}).get(path[0])
    return None if group is None else group.get(path[1])


def fmt(v, spec: str = "{:.3f}") -> str:
    return DASH if v is None or (isinstance(v, float) and not np.isfinite(v)) else spec.format(v)


def interval(result: dict | None, key: str) -> list[float] | None:
    """The bootstrap 95 % interval of `key` ("group.metric") recorded for this row, or None."""
    return ((result or {}).get("ci95") or {}).get(key)


def fmt_ci(result: dict | None, key: str, v, spec: str = "{:.3f}") -> str:
    """`v` with its bootstrap 95 % interval, e.g. "0.420 (0.350–0.490)"."""
    ci = interval(result, key)
    if v is None or ci is None:
        return fmt(v, spec)
    return f"{fmt(v, spec)} ({fmt(ci[0], spec)}–{fmt(ci[1], spec)})"


# ----------------------------------------------------------------------------------------------------------------
# Expected outcomes (issues #6 and #15: the paper's claims, tested on the shipped model)


def expected_outcomes(m: dict) -> list[dict]:
    """Each expected outcome with the numbers it rests on and whether it holds (None: not measurable here)."""
    r = m["results"]
    get = lambda meth, path: value(r.get(meth), path)  # noqa: E731
    out = []
    ip_psnr, ip_acc = get("ip2p", ("preservation", "psnr_out")), get("ip2p", ("instruction_following",
                                                                                "accuracy_edited"))
    for meth in ("rse_paper", "rse_correct", "rse_learned"):
        psnr, acc = get(meth, ("preservation", "psnr_out")), get(meth, ("instruction_following", "accuracy_edited"))
        claim = f"{meth} raises outside-region PSNR over ip2p by >= 6 dB at <= 2 points instruction-following cost"
        if None in (ip_psnr, psnr, ip_acc, acc):
            out.append({"claim": claim, "holds": None, "measured": _missing(m, meth, "ip2p")})
            continue
        gain, cost = psnr - ip_psnr, 100 * (ip_acc - acc)
        n = value(r[meth], ("instruction_following", "n_edited_cells")) or 0
        paired = r[meth].get("vs_ip2p") or {}
        gain_ci = (paired.get("preservation.psnr_out") or {}).get("ci95")
        acc_ci = (paired.get("instruction_following.accuracy_edited") or {}).get("ci95")
        gain_txt = "" if gain_ci is None else f", 95 % CI {gain_ci[0]:+.2f} to {gain_ci[1]:+.2f}" + (
            " — not resolved" if gain_ci[0] < 6 <= gain_ci[1] else "")
        cost_ci = None if acc_ci is None else (-100 * acc_ci[1], -100 * acc_ci[0])
        cost_txt = "" if cost_ci is None else f", 95 % CI {cost_ci[0]:+.1f} to {cost_ci[1]:+.1f}" + (
            " — not resolved" if cost_ci[0] <= 2 < cost_ci[1] else "")
        how = "paired bootstrap over examples" if paired else "no intervals recorded"
        out.append({"claim": claim, "holds": bool(gain >= 6.0 and cost <= 2.0),
                    "measured": f"PSNR gain {gain:+.2f} dB{gain_txt} ({'holds' if gain >= 6 else 'fails'}); "
                                f"instruction accuracy {100 * acc:.1f} vs {100 * ip_acc:.1f} % = cost {cost:+.1f} "
                                f"points{cost_txt} ({'holds' if cost <= 2 else 'fails'}; {n} edited cells, one "
                                f"cell = {100 / max(n, 1):.1f} points; intervals: {how})"})
    acc = get("rse_correct", ("instruction_following", "accuracy_edited"))
    claim = "RSE (rse_correct) instruction accuracy >= 0.75 and within 2 points of ip2p"
    if None in (acc, ip_acc):
        out.append({"claim": claim, "holds": None, "measured": _missing(m, "rse_correct", "ip2p")})
    else:
        out.append({"claim": claim, "holds": bool(acc >= 0.75 and ip_acc - acc <= 0.02),
                    "measured": f"{acc:.3f} vs {ip_acc:.3f} for ip2p ({100 * (acc - ip_acc):+.1f} points)"})
    for meth, target, what in (("rse_correct", 0.35, "the paper's relevance map"), ("rse_learned", 0.5,
                                                                                       "the learned map")):
        iou = get(meth, ("localization", "iou_g"))
        out.append({"claim": f"guidance IoU >= {target} ({what}: G >= tau vs the true change mask, {meth})",
                    "holds": None if iou is None else bool(iou >= target),
                    "measured": _missing(m, meth) if iou is None else
                    f"IoU G = {iou:.3f} (M covers {100 * get(meth, ('localization', 'mask_fraction')):.0f} % of the "
                    f"image, the true change {100 * get(meth, ('localization', 'true_mask_fraction')):.0f} %)"})
    for meth in ("rse_correct", "rse_learned"):
        age, sex = get(meth, ("identity", "age_pearson")), get(meth, ("identity", "sex_agreement"))
        claim = f"identity kept: age r and sex agreement, edited vs source, >= 0.95 ({meth})"
        out.append({"claim": claim, "holds": None if None in (age, sex) else bool(age >= 0.95 and sex >= 0.95),
                    "measured": _missing(m, meth) if None in (age, sex) else
                    f"age r {age:.3f}, sex agreement {sex:.3f}"})
    li, ri = get("rse_learned", ("localization", "iou_g")), get("rse_correct", ("localization", "iou_g"))
    ls, rs = get("rse_learned", ("stability", "g_seed_std")), get("rse_correct", ("stability", "g_seed_std"))
    claim = "the learned map's IoU >= the relevance map's, with lower seed variance"
    if None in (li, ri, ls, rs):
        out.append({"claim": claim, "holds": None, "measured": _missing(m, "rse_learned", "rse_correct")})
    else:
        lsi, rsi = get("rse_learned", ("stability", "seed_iou")), get("rse_correct", ("stability", "seed_iou"))
        out.append({"claim": claim, "holds": bool(li >= ri and ls < rs),
                    "measured": f"IoU G {li:.3f} (learned) vs {ri:.3f} (relevance); per-pixel std of G over seeds "
                                f"{ls:.4f} vs {rs:.4f}; seed IoU {fmt(lsi)} vs {fmt(rsi)}"})
    return out


def _missing(m: dict, *methods: str) -> str:
    why = [f"{x}: {m['skipped'][x]}" if x in m["skipped"] else f"{x} not run or not measurable (no true masks / "
           f"seeds < 2?)" for x in methods if x not in m["results"] or x in m["skipped"]]
    return "not measured: " + ("; ".join(why) if why else "a metric is undefined for this data")


# ----------------------------------------------------------------------------------------------------------------
# report.md


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(m: dict) -> str:
    r, refs = m["results"], m["references"]
    load = m.get("load_average")
    head = [
        "# Evaluation report", "",
        f"- command: `{m['command']}`",
        f"- model: `{m['model']}`; classifier: `{m['classifier']}`",
        f"- data: {m['data']} split `{m['split']}`, {m['num_examples']} examples at {m['image_size']} px (the model "
        f"edits at {m['resolution']} px; every metric is measured on the output composited at {m['image_size']} px)",
        f"- steps: {m['steps']} DDIM steps (the paper uses 100; see the note below), tau = {m['tau']}, relevance map "
        f"at noise level {m['noise_level']} from {m['relevance_draws']} draw(s), edit seed "
        f"{m['seed']}, seed-stability seeds: {m['seeds']}, batch {m['batch_size']}",
        f"- wall time: {m['wall_time_s']:.0f} s" + (f" (load average at the end {load})" if load else "")
        + "; per method: " + ", ".join(f"{k} {v['total']:.0f} s" for k, v in m["timings_s"].items()
                                       if isinstance(v, dict)),
    ]
    if m["steps"] != 100:
        head.append(f"- note: {m['steps']} DDIM steps, not the paper's 100: the default run must fit 10 minutes on a "
                    "2-core CPU with all four methods, and at 100 steps the editing time doubles. G, M and where the "
                    "composite keeps the input do not depend on the step count; the content inside M does. Pass "
                    "`--steps 100` for the paper's setting.")
    for meth, reason in m["skipped"].items():
        head.append(f"- **{meth} skipped**: {reason}")
    header = ["method"] + [c[1] for c in COLUMNS]
    cell = lambda res, c: fmt_ci(res, ".".join(c[2]), value(res, c[2]), c[3])  # noqa: E731
    rows = [[meth] + [cell(res, c) for c in COLUMNS] for meth, res in r.items()]
    rows += [[f"*{name}* (reference)"] + [cell(res, c) for c in COLUMNS] for name, res in refs.items()]
    parts = ["\n".join(head), "", _table(header, rows), "", _column_notes(m), "", _uncertainty_note(m), "",
             fullres_section(m), ""]

    # Instruction following per op and per finding.
    allrows = {**r, **{f"*{k}*": v for k, v in refs.items()}}
    first = next(iter(allrows.values()))["instruction_following"]
    op_names = list(first["per_op"])
    parts += ["## Instruction following per op", "",
              "Accuracy of the classifier's call on the edited image against the target label, over the cells "
              "(example, finding) an op touched; `untouched` = findings the instruction does not mention.", "",
              _table(["method"] + [f"{op} (n={first['op_counts'][op]})" for op in op_names],
                     [[k] + [fmt_ci(v, f"instruction_following.per_op.{op}",
                                    v["instruction_following"]["per_op"].get(op)) for op in op_names]
                      for k, v in allrows.items()]), ""]
    fnames = list(first["per_finding_edited"])
    parts += ["## Instruction following per finding (edited cells)", "",
              _table(["method"] + [f"{f} (n={first['per_finding_edited_counts'][f]})" for f in fnames],
                     [[k] + [fmt_ci(v, f"instruction_following.per_finding_edited.{f}",
                                    v["instruction_following"]["per_finding_edited"][f]) for f in fnames]
                      for k, v in allrows.items()]), ""]
    parts += ["## Identity (edited vs source predictions)", "",
              _table(["method", "age r", "age MAE (y)", "habitus r", "habitus MAE", "sex agreement"],
                     [[k] + [fmt_ci(v, f"identity.{name}", v["identity"][name], spec) for name, spec in
                             (("age_pearson", "{:.3f}"), ("age_mae", "{:.2f}"), ("habitus_pearson", "{:.3f}"),
                              ("habitus_mae", "{:.4f}"), ("sex_agreement", "{:.3f}"))]
                      for k, v in allrows.items() if v.get("identity")]), ""]

    parts += [sweep_section(m), ""]
    parts += ["## Expected vs measured", ""]
    for e in m["expected"]:
        verdict = {True: "**holds**", False: "**does not hold**", None: "**not measured**"}[e["holds"]]
        parts.append(f"- {e['claim']}: {verdict} — {e['measured']}")
    parts += ["", "Plots: `bars.png` (one panel per column, 95 % intervals as whiskers), `tau_sweep.png`, "
              "`examples_<method>.png` (input | edited | |edited - input| | G overlay | true mask).", ""]
    return "\n".join(parts)


def sweep_section(m: dict) -> str:
    """The tau sweep table (preservation vs instruction following; the plot is tau_sweep.png)."""
    sweep = m.get("tau_sweep") or {}
    if not sweep.get("points"):
        return "## Tau sweep\n\n" + ("Not run: " + sweep["skipped"] if sweep.get("skipped") else
                                     "Not run (--sweep-examples 0).")
    rows = [[str(p["relevance_draws"]), f"{p['tau']:g}"] + [fmt_ci(p, k, p[k], spec) for k, spec in SWEEP_COLUMNS]
            + [_vs_tau0(p, "psnr_out", 1.0, "{:+.2f}"), _vs_tau0(p, "accuracy_edited", 100.0, "{:+.1f}")]
            for p in sweep["points"]]
    refs = sweep.get("references") or {}
    return "\n".join([
        "## Tau sweep", "",
        f"rse_correct's edit of the first {sweep['examples']} examples at each tau, with G from one relevance draw "
        "and averaged over several (`--relevance-draws`); tau = 0 is plain IP2P. Raising tau shrinks M: more of the "
        "image is kept (PSNR out rises) and, past some tau, less of the finding is edited (instruction accuracy "
        "falls). On these examples the unedited source scores "
        f"{fmt(refs.get('source (unedited)'))} and the true current image {fmt(refs.get('true current'))}. "
        "Plot: `tau_sweep.png`.", "",
        "The last two columns: the point minus tau = 0 (plain IP2P) on the same examples, with the paired 95 % "
        "interval (the same bootstrap resamples for every point); accuracy in points.", "",
        _table(["draws", "tau", "mask fraction", "IoU M", "PSNR out (dB)", "instr. acc (edited)",
                "PSNR vs tau 0 (dB)", "acc. vs tau 0 (points)"], rows)])


def _vs_tau0(point: dict, key: str, scale: float, spec: str) -> str:
    """A sweep point's paired difference against tau = 0, e.g. "+9.38 (+8.10 to +10.60)"; a dash at tau 0."""
    d = (point.get("vs_tau0") or {}).get(key)
    if not d:
        return "—"
    ci = d["ci95"]
    text = spec.format(scale * d["difference"])
    return text if ci is None else f"{text} ({spec.format(scale * ci[0])} to {spec.format(scale * ci[1])})"


SWEEP_COLUMNS = (("mask_fraction", "{:.3f}"), ("iou_m", "{:.3f}"), ("psnr_out", "{:.2f}"),
                 ("accuracy_edited", "{:.3f}"))


def fullres_section(m: dict) -> str:
    """The "Full resolution" table: each method's composite with keep-detail off and on (same model outputs)."""
    rows = []
    for meth, res in m["results"].items():
        full = res["full_resolution"]
        for keep in (False, True):
            v = full[f"keep_detail_{'on' if keep else 'off'}"]
            label = ("on" if keep else "off") + (" (default)" if keep == KEEP_DETAIL_DEFAULT else "")
            name = f"keep_detail_{'on' if keep else 'off'}"
            rows.append([meth, label] + [fmt_ci(res, f"full_resolution.{name}.{k}", v[k], spec)
                                         for k, _, spec in FULLRES_COLUMNS]
                        + [fmt(full["true_current_sharpness_ratio"])])
    ref = m["references"]["source (unedited)"]
    src = ref["full_resolution"]
    rows.append(["*source (unedited)* (reference)", ""] + [fmt_ci(ref, f"full_resolution.{k}", src.get(k), spec)
                                                            for k, _, spec in FULLRES_COLUMNS] + [DASH])
    header = ["method", "keep detail"] + [h for _, h, _ in FULLRES_COLUMNS] + ["true current in/out M"]
    feather = next(iter(m["results"].values()))["full_resolution"]["feather_px"]
    return "\n".join([
        "## Full resolution", "",
        f"The model edits at {m['resolution']} px; `fullres.composite` puts each edit back at the image's "
        f"{m['image_size']} px as edit.py does (feather {feather} px), once without and once with keep-detail (the "
        "input's high frequencies added back where the edit left the low frequencies alone); both composites come "
        "from the same model outputs. The main table uses the default.", "",
        _table(header, rows), "",
        "**PSNR / MAE out** = output vs source outside the true change mask; **MAE out of M** = output vs source "
        "outside the composite's own mask (0: those pixels are the input's, bit for bit; a dash for plain IP2P, "
        "whose M is the whole image); **MAE / PSNR in** = output vs the true current image inside the true change "
        "mask (the source row: doing nothing); **sharp. in/out M** = mean |Laplacian| of the output inside M over "
        "that outside M, per image (a dash when M is the whole image); **sharp. in M vs true** = the output's mean "
        "|Laplacian| inside M over the true current image's there (1 = as sharp as the truth); **true current "
        "in/out M** = the in/out ratio of the true current image over the same M, the reference for the output's."])


def _uncertainty_note(m: dict) -> str:
    b = m.get("bootstrap") or {}
    return (f"In brackets: the {100 * b.get('level', 0.95):.0f} % confidence interval of each average, percentile "
            f"bootstrap over the {m['num_examples']} examples ({b.get('draws', '?')} resamples, seed "
            f"{b.get('seed', '?')}; every row resampled with the same examples, so the difference of two rows has "
            "its own, narrower paired interval: `vs_ip2p` in metrics.json). FD, a set statistic, has none. A "
            "difference smaller than an interval's half-width is not resolved by this run.")


def _column_notes(m: dict) -> str:
    return "\n".join([
        "Columns: **IoU G** = IoU of (G >= tau) with the true change mask (G resampled bilinearly to the image's "
        "pixels, as the composite does; for RSE rows this *is* M, so IoU G = IoU M); **IoU M** = IoU of the "
        "composite's edit mask (plain IP2P edits the whole image); **AUROC G** = pixel AUROC of G; **pointing** = "
        "G's maximum inside the true mask; **PSNR / SSIM / MAE out** = edited vs source over the pixels *outside* "
        "the true change mask "
        f"(per-image PSNR capped at {m['psnr_cap_db']:.0f} dB); **instr. acc (edited)** = classifier accuracy on "
        "the edited image against the target labels over the edited (example, finding) cells; **age r / sex acc** "
        "= Pearson r of predicted age and agreement of predicted sex, edited vs source; **FD** = Fréchet distance "
        "of classifier features, edited vs the real current images (small-sample: compare rows, not to other "
        "runs); **seed IoU** = mean pairwise IoU of G >= tau between seeds. A dash: not defined for the method. "
        "The G columns of plain IP2P are dashes (it computes G but does not use it). rse_paper and rse_correct "
        "share G (the re-noising happens after G), hence the same G columns."])


# ----------------------------------------------------------------------------------------------------------------
# Plots


def bars(m: dict) -> Image.Image:
    """One panel per column, one bar per method, the value written above each bar and its 95 % bootstrap interval
    as a whisker."""
    font = ImageFont.load_default()
    methods = list(m["results"])
    colours = [(70, 110, 180), (220, 130, 40), (60, 160, 90), (180, 60, 60), (120, 90, 170)]
    pw, ph, cols = 240, 180, 4
    rows = -(-len(COLUMNS) // cols)
    img = Image.new("RGB", (cols * pw, rows * ph + 24 + 14 * len(methods)), "white")
    d = ImageDraw.Draw(img)
    for k, (_, header, path, spec, scale) in enumerate(COLUMNS):
        x0, y0 = (k % cols) * pw, (k // cols) * ph
        vals = [value(m["results"][meth], path) for meth in methods]
        finite = [v for v in vals if v is not None and np.isfinite(v)]
        lo, hi = scale if scale else (0.0, max(finite, default=1.0) * 1.15 or 1.0)
        d.text((x0 + 8, y0 + 4), header, fill="black", font=font)
        base, top = y0 + ph - 16, y0 + 34
        d.line([(x0 + 8, base), (x0 + pw - 8, base)], fill="black")
        bw = (pw - 24) // max(1, len(methods))
        for j, v in enumerate(vals):
            bx = x0 + 12 + j * bw
            if v is None or not np.isfinite(v):
                d.text((bx + 2, base - 14), "n/a", fill="grey", font=font)
                continue
            def y_of(x, lo=lo, hi=hi, base=base, top=top):
                return base - (0.0 if hi == lo else float(np.clip((x - lo) / (hi - lo), 0, 1))) * (base - top)

            by = y_of(v)
            d.rectangle([bx, by, bx + bw - 6, base], fill=colours[j % len(colours)])
            ci = interval(m["results"][methods[j]], ".".join(path))
            if ci is not None:  # the 95 % bootstrap interval as a whisker
                cx = bx + (bw - 6) // 2
                d.line([(cx, y_of(ci[0])), (cx, y_of(ci[1]))], fill="black", width=1)
                for yy in (y_of(ci[0]), y_of(ci[1])):
                    d.line([(cx - 3, yy), (cx + 3, yy)], fill="black")
            d.text((bx, min(by, y_of(ci[1]) if ci else by) - 12), spec.format(v), fill="black", font=font)
    y = rows * ph + 6
    for j, meth in enumerate(methods):
        d.rectangle([8, y + 14 * j, 18, y + 14 * j + 10], fill=colours[j % len(colours)])
        d.text((24, y + 14 * j), meth, fill="black", font=font)
    return img


def sweep_plot(m: dict) -> Image.Image:
    """Instruction accuracy (y) against PSNR outside the true change (x), one line per relevance-draw count through
    the sweep's taus (labelled), 95 % intervals as whiskers, the source's and the true current image's accuracy as
    dashed lines."""
    sweep = m.get("tau_sweep") or {}
    points = [p for p in sweep.get("points", []) if p["psnr_out"] is not None and p["accuracy_edited"] is not None]
    font = ImageFont.load_default()
    w, h, left, right, top, bottom = 640, 440, 60, 20, 30, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 8), f"tau sweep ({sweep.get('examples', 0)} examples): instruction accuracy vs PSNR outside the "
                      "true change", fill="black", font=font)
    if not points:
        d.text((left, h // 2), "no sweep points (see report.md)", fill="grey", font=font)
        return img
    xs = [v for p in points for v in [p["psnr_out"], *(interval(p, "psnr_out") or [])]]
    x0, x1 = min(xs) - 0.5, max(xs) + 0.5
    px = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    py = lambda y: h - bottom - y * (h - top - bottom)  # noqa: E731
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for y in (0.0, 0.25, 0.5, 0.75, 1.0):
        d.text((left - 30, py(y) - 6), f"{y:.2f}", fill="black", font=font)
    for x in np.linspace(x0, x1, 5):
        d.text((px(x) - 12, h - bottom + 4), f"{x:.1f}", fill="black", font=font)
    d.text((w // 2 - 60, h - 20), "PSNR out (dB)", fill="black", font=font)
    for name, colour in (("source (unedited)", (150, 150, 150)), ("true current", (60, 160, 90))):
        y = (sweep.get("references") or {}).get(name)
        if y is not None:
            for xa in range(left, w - right, 8):
                d.line([(xa, py(y)), (min(xa + 4, w - right), py(y))], fill=colour)
            d.text((w - right - 110, py(y) - 12), name, fill=colour, font=font)
    colours = {1: (70, 110, 180), "many": (220, 130, 40)}
    for k, draws in enumerate(sorted({p["relevance_draws"] for p in points})):
        colour = colours[1] if draws == 1 else colours["many"]
        curve = [p for p in points if p["relevance_draws"] == draws or (p["tau"] == 0 and draws != 1)]
        curve.sort(key=lambda p: p["tau"])
        d.line([(px(p["psnr_out"]), py(p["accuracy_edited"])) for p in curve], fill=colour, width=2)
        for p in curve:
            x, y = px(p["psnr_out"]), py(p["accuracy_edited"])
            ci = interval(p, "accuracy_edited")
            if ci:
                d.line([(x, py(ci[0])), (x, py(ci[1]))], fill=colour)
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            d.text((x + 4, y + 2 + 10 * k), f"{p['tau']:g}", fill=colour, font=font)
        d.text((left + 8, h - bottom - 32 + 14 * k), f"G from {draws} relevance draw{'s' if draws > 1 else ''} "
                                              "(labels: tau)", fill=colour, font=font)
    return img


def example_grid(examples: list[dict], source: np.ndarray, result: dict, method: str, n: int) -> Image.Image:
    rows = []
    size = source.shape[-1]
    for i in range(min(n, len(examples))):
        g = result["guidance"][i]
        diff = np.clip(np.abs(result["edited"][i] - source[i]) * 4.0 - 1.0, -1, 1)  # 4x the intensity change
        true = examples[i]["mask"]
        panels = [("input", render.grey_image(source[i])), ("edited", render.grey_image(result["edited"][i])),
                  ("|edited-input| x4", render.grey_image(diff)),
                  ("G overlay" + (" (unused)" if method == "ip2p" else ""), render.guidance_overlay(source[i], g)),
                  ("true mask", render.mask_image(np.zeros((size, size), bool) if true is None else true))]
        rows.append(render.figure(panels, caption=examples[i]["instruction"], height=128))
    if not rows:
        return Image.new("RGB", (8, 8), "white")
    out = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows) + 20), "white")
    ImageDraw.Draw(out).text((4, 4), method, fill="black", font=ImageFont.load_default())
    y = 20
    for r in rows:
        out.paste(r, (0, y))
        y += r.height
    return out


def write_all(dst: Path, m: dict, examples: list[dict], source: np.ndarray, results: dict, num_grid: int) -> None:
    """The PNG plots into `dst` (report.md and metrics.json are written by the runner)."""
    bars(m).save(dst / "bars.png")
    sweep_plot(m).save(dst / "tau_sweep.png")
    if num_grid:
        for meth, res in results.items():
            example_grid(examples, source, res, meth, num_grid).save(dst / f"examples_{meth}.png")
