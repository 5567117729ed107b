"""The [project.scripts] entry points name real functions, and each program answers --help."""

import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_the_five_commands_are_declared():
    assert set(SCRIPTS) == {"x2x-train", "x2x-edit", "x2x-convert", "x2x-evaluate", "x2x-data"}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_entry_point_runs_help(name):
    module, function = SCRIPTS[name].split(":")
    assert callable(getattr(importlib.import_module(module), function))
    code = f"import sys; sys.argv = [{name!r}, '--help']; from {module} import {function}; sys.exit({function}())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == (1 if name == "x2x-train" else 0), proc.stderr  # absl's --help exits with 1
    assert "usage" in proc.stdout.lower() or "--config" in proc.stdout, proc.stdout[:500]
