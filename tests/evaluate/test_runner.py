import copy
import json

import numpy as np
import pytest

from x2x_jax.evaluate import __main__ as cli
from x2x_jax.evaluate import report, runner

SMALL = ["--num-examples", "3", "--steps", "2", "--seeds", "2", "--batch-size", "3", "--num-grid", "2",
         "--sweep-taus", "0,0.1", "--sweep-draws", "2", "--noise-level", "0.6"]


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    """One end-to-end run on the shipped tiny model (3 examples, 2 steps: ~1 minute on 2 busy cores)."""
    out = tmp_path_factory.mktemp("eval") / "ev"
    cli.main(["--out", str(out), *SMALL])
    return out, json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_end_to_end_writes_report_metrics_and_plots(evaluation):
    out, m = evaluation
    ran = [k for k in runner.METHODS if k not in m["skipped"]]
    assert ran == list(m["results"]) and {"ip2p", "rse_paper", "rse_correct"} <= set(ran)
    assert set(m["skipped"]) <= {"rse_learned"} and all(m["skipped"].values())  # a reason, never silent
    assert {"report.md", "metrics.json", "bars.png", "tau_sweep.png"} <= {p.name for p in out.iterdir()}
    assert all((out / f"examples_{k}.png").is_file() for k in ran)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    assert m["num_examples"] == 3 and m["steps"] == 2 and m["seeds"] == 2
    assert m["noise_level"] == 0.6 and m["relevance_draws"] == 1
    assert m["image_size"] == m["resolution"] == 64  # no --image-size: measured at the model's resolution

    md = (out / "report.md").read_text()
    assert "relevance map at noise level 0.6 from 1 draw(s)" in md
    assert "| method | IoU G | IoU M |" in md and "## Expected vs measured" in md
    assert "## Full resolution" in md and "| method | keep detail | PSNR out (dB) |" in md
    assert md.count("\n| ip2p |") >= 1 and "rse_correct" in md
    for k in m["skipped"]:
        assert f"**{k} skipped**" in md
    assert len(m["expected"]) == 9 and all(e["holds"] in (True, False, None) for e in m["expected"])

    for k, r in m["results"].items():
        loc, pres, follow = r["localization"], r["preservation"], r["instruction_following"]
        assert 0 <= loc["iou_m"] <= 1 and 0 <= loc["auroc_m"] <= 1
        assert 0 < pres["psnr_out"] <= runner.PSNR_CAP_DB and -1 <= pres["ssim_out"] <= 1 and pres["mae_out"] >= 0
        assert 0 <= follow["accuracy_edited"] <= 1 and follow["n_edited_cells"] >= 3
        assert r["realism"]["frechet_distance"] >= 0 and -1 <= r["identity"]["age_pearson"] <= 1
        if k == "ip2p":  # tau = 0: M is the whole image, so IoU M is the true mask's area fraction
            assert loc["mask_fraction"] == 1.0 and loc["iou_m"] == pytest.approx(loc["true_mask_fraction"])
            assert loc["iou_g"] is None and r["stability"] is None
            assert pres["mae_outside_own_mask"] is None  # nothing lies outside M
        else:  # the composite: outside M the output is the input, exactly
            assert pres["mae_outside_own_mask"] == 0.0
            assert r["full_resolution"]["keep_detail_off"]["mae_outside_own_mask"] == 0.0
            assert r["full_resolution"]["keep_detail_on"]["mae_outside_own_mask"] == 0.0
            assert 0 <= loc["iou_g"] <= 1 and 0 <= loc["auroc_g"] <= 1 and 0 <= loc["pointing_g"] <= 1
            st = r["stability"]
            assert st["num_seeds"] == 2 and 0 <= st["seed_iou"] <= 1
            # G from the one-step program (used for the extra seeds) is the full edit's G.
            assert st["one_step_vs_full_g_max_abs_diff"] < 1e-5
    if "rse_learned" in m["results"]:  # the predictor's map is a function of the image and text, not the seed
        st = m["results"]["rse_learned"]["stability"]
        assert st["seed_iou"] == 1.0 and st["g_seed_std"] < 1e-6
    # rse_paper and rse_correct share G; only the re-noising differs.
    assert m["results"]["rse_paper"]["localization"]["iou_g"] == m["results"]["rse_correct"]["localization"]["iou_g"]
    assert m["references"]["true current"]["identity"]["sex_agreement"] >= 0

    # Bootstrap intervals: every row's averages, and the differences to ip2p on the same resamples
    assert m["bootstrap"]["draws"] == runner.BOOTSTRAP["draws"] and "percentile bootstrap over the 3 examples" in md
    for k, r in {**m["results"], **m["references"]}.items():
        lo, hi = r["ci95"]["instruction_following.accuracy_edited"]
        assert lo <= r["instruction_following"]["accuracy_edited"] <= hi
        assert set(r["ci95"]) >= {f"instruction_following.per_op.{op}" for op in
                                  r["instruction_following"]["per_op"]}
    for k in ran:
        r = m["results"][k]
        assert r["ci95"]["preservation.psnr_out"][0] <= r["preservation"]["psnr_out"]
        if k != "ip2p":
            d = r["vs_ip2p"]["preservation.psnr_out"]
            assert d["difference"] == pytest.approx(r["preservation"]["psnr_out"]
                                                    - m["results"]["ip2p"]["preservation"]["psnr_out"])
            assert d["ci95"][0] <= d["difference"] <= d["ci95"][1]
    lo, hi = m["results"]["ip2p"]["ci95"]["instruction_following.accuracy_edited"]
    assert f"({lo:.3f}–{hi:.3f})" in md  # the interval beside the value in the main table

    # The tau sweep: tau 0 (one point: G unused) and 0.1 with 1 and 2 relevance draws, on all 3 examples. Its
    # tau 0 and tau 0.1 one-draw edits are ip2p's and rse_correct's (same program, inputs and seed).
    sweep = m["tau_sweep"]
    assert sweep["examples"] == 3 and [(p["tau"], p["relevance_draws"]) for p in sweep["points"]] == [
        (0.0, 1), (0.1, 1), (0.1, 2)]
    for p, row in zip(sweep["points"][:2], ("ip2p", "rse_correct")):
        r = m["results"][row]
        assert p["accuracy_edited"] == r["instruction_following"]["accuracy_edited"]
        assert p["psnr_out"] == pytest.approx(r["preservation"]["psnr_out"], abs=1e-9)
        assert p["mask_fraction"] == pytest.approx(r["localization"]["mask_fraction"], abs=1e-12)
        assert p["ci95"]["accuracy_edited"][0] <= p["accuracy_edited"] <= p["ci95"]["accuracy_edited"][1]
    assert "vs_tau0" not in sweep["points"][0]
    for p in sweep["points"][1:]:  # paired against tau 0 on the same examples: the difference lies in its interval
        for k in ("psnr_out", "accuracy_edited"):
            d = p["vs_tau0"][k]
            assert d["difference"] == pytest.approx(p[k] - sweep["points"][0][k], abs=1e-12)
            assert d["ci95"][0] <= d["difference"] <= d["ci95"][1]
    paired = m["results"]["rse_correct"]["vs_ip2p"]["preservation.psnr_out"]["ci95"]  # the same pairs, resampled
    assert sweep["points"][1]["vs_tau0"]["psnr_out"]["ci95"] == pytest.approx(paired, abs=1e-9)  # the same way
    assert "| acc. vs tau 0 (points) |" in md
    assert sweep["references"]["true current"] == m["references"]["true current"]["instruction_following"][
        "accuracy_edited"]
    assert "## Tau sweep" in md and (out / "tau_sweep.png").is_file()


