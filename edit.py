"""Edit chest X-rays by instruction with Region-Specific Editing.

  python edit.py                                  # the shipped synthetic example with the shipped tiny model
  python edit.py --model runs/v1/export --image cxr.dcm --instruction "Add the finding of pleural effusion." --out out/
  python edit.py --model DIR --batch edits.csv --out out/     # CSV columns: image, instruction[, seed]
Writes edited.png (original size and bit depth), guidance.png (G as a red overlay), guidance.npy (raw G),
mask.png, figure.png and edit.json per edit.
"""

import argparse
import csv
import sys
from pathlib import Path


def parse_args(argv):
    from x2x_jax.editing import api

    p = argparse.ArgumentParser(prog="edit.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(api.DEFAULT_MODEL), help="diffusers dir or training workdir "
                   "(default: the shipped synth_tiny model)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", help="PNG / JPEG / DICOM")
    src.add_argument("--batch", help="CSV with columns image, instruction[, seed]")
    p.add_argument("--instruction")
    p.add_argument("--out", default="edit_out")
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--text-scale", type=float, default=7.5)
    p.add_argument("--image-scale", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise-level", type=float, default=0.8)
    p.add_argument("--renoise", choices=("correct", "paper"), default="correct",
                   help="re-noise the background to the timestep after each step (correct) or one step off as "
                   "the original code (paper)")
    p.add_argument("--relevance-draws", type=int, default=1, help="average the relevance map over K noise draws")
    p.add_argument("--no-rse", action="store_true", help="plain InstructPix2Pix (tau = 0)")
    p.add_argument("--compare", action="store_true", help="add plain IP2P with the same seed to the figure")
    return p.parse_args(argv)


def read_batch(path):
    from x2x_jax.editing.api import Request
    from x2x_jax.errors import DataError

    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise DataError(f"{path}: cannot read the batch CSV ({e.strerror})") from None
    if not rows or not {"image", "instruction"} <= set(rows[0]):
        raise DataError(f"{path}: the batch CSV needs a header with columns image, instruction[, seed]")
    base = Path(path).parent
    out = []
    for i, r in enumerate(rows, start=2):
        try:
            seed = int(r.get("seed") or 0)
        except ValueError:
            raise DataError(f"{path}: line {i}: seed {r['seed']!r} is not an integer") from None
        image = Path(r["image"])
        out.append(Request(str(image if image.is_absolute() else base / image), r["instruction"] or "", seed))
    return out


def main(argv=None):
    from x2x_jax.editing import api
    from x2x_jax.errors import ConfigError, cli_main

    @cli_main
    def run():
        a = parse_args(argv)
        settings = api.Settings(tau=0.0 if a.no_rse else a.tau, steps=a.steps, text_scale=a.text_scale,
                                image_scale=a.image_scale, noise_level=a.noise_level, renoise=a.renoise,
                                relevance_draws=a.relevance_draws, compare=a.compare)
        settings.check()
        if a.batch:
            requests = read_batch(a.batch)
        else:
            image, instruction = a.image, a.instruction
            if image is None:
                image = str(api.DEFAULT_EXAMPLE)
                if instruction is None:
                    instruction = api.DEFAULT_EXAMPLE_INSTRUCTION.read_text().strip()
            if instruction is None:
                raise ConfigError("--instruction is required with --image")
            requests = [api.Request(image, instruction, a.seed)]
        editor = api.Editor(a.model)
        records = api.edit_into(editor, requests, settings, Path(a.out), subfolders=bool(a.batch))
        for r in records:
            for w in r["warnings"]:
                print(f"warning: {r['image']}: {w}")
            print(f"{r['image']}: \"{r['instruction']}\" -> {a.out} (mask {100 * r['mask_fraction']:.1f}% of the "
                  f"image, {r['timings']['edit']['seconds']:.2f} s)")
        return 0

    return run()


if __name__ == "__main__":
    sys.exit(main())
