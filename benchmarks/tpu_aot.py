"""The paper recipe's SD1.5 train step compiled for each TPU preset on this CPU host: the README's preset table.

  python benchmarks/tpu_aot.py [--presets v5e-8,v5e-256] [--out benchmarks/results/tpu_aot]
  python benchmarks/tpu_aot.py --search v5e-8       # compile the candidates for one slice, print the fastest fit
  python benchmarks/tpu_aot.py --search v4-8 --batch 16 --gather once   # a part of the grid (each is 10-35 min)

Needs libtpu (`pip install -e '.[tpu]'`); nothing runs on a TPU, and every time below is an ESTIMATE of the
compiler for the target chip (x2x_jax.aot: libtpu's cost model with its -1 s sentinels taken out, the accumulation
loop counted as often as it runs), never a measurement. Each compile's report is kept in --out
(<name>.json) and reused by later runs, so a long run can be stopped and resumed — the SD1.5 step takes tens of
minutes and up to ~20 GB of host memory to compile on a 2-core host.

Rows: one per preset (x2x_jax/presets.py; v5e-256x2 is two v5e-256 slices). Columns: per-chip memory (the compiler's
buffer assignment) against HBM, estimated step time, img/s per chip and MFU (model FLOPs / (estimate x peak)),
compile time here. Anchors printed beside them (public figures, other models and recipes): MLPerf Training v4.1
SD-v2 with MaxDiffusion on v5p-128 ~79 img/s per chip at 512 px; MosaicML SD2 on A100 ~28 % MFU; the original
IP2P ~2.4 % MFU. The last line is `v5e256_est_mfu=<MFU or nan>`.
"""

import argparse
import dataclasses
import importlib.util
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from x2x_jax import aot, presets, targets  # noqa: E402
from x2x_jax.errors import ConfigError  # noqa: E402
from x2x_jax.models.layers import REMAT_POLICIES  # noqa: E402

ANCHORS = ("anchors (not ours): MLPerf v4.1 SD-v2 MaxDiffusion v5p-128 ~79 img/s/chip; MosaicML SD2 A100 ~28 % MFU; "
           "original IP2P ~2.4 % MFU")


def paper_config(path: str):
    spec = importlib.util.spec_from_file_location("paper_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def commit() -> str:
    """The checkout's commit (a reused report says which code it was compiled from)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def compiled_report(config, preset: presets.Preset, out: Path, name: str,
                    cached_only: bool = False) -> dict | None:
    """The preset's step report, from --out when an earlier run compiled it with the same settings (None with
    cached_only when none did)."""
    path = out / f"{name}.json"
    settings = {"topology": preset.topology, "num_slices": preset.num_slices, "per_chip_batch": preset.per_device_batch,
                "fsdp": preset.mesh_fsdp, "remat": preset.remat}
    if preset.gather_params != "per_use":  # (reports from before the option keep matching their presets)
        settings["gather_params"] = preset.gather_params
    if path.is_file():
        r = json.loads(path.read_text())
        if r.get("settings") == settings:
            return r
    if cached_only:
        return None
    print(f"compiling {name} ({settings}) ...", flush=True)
    t0, code = time.perf_counter(), commit()  # the code this process loaded
    try:
        r = aot.compile_train_step(presets.apply(config, preset), preset.topology, preset.num_slices)
    except ConfigError as e:  # e.g. a mesh the slice cannot hold
        r = {"error": " ".join(str(e).split())}
    r["peak_host_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1)  # this process so far
    r["settings"], r["wall_s"], r["commit"] = settings, round(time.perf_counter() - t0, 1), code
    aot.write(r, path)
    return r


def row(name: str, r: dict | None, preset: presets.Preset) -> str:
    where = preset.where
    if r is None:
        return (f"| {name} | {where} | {preset.per_device_batch} / FSDP {preset.mesh_fsdp} / {preset.remat} | "
                "not compiled yet | | | | | | |")
    if "error" in r:
        return f"| {name} | error: {r['error']} |"
    m, e = r["memory_per_chip"], r["estimates"]
    fits = "fits" if m["fits_with_10pct_headroom"] else "**does not fit**"
    return (f"| {name} | {where} | "
            f"{r['per_chip_batch']} / FSDP {r['mesh']['fsdp']} / {r['remat']} / accum {r['accum_steps']}"
            f" / {GATHER_NAMES[r.get('gather_params', 'per_use')]} | "
            f"{m['total_gib']:.2f} of {m['hbm_gib']:.0f} GiB ({fits}) | {e['step_s']:.2f} s ({e['step_s_source']}) | "
            f"{e['img_per_s_per_chip']:.1f} | {100 * e['mfu']:.1f} % | {communication(e)} | {r['compile_s']:.0f} s, "
            f"{r.get('peak_host_gib', '?')} GiB | {r.get('commit', '?')} |")


GATHER_NAMES = {"per_use": "gather per use", "once": "gather once"}  # train.gather_params


def communication(e: dict) -> str:
    c = e.get("communication", {})
    if "ici_s" not in c:
        return "not estimated"
    return (f"{c['received_bytes_per_chip_per_step'] / 1e9:.1f} GB, {c['ici_s']:.2f} s; "
            f"{100 * c['mfu_serial']:.1f} %")


HEADER = ("| preset | topology | images/chip / FSDP / remat / accumulation / weights | per chip (of HBM) | estimated step | "
          "estimated img/s per chip | estimated MFU | ICI received per chip per step, time; MFU if not overlapped "
          "(estimates) | compile here, peak host GiB | code |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


SEARCH_GRID = {"batch": (4, 8, 16), "remat": ("none", "full"), "gather": ("per_use", "once")}


def search(config, base: presets.Preset, out: Path, only: dict | None = None) -> None:
    """Compile the candidates for one slice (the grid, or the part of it `only` keeps: {"batch": (16,), ...});
    print them and the fastest estimate that fits with >= 10 % headroom. A candidate with the preset's own settings
    reuses the preset's report. Each SD1.5 candidate takes 10-35 min here, so a search runs (and resumes) in parts."""
    chips = targets.topology_devices(base.topology)
    grid = dict(SEARCH_GRID, fsdp=tuple(sorted({f for f in (4, 8, 16, len(chips)) if len(chips) % f == 0})))
    grid.update(only or {})
    results = []
    print(HEADER)
    for batch, fsdp, remat, gather in itertools.product(grid["batch"], grid["fsdp"], grid["remat"], grid["gather"]):
        cand = presets.Preset(base.name, base.topology, batch, fsdp, remat, "candidate", gather, base.num_slices)
        same = (batch, fsdp, remat, gather) == (base.per_device_batch, base.mesh_fsdp, base.remat, base.gather_params)
        name = base.name if same else (f"search_{base.name}_b{batch}_f{fsdp}_{remat}"
                                       + ("_once" if gather == "once" else ""))
        results.append((name, compiled_report(config, cand, out, name)))
        print(row(name, results[-1][1], cand), flush=True)
    ok = [(n, r) for n, r in results if "error" not in r and r["memory_per_chip"]["fits_with_10pct_headroom"]]
    if not ok:
        print(f"no candidate fits {base.topology} with 10 % headroom")
        return
    name, best = min(ok, key=lambda nr: nr[1]["estimates"]["step_s"])
    print(f"fastest fit of {len(ok)} compiled candidates that fit: {name}: Preset({base.name!r}, {base.topology!r}, "
          f"{best['per_chip_batch']}, {best['mesh']['fsdp']}, {best['remat']!r}, 'compiled ...', "
          f"{best.get('gather_params', 'per_use')!r})")


