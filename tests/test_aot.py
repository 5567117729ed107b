"""Ahead-of-time compiles for TPU topologies on this CPU host (x2x_jax.aot, x2x_jax.targets).

The compile tests need libtpu (the test extra installs it; CI runs them). They compile tiny models, so what they
check is that the *TPU* program is built (bf16 compute, the accumulation as a loop, FSDP collectives) and reported,
not any figure of a real model.
"""

import json
import types

import jax
import numpy as np
import pytest

from x2x_jax import aot, targets
from x2x_jax.errors import ConfigError

try:
    import libtpu  # noqa: F401

    HAVE_LIBTPU = True
except ImportError:
    HAVE_LIBTPU = False
needs_libtpu = pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]')")

# A compiled TPU module's collectives, as XLA prints them (shapes with TPU layouts; an async all-gather pair; a
# reduce-scatter as a kCustom fusion whose called computation holds an all-reduce that must not count twice; an
# async collective started by a kCustom fusion and carried on by continuation fusions, each of whose computations
# repeats the all-gather: it is one all-gather, as in the SD1.5 v5e:16x16 step).
HLO = """\
HloModule jit_step

%fused_computation.9 (param_0: bf16[4,64]) -> (bf16[4,64], bf16[1024,64]) {
  %all-gather.7 = bf16[1024,64]{1,0:T(8,128)(2,1)} all-gather(%param_0), channel_id=8, dimensions={0}
  ROOT %custom-call.1 = (bf16[4,64]{1,0}, bf16[1024,64]{1,0}) custom-call(%all-gather.7), custom_call_target="AsyncCollectiveStart"
}

%async_collective_fusion.1 (param_0.1: bf16[4,64], param_1.1: bf16[1024,64]) -> (bf16[4,64], bf16[1024,64]) {
  %all-gather.8 = bf16[1024,64]{1,0:T(8,128)(2,1)} all-gather(%param_0.1), channel_id=8, dimensions={0}
}

%all-reduce-scatter.3 (input: f32[512,256]) -> f32[256,256] {
  %input = f32[512,256]{1,0} parameter(0)
  %all-reduce.2 = f32[512,256]{1,0:T(8,128)} all-reduce(%input), channel_id=3, replica_groups={{0,1}}
  ROOT %dynamic-slice.5 = f32[256,256]{1,0:T(8,128)S(1)} dynamic-slice(%all-reduce.2, %a, %b)
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag = bf16[1280,64]{1,0:T(8,128)(2,1)} all-gather(%x), channel_id=9, dimensions={0}
}

ENTRY %main (p0: f32[256,256]) -> f32[256,256] {
  %all-gather-start.1 = (bf16[256,256]{1,0}, bf16[512,256]{1,0}) all-gather-start(%convert.2), channel_id=2
  %all-gather-done.1 = bf16[512,256]{1,0:T(8,128)(2,1)S(1)} all-gather-done(%all-gather-start.1)
  %fusion = f32[256,256]{1,0:T(8,128)S(1)} fusion(%fusion.1), kind=kCustom, calls=%all-reduce-scatter.3
  %all-reduce.1 = f32[256,256]{1,0:T(8,128)S(1)} all-reduce(%fusion), channel_id=4, to_apply=%add
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body
  %async-collective-start.1 = (bf16[4,64]{1,0}, bf16[1024,64]{1,0}) fusion(%c), kind=kCustom, calls=%fused_computation.9
  %fusion.2 = (bf16[4,64]{1,0}, bf16[1024,64]{1,0}) fusion(%g1, %g2), kind=kOutput, calls=%async_collective_fusion.1, backend_config={"continuation_config":{"output_tuple_original_start":"0"}}
  ROOT %a2a = (f32[4,8]{1,0}, f32[4,8]{1,0}) all-to-all(%q, %r), channel_id=5
}
"""


def test_collectives_from_hlo_known_answer():
    c = aot.collectives(HLO)
    # the -done, the loop body's and the continued one (once)
    assert c["all-gather"] == {"count": 3, "bytes": 512 * 256 * 2 + 1280 * 64 * 2 + 1024 * 64 * 2}
    assert c["reduce-scatter"] == {"count": 1, "bytes": 256 * 256 * 4}
    assert c["all-reduce"] == {"count": 1, "bytes": 256 * 256 * 4}  # not the one inside the reduce-scatter
    assert c["all-to-all"] == {"count": 1, "bytes": 2 * 4 * 8 * 4}
    assert c["collective-permute"] == {"count": 0, "bytes": 0}