@pytest.mark.slow
def test_rerun_into_an_earlier_evaluation_replaces_it(evaluation, tmp_path):
    out, m = evaluation
    (out / "report.md").write_text("stale")
    cli.main(["--out", str(out), *SMALL, "--sweep-examples", "0", "--methods", "ip2p", "--seeds", "1",
              "--num-grid", "0"])
    new = json.loads((out / "metrics.json").read_text())
    assert list(new["results"]) == ["ip2p"] and (out / "report.md").read_text() != "stale"


@pytest.mark.slow
def test_image_size_edits_at_the_model_and_measures_at_that_size(tmp_path, monkeypatch):
    """--image-size 128 with the 64 px model: inputs at 128 px, one model run per method, two composites (keep-detail
    off and on) at 128 px that keep the input outside M bit for bit; every metric at 128 px."""
    from x2x_jax.editing.api import KEEP_DETAIL_DEFAULT, Editor

    runs, composites = [], {}
    real_run, real_composite = Editor.run, runner.composite

    def run(self, prepared, *a, **k):
        runs.append(prepared[0].image.shape)
        return real_run(self, prepared, *a, **k)

    def composite(editor, prepared, sources, result, tau):
        out = real_composite(editor, prepared, sources, result, tau)
        composites[tau] = (np.stack([s.grey for s in sources]) * 2.0 - 1.0, out)
        return out

    monkeypatch.setattr(Editor, "run", run)
    monkeypatch.setattr(runner, "composite", composite)
    out = tmp_path / "ev"
    cli.main(["--out", str(out), *SMALL, "--sweep-examples", "0", "--seeds", "1", "--num-grid", "1",
              "--methods", "ip2p,rse_correct",
              "--image-size", "128"])
    m = json.loads((out / "metrics.json").read_text())
    assert m["image_size"] == 128 and m["resolution"] == 64
    assert runs == [(64, 64)] * 2  # the model ran once per method, at its own resolution

    for tau, (source, res) in composites.items():
        mask, off, on = res["mask"], res["keep_detail"][False], res["keep_detail"][True]
        assert source.shape == mask.shape == off.shape == on.shape == (3, 128, 128) and res["feather_px"] == 2
        assert res["edited"] is res["keep_detail"][KEEP_DETAIL_DEFAULT]
        np.testing.assert_array_equal(off[~mask], source[~mask])  # outside M: the input, bit for bit
        np.testing.assert_array_equal(on[~mask], source[~mask])
        assert np.any(off[mask] != on[mask])  # keep-detail changes the output inside M only
        assert mask.all() if tau == 0.0 else (mask.any() and not mask.all())

    for k, r in m["results"].items():
        full = r["full_resolution"]
        assert full["feather_px"] == 2
        for variant in ("keep_detail_off", "keep_detail_on"):
            v = full[variant]
            assert 0 < v["psnr_out"] <= runner.PSNR_CAP_DB and 0 < v["psnr_in"] <= runner.PSNR_CAP_DB
            assert v["mae_out"] >= 0 and v["mae_in"] > 0 and v["sharpness_in_m"] > 0
            assert v["sharpness_in_m_vs_true"] > 0
            if k == "ip2p":  # M is the whole image: nothing outside it
                assert v["mae_outside_own_mask"] is None and v["sharpness_ratio"] is None
            else:
                assert v["mae_outside_own_mask"] == 0.0 and v["sharpness_ratio"] > 0
        if k != "ip2p":
            assert full["true_current_sharpness_ratio"] > 0
        default = full["keep_detail_on" if KEEP_DETAIL_DEFAULT else "keep_detail_off"]
        assert r["preservation"]["psnr_out"] == default["psnr_out"]  # the main table measures the default
    assert m["references"]["source (unedited)"]["full_resolution"]["mae_in"] > 0
    md = (out / "report.md").read_text()
    assert "3 examples at 128 px (the model edits at 64 px" in md and "feather 2 px" in md
    assert md.count("\n| rse_correct | o") == 2 and "| *source (unedited)* (reference) |" in md


