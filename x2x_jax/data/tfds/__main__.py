"""`tfds build` for this project's builders, without TensorFlow.

The `tfds` console script of tensorflow-datasets 4.9.10 imports TensorFlow at start-up (its `convert_format`
command annotates with `tf.train.Example`), so it cannot run in our TF-free environment even though building
does not need TF. This entry point registers our builders and runs TFDS' own `build` command with the same flags:

    python -m x2x_jax.data.tfds build synth_cxr_edit --config v1 --data_dir ~/tensorflow_datasets
    python -m x2x_jax.data.tfds build mimic_edit_instruction --config v1 --manual_dir RELEASE --data_dir DIR

Where TensorFlow is installed, `tfds build NAME --imports x2x_jax.data.tfds ...` is equivalent.
"""

from __future__ import annotations

import dataclasses
import logging as python_logging

import simple_parsing
from absl import app, logging
from tensorflow_datasets.scripts.cli import build, cli_utils

import x2x_jax.data.tfds  # noqa: F401  (registers the builders)
from x2x_jax.errors import cli_main


@dataclasses.dataclass(frozen=True, kw_only=True)
class Args(cli_utils.Args):
    """Build x2x_jax TFDS datasets (TensorFlow-free `tfds build`)."""

    command: build.Args = simple_parsing.subparsers({"build": build.Args})

    def execute(self) -> None:
        self.command.execute()


@cli_main
def main(args: Args) -> None:
    # Like `tfds build`: show absl INFO logs (the build summary) through Python logging.
    logging.use_python_logging(quiet=True)
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().python_handler.setFormatter(
        python_logging.Formatter("{levelname}[{filename}]: {message}", style="{")
    )
    args.execute()


def run() -> None:
    """The x2x-data entry point."""
    app.run(main, flags_parser=cli_utils.make_flags_parser(Args, description=__doc__.split("\n\n")[0]))


if __name__ == "__main__":
    run()
