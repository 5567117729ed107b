"""Edit chest X-rays by instruction with Region-Specific Editing (InstructX2X).

  python edit.py                                  # the shipped example, the shipped tiny model -> ./edit_out
  python edit.py --model runs/v1/export --image cxr.dcm --instruction "Add the finding of pleural effusion." --out out/
  python edit.py --model DIR --requests edits.csv --out out/  # CSV columns: image, instruction[, seed]
  python edit.py --guidance learned                # G from the learned predictor in MODEL/guidance/
  python edit.py --model sd15 --compile-only v6e:1 --resolution 512 --batch-size 8   # AOT for a TPU, no TPU needed
  python edit.py --serve                           # the browser editor on http://127.0.0.1:7860 ('.[app]' extra)

Writes per edit (into OUT, or OUT/<row>_<stem>/ for --requests): edited.png at the input's own size (outside mask.png
the input's pixels bit for bit: PNG 8/16-bit and colour layout, JPEG's decoded values; DICOM -> the displayed values
as a 16-bit PNG), edited.dcm (DICOM input: same geometry and photometry, outside the mask the input's stored values,
new UIDs, ImageType DERIVED + SECONDARY), guidance.png (G as a red overlay on the input), guidance.npy (raw G, latent
resolution), mask.png (G resampled bilinearly to the input's pixels, >= tau: the composite's own mask), figure.png
(input | edited | |edited - input| x4 | G [| plain IP2P with --compare]) and edit.json (parameters, parsed
instruction, priors, guidance method, feather, warnings, timings). Bad input: one `error:` line on stderr, exit
status 2, nothing written.
Limits: short side >= 32 px, at most 40 megapixels (x2x_jax.data.io.MAX_EDIT_PIXELS).
"""

import argparse
import csv
import os
import sys
from pathlib import Path


