"""python -m x2x_jax.evaluate: the evaluation suite (see `x2x_jax.evaluate.runner`)."""

from __future__ import annotations

import argparse

from x2x_jax import outputs
from x2x_jax.errors import ConfigError, cli_main
from x2x_jax.evaluate import runner


def parse(argv=None) -> runner.Config:
    d = runner.Config(out="")
    ap = argparse.ArgumentParser(
        prog="python -m x2x_jax.evaluate",
        description="Edit a test split with plain IP2P and the RSE variants and report localization, preservation, "
                    "instruction following, identity, realism and seed stability (report.md, metrics.json, PNGs).")
    ap.add_argument("--out", required=True, help=f"output folder: {outputs.OUT_HELP}")
    ap.add_argument("--overwrite", action="store_true", help=outputs.OVERWRITE_HELP)
    ap.add_argument("--model", default=None, help="model directory (default: the shipped synth_tiny model)")
    ap.add_argument("--data", default=d.data,
                    help=f"'{runner.SYNTH_DATA}' (generated, with true change masks) or a prepared TFDS dataset: its "
                         "directory, or its name with --data-dir (e.g. mimic_edit_instruction/v1_256)")
    ap.add_argument("--data-dir", default=None, help="TFDS data_dir for a dataset given by name")
    ap.add_argument("--split", default=d.split)
    ap.add_argument("--methods", default=",".join(d.methods),
                    help=f"comma-separated, from {', '.join(runner.METHODS)} (default: all)")
    ap.add_argument("--num-examples", type=int, default=d.num_examples,
                    help="the first N examples of the split (default %(default)s: the full default run fits 10 "
                         "minutes on a 2-core CPU)")
    ap.add_argument("--steps", type=int, default=d.steps, help="DDIM steps (default %(default)s; the paper: 100)")
    ap.add_argument("--seeds", type=int, default=d.seeds, help="seeds of G for the seed-stability metric (>= 2 "
                    "to measure it)")
    ap.add_argument("--seed", type=int, default=d.seed, help="edit seed (seed-stability uses seed .. seed+seeds-1)")
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--tau", type=float, default=d.tau, help="RSE threshold (default: the paper's %(default)s)")
    ap.add_argument("--noise-level", type=float, default=d.noise_level,
                    help="noise level of the relevance map (default: the paper's %(default)s)")
    ap.add_argument("--relevance-draws", type=int, default=d.relevance_draws,
                    help="relevance maps averaged into G (default: the paper's %(default)s)")
    ap.add_argument("--classifier", default=None,
                    help="classifier directory (x2x_jax.evaluate.classifiers format); default: the shipped synthetic "
                         "one; required for non-synthetic data")
    ap.add_argument("--num-grid", type=int, default=d.num_grid, help="examples per examples_<method>.png")
    ap.add_argument("--image-size", type=int, default=None,
                    help="px of the images edited and measured (default: the model's resolution); the model still "
                         "edits at its own resolution and the output is composited at this size, as edit.py does")
    ap.add_argument("--sweep-taus", default=",".join(f"{t:g}" for t in d.sweep_taus),
                    help="taus of the preservation vs instruction-following sweep (default %(default)s)")
    ap.add_argument("--sweep-examples", type=int, default=d.sweep_examples,
                    help="the first N examples edited at every sweep tau (default %(default)s; 0: no sweep)")
    ap.add_argument("--sweep-draws", type=int, default=d.sweep_draws,
                    help="relevance draws of the sweep's second curve (default %(default)s)")
    a = ap.parse_args(argv)
    try:
        taus = tuple(float(t) for t in a.sweep_taus.split(",") if t.strip())
    except ValueError:
        raise ConfigError(f"--sweep-taus must be comma-separated numbers, got {a.sweep_taus!r}") from None
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    return runner.Config(out=a.out, model=a.model, data=a.data, split=a.split, data_dir=a.data_dir, methods=methods,
                         num_examples=a.num_examples, steps=a.steps, seeds=a.seeds, seed=a.seed,
                         batch_size=a.batch_size, tau=a.tau, noise_level=a.noise_level,
                         relevance_draws=a.relevance_draws, classifier=a.classifier, num_grid=a.num_grid,
                         image_size=a.image_size, sweep_taus=taus, sweep_examples=a.sweep_examples,
                         sweep_draws=a.sweep_draws, overwrite=a.overwrite, command=runner.command_line(argv))


@cli_main
def main(argv=None):
    cfg = parse(argv)
    m = runner.evaluate(cfg)
    print(f"wrote {cfg.out}/report.md, metrics.json, bars.png, tau_sweep.png, examples_*.png in "
          f"{m['wall_time_s']:.0f} s")


if __name__ == "__main__":
    main()