def _fails(capsys, argv, fragment):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and fragment in err
    return err


def test_bad_input_is_one_line_and_leaves_out_untouched(tmp_path, capsys):
    out = tmp_path / "ev"
    _fails(capsys, ["--out", str(out), "--methods", "ip2p,magic"], "unknown method")
    _fails(capsys, ["--out", str(out), "--model", str(tmp_path / "nope")], "not found")
    _fails(capsys, ["--out", str(out), "--data", "mimic_edit_instruction/v1"], "--classifier is required")
    _fails(capsys, ["--out", str(out), "--num-examples", "1"], "--num-examples")
    _fails(capsys, ["--out", str(out), "--tau", "0"], "--tau")
    _fails(capsys, ["--out", str(out), "--noise-level", "1.5"], "--noise-level must be in (0, 1]")
    _fails(capsys, ["--out", str(out), "--relevance-draws", "0"], "--relevance-draws must be >= 1")
    _fails(capsys, ["--out", str(out), "--image-size", "16"], "--image-size must be >= 32")
    _fails(capsys, ["--out", str(out), "--classifier", str(tmp_path)], "missing")
    assert not out.exists()
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    _fails(capsys, ["--out", str(out)], "not empty")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ev"]


def test_failure_mid_run_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("classifier exploded")

    monkeypatch.setattr(runner, "classify", boom)
    out = tmp_path / "ev"
    with pytest.raises(RuntimeError, match="exploded"):
        runner.evaluate(runner.Config(out=str(out), num_examples=2, methods=("ip2p",)), log=lambda *_: None)
    assert list(tmp_path.iterdir()) == []


