"""Edit chest X-rays by instruction: `python edit.py --help` (the same program as the `x2x-edit` entry point,
x2x_jax/cli/edit.py)."""

import sys

from x2x_jax.cli.edit import main

if __name__ == "__main__":
    sys.exit(main())