# A DDIM-like loop body as a TPU compile prints it: an async copy HBM -> VMEM (S(1)) and a fusion reading the VMEM
# copy and the HBM original, every array padded to its (8, 128) tile.
LOOP_HLO = """\
HloModule jit_denoise

%body (p: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %p = (s32[], f32[8,8]{1,0:T(8,128)}) parameter(0)
  %x = f32[8,8]{1,0:T(8,128)} get-tuple-element(%p), index=1
  %s = ((f32[8,8]{1,0:T(8,128)}), f32[8,8]{1,0:T(8,128)S(1)}, u32[]) copy-start(%x)
  %d = f32[8,8]{1,0:T(8,128)S(1)} copy-done(%s)
  %f = bf16[8,8]{1,0:T(8,128)(2,1)S(1)} fusion(%d, %x), kind=kLoop, calls=%fc, metadata={op_name="jit(denoise)/while/body/unet/down_0/conv"}
  ROOT %t = (s32[], f32[8,8]{1,0:T(8,128)}) tuple(%i, %x)
}

ENTRY %main (p0: f32[8,8]) -> f32[8,8] {
  %w = (s32[], f32[8,8]{1,0:T(8,128)}) while(%init), condition=%cond, body=%body
}
"""


def test_loop_body_traffic_known_answer():
    tile = 8 * 128  # f32[8,8] laid out in an (8, 128) tile: 4,096 bytes; bf16: 2,048
    copy, fusion = aot.loop_body_traffic(LOOP_HLO)
    assert copy == {"bytes": 4 * tile, "hbm": 4 * tile, "kind": "copy-start", "part": "(copy-start)"}
    # result (VMEM) + the VMEM copy + the HBM original; only the last is HBM side
    assert fusion == {"bytes": 2 * tile + 4 * tile + 4 * tile, "hbm": 4 * tile, "kind": "fusion:kLoop",
                      "part": "down/conv"}
    chip = types.SimpleNamespace(peak_bf16_flops=1e3, hbm_bytes_per_s=8 * tile)
    r = aot.memory_space_roofline([copy, fusion], 500.0, chip)
    assert r["hbm_side_bytes"] == 8 * tile and r["loop_body_bytes"] == 14 * tile
    assert r["flops_s"] == 0.5 and r["hbm_s"] == 1.0 and r["step_s"] == 1.0 and r["bound"] == "HBM bandwidth"
    with pytest.raises(ConfigError, match="no while loop"):
        aot.loop_body_traffic(LOOP_HLO.split("ENTRY")[0])


def test_loop_counted_known_answer():
    whole = {"flops": 10.0, "bytes accessed": 100.0, "optimal_seconds": 1.0}  # the loop body counted once
    body = {"flops": 3.0, "bytes accessed": 20.0, "optimal_seconds": 0.5}
    assert aot.loop_counted(whole, body, 100) == {"flops": 307.0, "bytes accessed": 2080.0, "optimal_seconds": 50.5}


def test_accumulation_extrapolated_known_answer():
    whole = {"flops": 10.0, "optimal_seconds": 0.5}  # outside + one loop body
    outside = {"flops": 4.0, "optimal_seconds": 0.1}
    assert aot.accumulation_extrapolated(whole, outside, 32) == {"flops": 4.0 + 32 * 6.0,
                                                                  "optimal_seconds": pytest.approx(0.1 + 32 * 0.4)}


@pytest.mark.parametrize("raw, want", [(0.25, (0.25, 0)), (-0.99956, (pytest.approx(0.00044), 1)),
                                       (-2.998917, (pytest.approx(0.001083), 3)), (-1.0, (0.0, 1))])
def test_modelled_seconds_takes_out_libtpus_minus_one_second_sentinels(raw, want):
    assert aot.modelled_seconds(raw) == want


def test_host_target_is_cpu():
    assert targets.platform() == "cpu" and targets.chip() is None
    assert targets.default_compute_dtype() == np.float32
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    assert targets.platform(mesh) == "cpu" and targets.platform(jax.devices()[0]) == "cpu"