def test_tfds_split_gives_the_generated_examples(tmp_path):
    """A prepared synth_cxr_edit TFDS directory (the path a MIMIC build takes) yields the same examples as the
    generator: 8-bit images, masks, labels and identity."""
    from x2x_jax.data.tfds.synth_cxr_edit import SynthCxrEdit, SynthCxrEditConfig

    config = SynthCxrEditConfig(name="tiny", resolution=64, split_sizes=(("train", 1), ("val", 1), ("test", 3)))
    builder = SynthCxrEdit(config=config, data_dir=str(tmp_path))
    builder.download_and_prepare()
    cfg = runner.Config(out="", data=builder.data_dir, num_examples=3, classifier="x")
    got = runner.load_examples(cfg, 64)
    want = runner.load_examples(runner.Config(out="", num_examples=3), 64)
    by_id = {e["id"]: e for e in got}
    assert sorted(by_id) == sorted(e["id"] for e in want)
    for w in want:
        g = by_id[w["id"]]
        np.testing.assert_array_equal(g["past"], w["past"])
        np.testing.assert_array_equal(g["current"], w["current"])
        np.testing.assert_array_equal(g["mask"], w["mask"])
        np.testing.assert_array_equal(g["current_labels"], w["current_labels"])
        assert g["instruction"] == w["instruction"] and g["edits"] == w["edits"]
        assert g["identity"]["male"] == w["identity"]["male"]
        assert g["identity"]["age"] == pytest.approx(w["identity"]["age"])


