"""Train x2x-jax models.

  python train.py  (or x2x-train)                   # the embedded default: synth_tiny (VAE stage, then UNet)
  python train.py --config configs/ix2x_v1.py --workdir runs/v1 --config.data.manual_dir=/data/mimic
  python train.py --config configs/ix2x_v1.py --compile-only v5e:16x16 [--num-slices 2]   # AOT, no TPU needed
  python train.py --config configs/ix2x_v1.py --preset v5e-256     # a slice's step settings (x2x_jax/presets.py)
Multi-host: pass --coordinator HOST:PORT --num-processes N --process-id I (or set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID) on every host, or --coordinator auto where JAX finds the processes itself (Cloud
TPU VMs, SLURM); README "Running on a TPU pod or a GPU cluster".
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs",
                                                                 "synth_tiny.py"), "Training config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, samples, export). "
                               "Default: runs/<config name>.")
_COORD = flags.DEFINE_string("coordinator", os.environ.get("JAX_COORDINATOR_ADDRESS"),
                             "Multi-host: coordinator address host:port, or 'auto' (Cloud TPU VM, SLURM: "
                             "jax.distributed finds it).")
_NPROC = flags.DEFINE_integer("num-processes", int(os.environ.get("JAX_NUM_PROCESSES", "1")),
                              "Multi-host: number of processes.")
_COMPILE_ONLY = flags.DEFINE_string(
    "compile-only", None, "Compile the config's UNet train step for a TPU topology (e.g. v5e:16x16, v5p:4x4x8, "
    "v6e:1) or preset (v5e-256: its topology and step settings) on this host, print per-chip memory, compiler estimates and collectives, write WORKDIR/compile_only/"
    "*.json, and exit (needs pip install -e '.[tpu]').")
_SLICES = flags.DEFINE_integer("num-slices", 1, "--compile-only: number of slices (data parallel across them).")
_PRESET = flags.DEFINE_string("preset", None, "A TPU slice's step settings (images/chip, FSDP size, remat) from "
                              "x2x_jax/presets.py, e.g. v5e-256; --compile-only also takes a preset name.")
_PID = flags.DEFINE_integer("process-id", int(os.environ.get("JAX_PROCESS_ID", "0")),
                            "Multi-host: this process's index.")

# Flags are spelled with dashes, as in every other command; the underscore spellings of earlier releases still work.
for _name in ("num-processes", "compile-only", "num-slices", "process-id"):
    flags.DEFINE_alias(_name.replace("-", "_"), _name)


def main(argv):
    if _COMPILE_ONLY.value:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling for a TPU topology runs nothing on a TPU
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from x2x_jax.errors import X2XError, error_line
    from x2x_jax.aot import compile_only
    from x2x_jax.training.run import run

    try:
        config = _CONFIG.value
        if _PRESET.value:
            from x2x_jax import presets

            config = presets.apply(config, presets.get(_PRESET.value))
        if _COMPILE_ONLY.value:
            compile_only(config, _WORKDIR.value, _COMPILE_ONLY.value, _SLICES.value,
                         config_path=flags.FLAGS["config"].config_filename)
            return
        run(config, _WORKDIR.value, coordinator=_COORD.value, num_processes=_NPROC.value,
            process_id=_PID.value, config_path=flags.FLAGS["config"].config_filename)
    except X2XError as e:
        print(error_line(e), file=sys.stderr)
        sys.exit(2)


def run() -> None:
    """The x2x-train entry point (absl parses the flags; its --help prints the __main__ module's docstring)."""
    sys.modules["__main__"].__doc__ = __doc__
    app.run(main)


if __name__ == "__main__":
    run()