@pytest.mark.parametrize("name", ["v5e", "tpu:2x2", "v7x:2x2", "v5e:2x2x2x2", "a100:8"])
def test_bad_topology_names_are_one_line_config_errors(name):
    with pytest.raises(ConfigError, match="expected a TPU topology"):
        targets.topology_devices(name)


@needs_libtpu
@pytest.mark.parametrize("topology, chips, kind", [("v4:2x2x1", 4, "TPU v4"), ("v5p:2x2x1", 4, "TPU v5"),
                                                   ("v5e:2x4", 8, "TPU v5 lite"), ("v6e:1", 1, "TPU v6 lite")])
def test_topologies_have_one_device_per_chip(topology, chips, kind):
    # v4 and v5p run as megacore chips on TPU VMs; libtpu's default for v4 is a device per TensorCore
    devices = targets.topology_devices(topology)
    assert len(devices) == chips and devices[0].device_kind == kind
    assert targets.chip(devices).hbm_bytes == {"TPU v4": 32, "TPU v5": 95, "TPU v5 lite": 16, "TPU v6 lite": 32}[kind] * 2**30


# --------------------------------------------------------------------------------------- compiles (libtpu)


@needs_libtpu
@pytest.mark.slow
@pytest.mark.extended
def test_gathering_params_once_per_step_cuts_the_tpu_steps_all_gather_bytes():
    c = tiny_config()
    c.train.gather_params = "once"
    with jax.default_matmul_precision("default"):  # as in test_edit_cli_compile_only_for_tpu
        plain = aot.compile_train_step(tiny_config(), "v5e:2x2")
        once = aot.compile_train_step(c, "v5e:2x2")
    assert once["gather_params"] == "once"
    gathered = [r["collectives_per_step"]["all-gather"]["bytes"] for r in (plain, once)]
    assert gathered[1] < gathered[0], gathered


def test_ici_estimate_known_answer():
    chip = targets.Chip("x", 16 * targets.GIB, 100e12, 1e12, ici_bytes_per_s=400e9)
    zero = {"count": 0, "bytes": 0}
    per_step = {k: dict(zero) for k in aot.COLLECTIVES}
    per_step["all-gather"] = {"count": 2, "bytes": 100e9}
    per_step["reduce-scatter"] = {"count": 1, "bytes": 10e9}
    c = aot.ici_estimate(per_step, chip, group=8, step_s=0.5)
    assert c["received_bytes_per_chip_per_step"] == 170e9  # 100 + 7 x 10
    assert c["ici_s"] == pytest.approx(170e9 / 200e9)
    assert c["step_s_overlapped"] == pytest.approx(0.85) and c["step_s_serial"] == pytest.approx(1.35)
    assert "ici_s" not in aot.ici_estimate(per_step, targets.Chip("y", 1, 1.0, 1.0), group=8, step_s=0.5)


def test_collectives_extrapolated_counts_the_loop_body_accum_times():
    whole = {"all-gather": {"count": 5, "bytes": 50}, "all-reduce": {"count": 1, "bytes": 4}}
    outside = {"all-gather": {"count": 1, "bytes": 10}, "all-reduce": {"count": 1, "bytes": 4}}
    got = aot.collectives_extrapolated(whole, outside, accum=3)
    assert got == {"all-gather": {"count": 13, "bytes": 130}, "all-reduce": {"count": 1, "bytes": 4}}


