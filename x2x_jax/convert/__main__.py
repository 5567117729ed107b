"""Convert weights: diffusers directories and LDM single-file checkpoints -> diffusers directories.

    python -m x2x_jax.convert SRC DST --from diffusers --to diffusers [--expand-in-channels 8]
    python -m x2x_jax.convert instruct-pix2pix-00-22000.ckpt out/ip2p --from ldm --to diffusers --allow-pickle --use-ema
    python -m x2x_jax.convert sd15.safetensors out/sd15-ip2p-init --from ldm --to diffusers --expand-in-channels 8

Every conversion goes through our Flax modules, so a written directory has been checked against them. DST follows
every command's output-folder policy (x2x_jax.outputs): new, empty or an earlier conversion, written beside it and
swapped in at the end, so a failed run leaves DST as it was.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from x2x_jax import outputs
from x2x_jax.convert import diffusers as dconv
from x2x_jax.convert.diffusers import read_json
from x2x_jax.convert.ldm_ckpt import load_ldm_checkpoint
from x2x_jax.convert.params import parse_size
from x2x_jax.errors import ConfigError, WeightsError, cli_main
from x2x_jax.models.tokenizer import load_tokenizer

FORMATS_FROM = ("diffusers", "ldm")
COMMAND = "x2x-convert"  # the marker of its output folders (x2x_jax.outputs)
FORMATS_TO = ("diffusers",)  # our training checkpoints export diffusers directories themselves (WORKDIR/export)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m x2x_jax.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="diffusers directory or LDM single-file checkpoint")
    p.add_argument("dst", type=Path, help=f"output folder: {outputs.OUT_HELP}")
    p.add_argument("--from", dest="src_format", choices=FORMATS_FROM, required=True)
    p.add_argument("--to", dest="dst_format", choices=FORMATS_TO, required=True)
    p.add_argument("--allow-pickle", action="store_true", help="read pickled .bin/.ckpt files (runs code from them)")
    p.add_argument("--use-ema", action="store_true", help="ldm: take the UNet from the model_ema.* weights")
    p.add_argument(
        "--configs-from",
        type=Path,
        help="ldm: diffusers directory whose unet/vae/text_encoder configs (and tokenizer, scheduler if present) "
        "describe the checkpoint; default: SD 1.5 / InstructPix2Pix configs built in",
    )
    p.add_argument("--expand-in-channels", type=int, help="widen the UNet's conv_in to N channels (zeros)")
    p.add_argument("--variant", help="diffusers: read <name>.<variant>.safetensors files (e.g. fp16)")
    p.add_argument("--max-shard-size", help="split weight files above this size, e.g. 5GB (default: no shards)")
    p.add_argument("--overwrite", action="store_true", help=outputs.OVERWRITE_HELP)
    return p.parse_args(argv)


def _load_ldm(args: argparse.Namespace):
    tokenizer = scheduler = None
    if args.configs_from is not None:
        root = args.configs_from
        if not root.is_dir():
            raise WeightsError(f"{root}: --configs-from directory not found")
        configs = {c: read_json(root / c / "config.json", f"{c} config") for c in ("unet", "vae", "text_encoder")}
        if (root / "tokenizer").is_dir():
            tokenizer = load_tokenizer(root)
        if (root / "scheduler" / "scheduler_config.json").is_file():
            scheduler = read_json(root / "scheduler" / "scheduler_config.json", "scheduler config")
        return load_ldm_checkpoint(
            args.src,
            configs["unet"],
            configs["vae"],
            configs["text_encoder"],
            allow_pickle=args.allow_pickle,
            use_ema=args.use_ema,
            tokenizer=tokenizer,
            scheduler_config=scheduler,
        )
    return load_ldm_checkpoint(args.src, allow_pickle=args.allow_pickle, use_ema=args.use_ema)


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.use_ema and args.src_format != "ldm":
        raise ConfigError("--use-ema applies to --from ldm only")
    if args.configs_from is not None and args.src_format != "ldm":
        raise ConfigError("--configs-from applies to --from ldm only")
    if args.variant is not None and args.src_format != "diffusers":
        raise ConfigError("--variant applies to --from diffusers only")
    if args.expand_in_channels is not None and args.expand_in_channels < 1:
        raise ConfigError(f"--expand-in-channels={args.expand_in_channels} must be positive")
    if args.max_shard_size is not None:
        try:
            parse_size(args.max_shard_size)
        except ValueError as e:
            raise ConfigError(f"--max-shard-size: {e}") from e
    dst = args.dst.absolute()
    outputs.check(dst, COMMAND, args.overwrite, flag="DST")
    if not args.src.exists():
        raise WeightsError(f"{args.src}: source not found")


    if args.src_format == "diffusers":
        pipe = dconv.load_pipeline(args.src, allow_pickle=args.allow_pickle, variant=args.variant)
    else:
        pipe = _load_ldm(args)
    if args.expand_in_channels is not None:
        config = dconv.model_to_config("unet", pipe.unet)
        pipe.unet_params, config = dconv.expand_unet_in_channels(pipe.unet_params, config, args.expand_in_channels)
        pipe.unet = dconv.model_from_config("unet", config)

    with outputs.staged(dst, COMMAND, flag="DST") as tmp:
        dconv.save_pipeline(tmp, pipe, max_shard_size=args.max_shard_size)
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
