import os

# Tests run in fp32 on CPU, on 8 simulated devices so the sharding tests see a mesh (single-device code simply
# runs on device 0). This must happen before jax is imported anywhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# Most of the suite's time is XLA:CPU compiling small programs; LLVM at -O0 compiles them ~2x faster (the tiny UNet's
# init: 10.3 -> 4.5 s; tests/training/test_step.py + tests/editing/test_rse.py: 304 -> 191 s). The HLO is the same;
# float results can differ in the last bits (tiny UNet, 3 AdamW steps at lr 1e-3: params within 2e-5), which the
# tests' tolerances absorb, and runs compared bitwise use the same flags. Set the flag yourself to override.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from x2x_jax.models.tokenizer import load_tokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("X2X_CACHE_DIR", str(tmp_path_factory.mktemp("tokcache")))
        return load_tokenizer()


def pytest_collection_modifyitems(config, items):
    """Modules by their share of slow tests, highest first (a stable sort: order within a module is kept), so that
    with two workers (`-n 2 --dist loadfile`) the long modules start early and the short ones fill in, instead of
    one long module running alone at the end."""
    total, slow = {}, {}
    for item in items:
        total[item.path] = total.get(item.path, 0) + 1
        slow[item.path] = slow.get(item.path, 0) + bool(item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path] / total[item.path])