def tiny_config(fsdp=4):
    from tests.oracle import TINY_TEXT, TINY_UNET, TINY_VAE
    from x2x_jax.configs.common import base_config

    c = base_config()
    c.model.unet, c.model.vae, c.model.text_encoder = dict(TINY_UNET), dict(TINY_VAE), dict(TINY_TEXT)
    c.data.resolution = 32
    c.train.per_device_batch, c.train.accum_steps = 1, 2
    c.train.mesh_data, c.train.mesh_fsdp = -1, fsdp
    return c


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("topology, kind", [
    ("v5e:2x2", "TPU v5 lite"),
    pytest.param("v5p:2x2x1", "TPU v5", marks=pytest.mark.extended),  # the same program for another generation
])
@pytest.mark.slow
def test_train_step_compiles_for_tpu_with_fsdp(topology, kind):
    with jax.default_matmul_precision("default"):  # as in test_edit_cli_compile_only_for_tpu
        r = aot.compile_train_step(tiny_config(), topology)
    assert r["device_kind"] == kind and r["chips"] == 4 and r["mesh"] == {"data": 1, "fsdp": 4}
    assert r["compute_dtype"] == "bfloat16"  # the target's dtype, not the CPU host's float32
    assert r["attention"] == "splash"  # the target's UNet attention (the tiny model's sequences fall back to einsum)
    assert r["hlo_while_loops"] >= 1  # accumulation as a scan on TPU (unrolled only on a CPU target)
    assert r["collectives"]["all-gather"]["count"] > 0 and r["collectives"]["reduce-scatter"]["count"] > 0
    # batch-sharded FSDP needs no resharding of activations (layers.batch_sharded pins them)
    assert r["collectives"]["collective-permute"]["count"] == r["collectives"]["all-to-all"]["count"] == 0
    mem = r["memory_per_chip"]
    assert 0 < mem["total_gib"] < mem["hbm_gib"] and mem["fits_with_10pct_headroom"]
    assert r["effective_batch"] == 8 and r["model_flops_per_step"] > 0
    per_step = r["collectives_per_step"]  # the accumulation loop's collectives counted twice (accum 2)
    assert per_step["all-gather"]["bytes"] > r["collectives"]["all-gather"]["bytes"]
    comm = r["estimates"]["communication"]
    assert comm["received_bytes_per_chip_per_step"] > 0 and comm["ici_s"] > 0
    assert comm["step_s_serial"] >= comm["step_s_overlapped"] >= r["estimates"]["step_s"]
    est = r["estimates"]
    assert "not measurements" in est["note"] and est["step_s"] > 0 and 0 < est["mfu"] < 1
    # libtpu's -1 s sentinels taken out: the compiler's own estimate is usable, for the loop counted twice
    assert est["compiler_optimal_s"] > 0
    assert est["step_s"] == max(est["compiler_optimal_s"], est["roofline_s"])  # the roofline bounds it from below
    assert est["cost_source"].startswith("the step with its accumulation loop counted 2 times")
    json.dumps(r)  # the report is plain JSON


def tiny_model_dir(path):
    from tests.oracle import TINY_TEXT, TINY_UNET, TINY_VAE

    for name, cfg in (("unet", TINY_UNET), ("vae", TINY_VAE), ("text_encoder", TINY_TEXT)):
        (path / name).mkdir(parents=True)
        (path / name / "config.json").write_text(json.dumps(cfg))
    (path / "model_index.json").write_text("{}")
    return path


@needs_libtpu
@pytest.mark.slow
def test_edit_cli_compile_only_for_tpu(tmp_path, capsys):
    from x2x_jax.cli import edit as edit_cli

    model = tiny_model_dir(tmp_path / "m")  # config files only: no weights are needed to compile
    # The suite's "highest" matmul precision (for CPU parity tests) asks the TPU for fp32 contractions of bf16
    # operands, which its kernels refuse; programs compiled for a TPU use the default precision.
    with jax.default_matmul_precision("default"):
        code = edit_cli.main(["--model", str(model), "--compile_only", "v5e:2x2", "--resolution", "32",
                              "--batch-size", "4", "--steps", "2", "--out", str(tmp_path / "o")])
    assert code == 0
    out = capsys.readouterr().out
    assert "edit for v5e:2x2 (4 x TPU v5 lite)" in out and "estimates, not measurements" in out
    r = json.loads((tmp_path / "o" / "compile_only_edit_v5e_2x2_b4.json").read_text())
    assert r["compute_dtype"] == "bfloat16" and r["attention"] == "splash" and r["batch"] == 4 and r["steps"] == 2
    assert r["hlo_while_loops"] >= 1  # the DDIM fori_loop
    assert r["memory_per_chip"]["fits_with_10pct_headroom"] and r["estimates"]["s_per_edit"] > 0
    # three stages, each compiled; the denoise stage (the DDIM loop, its body counted once by XLA) counted 2 times
    st = r["stages"]
    assert list(st) == ["prepare", "denoise", "finish"] and all(s["compile_s"] > 0 for s in st.values())
    assert r["estimates"]["xla_flops_per_chip"] == pytest.approx(
        st["prepare"]["xla_flops"] + 2 * st["denoise"]["xla_flops"] + st["finish"]["xla_flops"])
    assert r["memory_per_chip"]["total_gib"] >= max(s["argument_gib"] + s["temp_gib"] for s in st.values())
    m = r["estimates"]["memory_space_roofline"]  # ours: the DDIM loop body's HBM-side bytes, FLOPs at peak
    assert 0 < m["hbm_side_bytes"] <= m["loop_body_bytes"] and m["step_s"] == max(m["flops_s"], m["hbm_s"]) > 0
    assert m["s_per_edit"] > 0 and "memory-space-aware roofline (ours, a lower bound)" in out


