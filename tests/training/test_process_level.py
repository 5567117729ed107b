"""Process-level training tests: SIGKILL + resume (in the default run), 8-device checkpoint on 1 device and 2 hosts
x 4 devices (`pytest -m multiprocess`).

All runs train the same tiny model on the same 48-example synthetic build with a global batch of 8 x 2
(accumulation), so their loss sequences are comparable step by step. They share one persistent compilation cache:
the first run compiles, the others load its executables (as a restarted job does), which is what makes the SIGKILL
check cheap enough for the default run.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.training.tiny_run import build_data

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6
pytestmark = pytest.mark.slow


def env(devices: int) -> dict:
    e = dict(os.environ)
    e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    e["JAX_PLATFORMS"] = "cpu"
    e["PYTHONPATH"] = str(ROOT)
    return e


def cmd(workdir, data_dir, *args):
    cache = f"{data_dir}-jax-cache"  # one per module, beside its data
    return [sys.executable, "-m", "tests.training.tiny_run", str(workdir), str(data_dir), "--compilation-cache", cache,
            *map(str, args)]


def run(workdir, data_dir, *args, devices=1):
    subprocess.run(cmd(workdir, data_dir, *args), env=env(devices), cwd=ROOT, check=True, timeout=600)


def losses(workdir) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.setdefault(r["step"], []).append(r["loss"])
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    build_data(str(d))
    return d


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """An uninterrupted 1-process, 1-device run: its losses and final params."""
    d = tmp_path_factory.mktemp("ref")
    run(d / "work", data_dir, "--steps", STEPS, "--dump", d / "params.npz")
    return losses(d / "work"), np.load(d / "params.npz")


def test_sigkill_then_resume_is_bitwise_identical(tmp_path, data_dir, reference):
    ref_losses, ref_params = reference
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed, data_dir, "--steps", STEPS), env=env(1), cwd=ROOT)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "4").is_dir():  # a finished checkpoint mid-run
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run(killed, data_dir, "--steps", STEPS, "--dump", tmp_path / "resumed.npz")

    resumed = losses(killed)
    assert sorted(ref_losses) == sorted(resumed) == list(range(1, STEPS + 1))
    for step, values in resumed.items():  # steps re-run after the kill logged the same loss again, bit for bit
        assert all(v == ref_losses[step][0] for v in values), (step, values, ref_losses[step])
    params = np.load(tmp_path / "resumed.npz")
    assert sorted(params.files) == sorted(ref_params.files)
    for k in ref_params.files:
        np.testing.assert_array_equal(params[k], ref_params[k], err_msg=k)


@pytest.mark.multiprocess
def test_eight_device_fsdp_checkpoint_resumes_on_one_device(tmp_path, data_dir, reference):
    ref_losses, ref_params = reference
    work = tmp_path / "w"
    run(work, data_dir, "--steps", STEPS, "--max-steps", 3, "--fsdp", 8, devices=8)
    assert sorted(losses(work)) == [1, 2, 3]
    run(work, data_dir, "--steps", STEPS, "--dump", tmp_path / "resumed.npz", devices=1)
    got = losses(work)
    for step in range(1, STEPS + 1):
        assert got[step][-1] == pytest.approx(ref_losses[step][0], abs=1e-5), step
    params = np.load(tmp_path / "resumed.npz")
    for k in ref_params.files:
        np.testing.assert_allclose(params[k], ref_params[k], atol=1e-5, err_msg=k)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_of_four_devices_match_one_process_of_eight(tmp_path, data_dir):
    steps = 3
    run(tmp_path / "one", data_dir, "--steps", steps, devices=8)
    coord = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen(cmd(tmp_path / "two", data_dir, "--steps", steps, "--coordinator", coord,
                                  "--num-processes", 2, "--process-id", i), env=env(4), cwd=ROOT)
             for i in range(2)]
    for p in procs:
        assert p.wait(timeout=600) == 0
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, steps + 1))
    for step in one:
        assert two[step][0] == pytest.approx(one[step][0], abs=1e-5), step
