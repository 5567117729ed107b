"""Train x2x-jax models (x2x_jax/cli/train.py; the same program as the x2x-train entry point)."""

from x2x_jax.cli.train import run

if __name__ == "__main__":
    run()