def test_a_program_that_does_not_fit_is_a_one_line_error(tmp_path):
    # The fit check itself, on a report whose chip has (pretend) 1 MiB of HBM.
    r = {"program": "train_step", "topology": "v5e:2x2", "chip": "v5e",
         "memory_per_chip": {"total_gib": 0.5, "hbm_gib": 1 / 1024, "fits_with_10pct_headroom": False}}
    with pytest.raises(ConfigError) as info:
        aot.check_fits(r, tmp_path / "r.json")
    message = str(info.value)
    assert "\n" not in message and "needs 0.50 GiB per chip" in message and "0.50 GiB more than 90 %" in message
    assert "per_device_batch" in message
    assert all(f"--preset {n} (" in message for n in ("v5e-8", "v5e-64", "v5e-256"))  # the v5e slices' presets
    r["topology"] = "v5e:2x4"  # a slice with its own preset: that one is named
    with pytest.raises(ConfigError, match=r"or use the preset --preset v5e-8 \(v5e:2x4: 4 images/chip, FSDP 8"):
        aot.check_fits(r, tmp_path / "r.json")


def test_presets_apply_and_resolve():
    from x2x_jax import presets
    from x2x_jax.configs.ix2x_v1 import get_config

    p = presets.get("v5e-256")
    c = presets.apply(get_config(), p)
    assert (c.train.per_device_batch, c.train.mesh_fsdp, c.train.remat, c.train.accum_steps) == (4, 8, "none", -1)
    assert c.train.effective_batch == 1024  # the recipe's effective batch is kept; accumulation follows from it
    assert c.train.gather_params == "per_use" and get_config().train.gather_params == "per_use"
    assert presets.apply(get_config(), presets.get("v5e-8")).train.gather_params == "once"
    assert presets.resolve_target("v5e-256") == ("v5e:16x16", 1, p)
    assert presets.resolve_target("v5e:2x2", 2) == ("v5e:2x2", 2, None)
    two = presets.get("v5e-256x2")
    assert presets.resolve_target("v5e-256x2") == presets.resolve_target("v5e-256x2", 2) == ("v5e:16x16", 2, two)
    with pytest.raises(ConfigError, match="--num-slices 3: the preset v5e-256x2 is for 2 slice"):
        presets.resolve_target("v5e-256x2", 3)
    with pytest.raises(ConfigError, match="'v5e-7': not one of v5e-8"):
        presets.get("v5e-7")
    for preset in presets.PRESETS.values():  # every preset names a topology libtpu can lay out ...
        if HAVE_LIBTPU:
            chips = len(targets.topology_devices(preset.topology))
            assert chips % preset.mesh_fsdp == 0
            # ... and its images fill the recipe's effective batch without a remainder
            assert 1024 % (preset.per_device_batch * chips * preset.num_slices) == 0, preset.name


@needs_libtpu
def test_multislice_mesh_keeps_each_fsdp_group_inside_one_slice():
    from x2x_jax.training.sharding import make_mesh

    devices = targets.topology_devices("v5e:2x4", 2)
    mesh = make_mesh(-1, 4, devices)  # what the trainer builds on a 2-slice pod
    assert mesh.devices.shape == (4, 4) and mesh.axis_names == ("data", "fsdp")
    assert all(len({d.slice_index for d in group}) == 1 for group in mesh.devices)  # FSDP over ICI only
    assert {d.slice_index for d in mesh.devices[:, 0]} == {0, 1}  # the data axis crosses the slices (DCN)
    assert sorted(d.id for d in mesh.devices.ravel()) == sorted(d.id for d in devices)
    ids = np.vectorize(lambda d: d.id)
    np.testing.assert_array_equal(ids(aot.target_mesh("v5e:2x4", 2, -1, 4).devices), ids(mesh.devices))  # AOT = pod
    with pytest.raises(ConfigError, match="fsdp=16 does not divide the 8 devices of each of 2 slices"):
        make_mesh(-1, 16, devices)  # an FSDP group may not span slices