def test_expected_outcomes_verdicts():
    def res(psnr, acc, iou=None, std=None, age=0.96):
        return {"preservation": {"psnr_out": psnr}, "identity": {"age_pearson": age, "sex_agreement": 1.0},
                "instruction_following": {"accuracy_edited": acc, "n_edited_cells": 50},
                "localization": {"iou_g": iou, "mask_fraction": 0.3, "true_mask_fraction": 0.1},
                "stability": None if std is None else {"g_seed_std": std, "seed_iou": 0.9}}

    m = {"results": {"ip2p": res(20.0, 0.50), "rse_correct": res(27.0, 0.49, 0.6, 0.05),
                     "rse_paper": res(25.0, 0.49, 0.6, 0.05)}, "skipped": {"rse_learned": "no guidance/"}}
    claims = report.expected_outcomes(m)
    e = {x["claim"].split(" ")[0]: x for x in claims}
    assert e["rse_correct"]["holds"] is True and e["rse_paper"]["holds"] is False
    by_claim = {x["claim"]: x for x in claims}
    follow = by_claim["RSE (rse_correct) instruction accuracy >= 0.75 and within 2 points of ip2p"]
    assert follow["holds"] is False and "0.490 vs 0.500 for ip2p (-1.0 points)" in follow["measured"]
    assert by_claim["guidance IoU >= 0.35 (the paper's relevance map: G >= tau vs the true change mask, "
                    "rse_correct)"]["holds"] is True
    learned_iou = by_claim["guidance IoU >= 0.5 (the learned map: G >= tau vs the true change mask, rse_learned)"]
    assert learned_iou["holds"] is None and "no guidance/" in learned_iou["measured"]
    assert by_claim["identity kept: age r and sex agreement, edited vs source, >= 0.95 (rse_correct)"]["holds"]
    assert "50 edited cells" in e["rse_correct"]["measured"] and "no intervals" in e["rse_correct"]["measured"]
    m["results"]["rse_correct"]["vs_ip2p"] = {
        "preservation.psnr_out": {"difference": 7.0, "ci95": [6.5, 7.5]},
        "instruction_following.accuracy_edited": {"difference": -0.01, "ci95": [-0.05, 0.03]}}
    e = {x["claim"].split(" ")[0]: x for x in report.expected_outcomes(m)}
    assert "PSNR gain +7.00 dB, 95 % CI +6.50 to +7.50 (holds)" in e["rse_correct"]["measured"]
    assert "cost +1.0 points, 95 % CI -3.0 to +5.0 — not resolved" in e["rse_correct"]["measured"]
    assert e["rse_learned"]["holds"] is None and "no guidance/" in e["rse_learned"]["measured"]
    assert e["the"]["holds"] is None  # learned vs relevance: not measurable without the learned row
    m["results"]["rse_learned"] = res(27.0, 0.5, 0.7, 0.0, age=0.9)
    m["skipped"] = {}
    claims = report.expected_outcomes(m)
    e = {x["claim"].split(" ")[0]: x for x in claims}
    assert e["the"]["holds"] is True and e["rse_learned"]["holds"] is True
    by_claim = {x["claim"]: x for x in claims}
    assert by_claim["guidance IoU >= 0.5 (the learned map: G >= tau vs the true change mask, rse_learned)"]["holds"]
    ident = by_claim["identity kept: age r and sex agreement, edited vs source, >= 0.95 (rse_learned)"]
    assert ident["holds"] is False and ident["measured"] == "age r 0.900, sex agreement 1.000"


def test_targets_without_labels_come_from_the_ops_and_the_source_call():
    from x2x_jax.data.instructions import Edit

    findings = ["a", "b", "c"]
    examples = [{"edits": (Edit(op="add", findings=("a",)), Edit(op="remove", findings=("b",))),
                 "current_labels": None}]
    source = {"labels": np.array([[0.1, 0.9, 0.8]])}
    targets, ops = runner.instruction_targets(examples, findings, source)
    assert targets.tolist() == [[True, False, True]] and ops.tolist() == [["add", "remove", ""]]


@pytest.mark.slow
def test_report_renders_without_true_masks(evaluation):
    """Data without change masks (MIMIC): localization and outside-region preservation are dashes, not errors."""
    m = copy.deepcopy(evaluation[1])
    for r in m["results"].values():
        r["localization"] = None
        r["preservation"] = {"mae_outside_own_mask": r["preservation"]["mae_outside_own_mask"]}
    m["expected"] = report.expected_outcomes(m)
    needs_masks = [e for e in m["expected"] if "PSNR" in e["claim"] or "IoU" in e["claim"]]
    assert len(needs_masks) == 6 and all(e["holds"] is None for e in needs_masks)  # accuracy, identity: measurable
    md = report.markdown(m)
    assert "| rse_correct | — | — | — | — | — | — | — |" in md
    report.bars(m)


def test_learned_method_is_skipped_with_a_reason(tmp_path):
    import shutil

    from x2x_jax.editing.api import DEFAULT_MODEL

    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, model, ignore=shutil.ignore_patterns("guidance"))
    editor, reason = runner._make_editor(str(model), "learned")
    assert editor is None and "no guidance/ folder" in reason
    (model / "guidance").mkdir()
    editor, reason = runner._make_editor(str(model), "learned")
    assert editor is None and "could not be loaded" in reason and "config.json" in reason
    with pytest.raises(runner.ConfigError, match="no method can run"):
        runner.evaluate(runner.Config(out=str(tmp_path / "ev"), model=str(model), methods=("rse_learned",)),
                        log=lambda *_: None)
    assert not (tmp_path / "ev").exists()