def parse_args(argv):
    from x2x_jax import outputs
    from x2x_jax.editing import api

    d = api.Settings()  # the defaults (the edit parameters': x2x_jax.editing.rse.EditParams)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=str(api.DEFAULT_MODEL),
                   help="diffusers dir, or a training workdir with export/ or unet/export/ (default: the shipped "
                   "synth_tiny model)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", help="PNG / JPEG / DICOM (default: the shipped synthetic example)")
    src.add_argument("--requests", metavar="CSV",
                     help="CSV with columns image, instruction[, seed]; image paths relative to the CSV")
    src.add_argument("--batch", dest="batch_csv", metavar="CSV", help=argparse.SUPPRESS)  # the old --requests
    p.add_argument("--instruction", help="the edit instruction (default with no --image: the example's)")
    p.add_argument("--out", default=api.DEFAULT_OUT, help=f"output folder (default: ./{api.DEFAULT_OUT}): "
                   f"{outputs.OUT_HELP}; --compile-only adds its report file to it")
    p.add_argument("--overwrite", action="store_true", help=outputs.OVERWRITE_HELP)
    p.add_argument("--tau", type=float, default=d.tau, help="mask threshold on G, in [0, 1] (0 = plain IP2P)")
    p.add_argument("--steps", type=int, default=d.steps, help="DDIM steps")
    p.add_argument("--text-scale", type=float, default=d.text_scale, help="text guidance scale s_T")
    p.add_argument("--image-scale", type=float, default=d.image_scale, help="image guidance scale s_I")
    p.add_argument("--seed", type=int, default=0, help="seed of --image (a --requests row's own seed column wins)")
    p.add_argument("--noise-level", type=float, default=d.noise_level,
                   help="relevance map timestep as a fraction of T")
    p.add_argument("--renoise", choices=api.RENOISE_MODES, default=d.renoise,
                   help="re-noise the background to the timestep after each step (correct) or one step off as "
                   "the original code (paper)")
    p.add_argument("--relevance-draws", type=int, default=d.relevance_draws,
                   help="average the relevance map over K noise draws")
    p.add_argument("--guidance", choices=api.GUIDANCE, default="relevance",
                   help="where G = prior x map takes its map from: the UNet relevance map (relevance, the paper) "
                   "or the learned guidance predictor in MODEL/guidance/ (learned)")
    p.add_argument("--guidance-model", default=None,
                   help="the learned guidance predictor's folder (default: MODEL/guidance/; --guidance learned)")
    p.add_argument("--no-rse", action="store_true", help="plain InstructPix2Pix (tau = 0)")
    p.add_argument("--compare", action="store_true", help="add plain IP2P with the same seed to figure.png")
    p.add_argument("--resolution", type=int, default=None,
                   help="model input size (default: the model's: vae sample_size, else unet sample_size x factor)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="edits per compiled call (--requests)")
    p.add_argument("--feather", type=int, default=None,
                   help="width in input pixels of the blend band inside the mask (0 = hard edge; default: the "
                   "larger of 1%% of the short side and one model pixel)")
    p.add_argument("--keep-detail", action=argparse.BooleanOptionalAction, default=api.KEEP_DETAIL_DEFAULT,
                   help="inside the mask, keep the input's fine detail where the edit did not change the "
                   "low-frequency content (default: %(default)s; see README 'Full-resolution editing')")
    p.add_argument("--dicom-out", action=argparse.BooleanOptionalAction, default=None,
                   help="also write edited.dcm (default: on for a DICOM input; --dicom-out needs a DICOM input)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="compute dtype (auto: float32 on CPU, bfloat16 on accelerators)")
    p.add_argument("--compile-only", "--compile_only", metavar="TOPOLOGY", default=None,
                   help="compile the edit program for a TPU topology (e.g. v6e:1, v5e:2x2) on this host, print "
                   "per-chip memory and compiler estimates, write OUT/compile_only_edit_<topology>_b<batch>.json, "
                   "and exit; --model sd15 compiles the SD1.5 architecture without weights (needs "
                   "pip install -e '.[tpu]')")
    app = p.add_argument_group("browser editor (--serve)")
    app.add_argument("--serve", action="store_true",
                     help="start the browser editor (needs pip install -e '.[app]'); the edit flags above set its "
                     "controls' starting values")
    app.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default: 127.0.0.1, this machine only; --host 0.0.0.0 exposes the "
                     "editor to every network this machine is on, without a login: do it deliberately, e.g. behind "
                     "an SSH tunnel or an authenticating proxy)")
    app.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    app.add_argument("--max-upload-mb", type=float, default=100, help="largest upload accepted (default: 100)")
    app.add_argument("--queue-size", type=int, default=16,
                     help="edits waiting behind the running one before new ones are refused (default: 16)")
    app.add_argument("--keep-minutes", type=float, default=10,
                     help="how long results stay downloadable before they are deleted (default: 10)")
    a = p.parse_args(argv)
    if a.batch_csv is not None:
        print("warning: --batch is deprecated (it read like --batch-size): use --requests CSV", file=sys.stderr)
        a.requests = a.batch_csv
    return a


def read_requests(path, default_seed=0):
    from x2x_jax.editing.api import Request
    from x2x_jax.errors import DataError

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header, rows = reader.fieldnames or [], list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read the requests CSV ({e})") from None
    if not {"image", "instruction"} <= set(header):
        raise DataError(f"{path}: the requests CSV needs a header with columns image, instruction[, seed]")
    if not rows:
        raise DataError(f"{path}: the requests CSV has no rows")
    base = Path(path).parent
    out = []
    for line, r in enumerate(rows, start=2):
        try:
            seed = int(r.get("seed") or default_seed)
        except ValueError:
            raise DataError(f"{path}: line {line}: seed {r['seed']!r} is not an integer") from None
        if not r.get("image"):
            raise DataError(f"{path}: line {line}: no image")
        image = Path(r["image"])
        out.append(Request(str(image if image.is_absolute() else base / image), r.get("instruction") or "", seed))
    return out


def compile_only(a) -> int:
    from x2x_jax import aot
    from x2x_jax import outputs
    from x2x_jax.editing.api import COMMAND
    from x2x_jax.errors import ConfigError

    if a.steps < 1 or a.batch_size < 1 or a.relevance_draws < 1:
        raise ConfigError("--steps, --batch-size and --relevance-draws must be >= 1")
    if a.guidance != "relevance":
        raise ConfigError("--compile-only compiles the relevance-map program (--guidance relevance)")
    out = Path(a.out)
    outputs.check(out, COMMAND, a.overwrite)
    r = aot.compile_edit_program(a.model, a.compile_only, resolution=a.resolution, batch=a.batch_size,
                                 steps=a.steps, relevance_draws=a.relevance_draws)
    path = aot.write(r, out / f"compile_only_edit_{a.compile_only.replace(':', '_')}_b{a.batch_size}.json")
    print(aot.summary(r))
    print(f"wrote {path}")
    aot.check_fits(r, path)
    return 0


def main(argv=None):
    if any(str(a).split("=")[0] in ("--compile-only", "--compile_only") for a in (sys.argv if argv is None else argv)):
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling for a TPU topology runs nothing on a TPU
    from x2x_jax.editing import api
    from x2x_jax.errors import ConfigError, cli_main

    @cli_main
    def run():
        a = parse_args(argv)
        if a.compile_only:
            return compile_only(a)
        settings = api.Settings(tau=0.0 if a.no_rse else a.tau, steps=a.steps, text_scale=a.text_scale,
                                image_scale=a.image_scale, noise_level=a.noise_level, renoise=a.renoise,
                                relevance_draws=a.relevance_draws, compare=a.compare, batch_size=a.batch_size,
                                feather=a.feather, keep_detail=a.keep_detail, dicom_out=a.dicom_out)
        settings.check()
        if a.serve:
            if a.image or a.requests or a.instruction:
                raise ConfigError("--serve takes its images and instructions in the browser, not from --image, "
                                  "--requests or --instruction")
            from x2x_jax.cli import app

            return app.serve(a, settings)
        if a.requests:
            if a.instruction is not None:
                raise ConfigError("--instruction is not used with --requests (the CSV has an instruction column)")
            requests = read_requests(a.requests, a.seed)
        else:
            image, instruction = a.image, a.instruction
            if image is None:
                image = str(api.DEFAULT_EXAMPLE)
                if instruction is None:
                    instruction = api.DEFAULT_EXAMPLE_INSTRUCTION.read_text().strip()
            if instruction is None:
                raise ConfigError("--instruction is required with --image")
            requests = [api.Request(image, instruction, a.seed)]
        editor = api.Editor(a.model, resolution=a.resolution, dtype=a.dtype, guidance=a.guidance,
                            guidance_dir=a.guidance_model)
        records = api.edit_into(editor, requests, settings, Path(a.out), subfolders=bool(a.requests),
                                  overwrite=a.overwrite)
        for r in records:
            for w in r["warnings"]:
                print(f"warning: {r['image']}: {w}")
            t = r["timings"]
            print(f"{r['image']}: \"{r['instruction']}\" -> mask {100 * r['mask_fraction']:.1f}% of the image "
                  f"(compile {t['compile_s']:.1f} s, run {t['run_s']:.2f} s for {t['edits_in_call']} edit(s))")
        print(f"wrote {len(records)} edit(s) to {a.out}")
        return 0

    return run()


if __name__ == "__main__":
    sys.exit(main())
