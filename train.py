"""Train x2x-jax models.

  python train.py                                   # the embedded default: synth_tiny (VAE stage, then UNet)
  python train.py --config configs/ix2x_v1.py --workdir runs/v1 --config.data.manual_dir=/data/mimic
Multi-host: pass --coordinator HOST:PORT --num_processes N --process_id I (or set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID) on every host.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(__file__), "configs",
                                                                 "synth_tiny.py"), "Training config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, samples, export). "
                               "Default: runs/<config name>.")
_COORD = flags.DEFINE_string("coordinator", os.environ.get("JAX_COORDINATOR_ADDRESS"),
                             "Multi-host: coordinator address host:port.")
_NPROC = flags.DEFINE_integer("num_processes", int(os.environ.get("JAX_NUM_PROCESSES", "1")),
                              "Multi-host: number of processes.")
_PID = flags.DEFINE_integer("process_id", int(os.environ.get("JAX_PROCESS_ID", "0")),
                            "Multi-host: this process's index.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from x2x_jax.errors import X2XError
    from x2x_jax.training.run import run

    try:
        run(_CONFIG.value, _WORKDIR.value, coordinator=_COORD.value, num_processes=_NPROC.value,
            process_id=_PID.value, config_path=flags.FLAGS["config"].config_filename)
    except X2XError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