def grid_filter(a) -> dict:
    """--batch 16 --fsdp 4 --remat none --gather once (comma lists) -> the part of the search grid to compile."""
    only = {}
    for key, cast in (("batch", int), ("fsdp", int), ("remat", str), ("gather", str)):
        text = getattr(a, key)
        if text:
            try:
                only[key] = tuple(cast(v) for v in text.split(","))
            except ValueError:
                raise SystemExit(f"error: --{key} {text!r}: expected a comma-separated list of {cast.__name__}")
    allowed = {"remat": REMAT_POLICIES, "gather": tuple(GATHER_NAMES)}
    for key, values in only.items():
        if key in allowed and set(values) - set(allowed[key]):
            raise SystemExit(f"error: --{key} {','.join(values)}: each must be one of {', '.join(allowed[key])}")
    return only


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/ix2x_v1.py")
    p.add_argument("--presets", default="all", help="comma-separated preset names, or all")
    p.add_argument("--search", default=None, help="one preset name: compile its candidates instead")
    for key in ("batch", "fsdp", "remat", "gather"):
        p.add_argument(f"--{key}", default="", help=f"--search: only these {key} values (comma-separated)")
    p.add_argument("--out", default="benchmarks/results/tpu_aot")
    p.add_argument("--cached-only", action="store_true", help="print the table from --out, compile nothing")
    p.add_argument("--other-gather", "--gather-once", default="",
                   help="comma-separated preset names: also the preset with the other train.gather_params (once <-> "
                   "per_use; one row each)")
    a = p.parse_args(argv)
    config, out = paper_config(a.config), Path(a.out)
    if a.search:
        search(config, presets.get(a.search), out, grid_filter(a))
        return 0
    names = list(presets.PRESETS) if a.presets == "all" else a.presets.split(",")
    jobs = [(n, presets.get(n)) for n in names]
    for n in filter(None, a.other_gather.split(",")):
        other = {"once": "per_use", "per_use": "once"}[presets.get(n).gather_params]
        jobs.append((f"{n} {GATHER_NAMES[other]}", dataclasses.replace(presets.get(n), gather_params=other)))
    print(HEADER)
    mfu = {}
    for name, preset in jobs:
        r = compiled_report(config, preset, out, name.replace(" ", "_"), a.cached_only)
        mfu[name] = r["estimates"]["mfu"] if r and "estimates" in r else float("nan")
        print(row(name, r, preset), flush=True)
    print(ANCHORS)
    print(f"v5e256_est_mfu={mfu.get('v5e-256', float('nan')):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
