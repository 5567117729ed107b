"""Compile the real programs for a target topology without running them (`--compile-only`), and report.

    python train.py --config configs/ix2x_v1.py --compile-only v5e:16x16 [--num-slices 2]
    python edit.py --model sd15 --compile-only v6e:1 --resolution 512 --batch-size 8

The program compiled is the one a host of that topology would run: models in the target's compute dtype, the
train step's accumulation as a scan (unrolled only on CPU), the config's mesh laid over the target's devices
(`--num-slices`: data parallel across slices over DCN, the config's data x fsdp inside each slice). No weights
are needed: every parameter is abstract (shapes from the config's model dicts).

The report (printed, and written as JSON) gives per chip: argument / output / temp bytes against the chip's HBM
(the compiler's buffer assignment, exact for that executable), the *compiler's* step-time estimate
(`cost_analysis()["optimal_seconds"]`), a roofline estimate (max(model FLOPs / peak, bytes accessed / HBM
bandwidth)), the implied images/s and MFU — every time figure labelled an estimate, never a measurement — the
model FLOPs (x2x_jax.flops: every loop iteration) and the count and bytes of each collective read from the
compiled HLO. Caveats, also in the report: XLA's cost analysis and the HLO text count a loop body once (the
accumulation scan, the DDIM loop: both corrected, from the part outside the accumulation loop compiled on its own
and from the edit's denoise stage, which holds the DDIM loop alone), and libtpu's `optimal_seconds` counts -1 s for every op its cost model does not cover
(`modelled_seconds` takes them out and reports how many there were); the roofline estimate from model FLOPs
counts every iteration.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from x2x_jax import presets, targets
from x2x_jax.convert.diffusers import abstract_params, model_from_config, read_json
from x2x_jax.diffusion.ddim import scheduler_config
from x2x_jax.diffusion.schedule import noise_schedule
from x2x_jax.editing.api import resolve_model_dir
from x2x_jax.editing.rse import STAGES, EditModel, EditParams, compile_edit
from x2x_jax.errors import ConfigError
from x2x_jax.flops import count_flops
from x2x_jax.models.architectures import clip_vit_l14_text, sd15_ip2p_unet, sd_vae
from x2x_jax.models.layers import kernels_in_compute_dtype, remat_policy
from x2x_jax.models.vae import latent_factor
from x2x_jax.training import checkpoint as ckpt, loop, stages
from x2x_jax.training.run import stage_config
from x2x_jax.training.sharding import make_mesh, replicated
from x2x_jax.training.state import init_train_state
from x2x_jax.training.step import apply_gradients

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
# An array type as printed, with its layout if any: dtype, dims, layout (e.g. bf16[8,128]{1,0:T(8,128)(2,1)S(1)}).
_SHAPE = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\](?:\{([^}]*)\})?")
# One instruction line: name, result type(s), op, the rest of the line (operands first).
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")


def _bytes(shapes: str) -> int:
    """Bytes of the arrays printed in `shapes`, as logical arrays (no tile padding)."""
    return sum(DTYPE_BYTES[d] * int(np.prod([int(x) for x in dims.split(",") if x] or [1]))
               for d, dims, _ in _SHAPE.findall(shapes))


def hlo_computations(hlo_text: str) -> dict[str, list[str]]:
    """{computation name: its instruction lines} of a compiled HLO module's text."""
    out, current = {}, None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            current = out.setdefault(head.group(1), [])
        elif current is not None:
            current.append(line)
    return out


def collectives(hlo_text: str) -> dict:
    """{kind: {"count", "bytes"}} of the collectives in a compiled HLO module's text. Async pairs are counted once
    (at -done, whose result is the output), and so are async collectives split into continuation fusions; a TPU
    reduce-scatter is a kCustom fusion calling a computation named *reduce-scatter*, counted as one reduce-scatter
    (its inner all-reduce is not counted again)."""
    fused = set(re.findall(r"kind=kCustom, calls=%([\w.\-]*reduce-scatter[\w.\-]*)", hlo_text))
    # A TPU async collective may be split into continuation fusions (backend_config "continuation_config"), each
    # carrying the same collective to overlap it with other work: counted once, at its start.
    fused |= set(re.findall(r'calls=%([\w.\-]+)[^\n]*"continuation_config"', hlo_text))
    out = {k: {"count": 0, "bytes": 0} for k in COLLECTIVES}
    for line in (line for name, body in hlo_computations(hlo_text).items() if name not in fused for line in body):
        m = _INSTR.match(line)
        if not m:
            continue
        _, shapes, op, _ = m.groups()
        if op == "fusion" and "kind=kCustom" in line and any(f"calls=%{name}" in line for name in fused):
            kind = "reduce-scatter"
        else:
            base = op[:-5] if op.endswith("-done") else op
            if op.endswith("-start") or base not in COLLECTIVES:
                continue
            kind = base
        out[kind]["count"] += 1
        out[kind]["bytes"] += _bytes(shapes)
    return out


_NO_TRAFFIC = {"get-tuple-element", "tuple", "parameter", "constant", "bitcast", "after-all", "copy-done",
               "slice-done", "partition-id", "replica-id"}
_ASYNC_MOVES = {"slice-start", "copy-start"}


def laid_out_bytes(m: re.Match) -> int:
    """Bytes of one printed array type (a `_SHAPE` match), its minor-most dims padded to the layout's tile
    (e.g. {1,0:T(8,128)} pads dim 1 to 128 and dim 0 to 8)."""
    dims = [int(x) for x in m.group(2).split(",")] if m.group(2) else []
    layout = (m.group(3) or "").split(":")
    order = [int(x) for x in layout[0].split(",") if x] if layout[0] else []
    tile = re.search(r"T\((\d+)(?:,(\d+))?\)", layout[1]) if len(layout) > 1 else None
    if tile and order:
        sizes = [int(t) for t in tile.groups() if t]
        for axis, t in zip(order, reversed(sizes)):  # the last tile size goes with the most minor dim
            dims[axis] = -(-dims[axis] // t) * t
    return int(np.prod(dims)) * DTYPE_BYTES[m.group(1)]


def _typed_bytes(text: str, vmem_only: bool = False) -> int:
    """Bytes of the arrays printed in `text` (vmem_only: of those laid out in memory space 1, a TPU's VMEM)."""
    return sum(laid_out_bytes(m) for m in _SHAPE.finditer(text) if not vmem_only or "S(1)" in (m.group(3) or ""))


def loop_body_traffic(hlo_text: str) -> list[dict]:
    """The bytes each instruction of a module's largest while body touches: its result plus its operands, as laid
    out ("bytes"), and of those the part in HBM ("hbm": not placed in VMEM); an asynchronous move (slice-start,
    copy-start: HBM <-> VMEM) counts the bytes it moves once, on the HBM side. With each instruction's "kind" and
    model "part" (its op_name path). An accounting of XLA's counting, not a measurement."""
    comps = hlo_computations(hlo_text)
    bodies = re.findall(r"body=%?([\w.\-]+)", hlo_text)
    if not bodies:
        raise ConfigError("no while loop in this HLO text: the loop-body accounting needs one")
    body = max(bodies, key=lambda b: len(comps.get(b, [])))
    parsed = [m.groups() for m in map(_INSTR.match, comps[body]) if m]
    types = {name: result for name, result, _, _ in parsed}
    rows = []
    for name, result, op, rest in parsed:
        if op in _NO_TRAFFIC:
            continue
        if op in _ASYNC_MOVES:  # ((source), destination, context): the destination's bytes are what moves
            moved = list(_SHAPE.finditer(result))
            nbytes = hbm = laid_out_bytes(moved[1]) if len(moved) > 1 else 0  # one side of every move is HBM
        else:
            depth, i = 1, 0
            while i < len(rest) and depth:
                depth += {"(": 1, ")": -1}.get(rest[i], 0)
                i += 1
            operands = [types.get(o, "") for o in re.findall(r"%([\w.\-]+)", rest[:i])]
            nbytes = _typed_bytes(result) + sum(map(_typed_bytes, operands))
            hbm = nbytes - _typed_bytes(result, True) - sum(_typed_bytes(o, True) for o in operands)
        kind = op
        if op in ("fusion", "custom-call"):
            k = re.search(r'kind=(\w+)|custom_call_target="([^"]+)"', rest)
            kind = f"{op}:{(k.group(1) or k.group(2)) if k else '?'}"
        meta = re.search(r'op_name="([^"]+)"', rest)
        path = [p for p in (meta.group(1).split("/") if meta else [])
                if p and not p.startswith("jit(") and p not in ("while", "body", "closed_call", "UNet2DConditionModel")]
        part = re.sub(r"_\d+", "", "/".join(path[-2:])) if path else f"({kind})"
        rows.append({"bytes": nbytes, "hbm": hbm, "kind": kind, "part": part})
    return rows


def memory_space_roofline(rows: list[dict], flops_per_iteration: float, chip) -> dict:
    """Our roofline of one iteration of a module's main loop that knows memory spaces, from its `loop_body_traffic`
    rows: max(FLOPs at peak, the HBM-side bytes at HBM bandwidth). libtpu's estimate tracks all the bytes XLA counts at
    HBM bandwidth, pricing reads and writes of VMEM-resident arrays as HBM traffic; this one leaves them out, so it
    is a lower bound, and an estimate (ours, not the compiler's)."""
    total, hbm = sum(r["bytes"] for r in rows), sum(r["hbm"] for r in rows)
    flop_s, hbm_s = flops_per_iteration / chip.peak_bf16_flops, hbm / chip.hbm_bytes_per_s
    return {"loop_body_bytes": float(total), "hbm_side_bytes": float(hbm),
            "vmem_fraction": 1 - hbm / total if total else 0.0, "flops_s": flop_s, "hbm_s": hbm_s,
            "step_s": max(flop_s, hbm_s), "bound": "FLOPs" if flop_s >= hbm_s else "HBM bandwidth"}


def target_mesh(topology: str, num_slices: int, data: int, fsdp: int) -> Mesh:
    """The config's (data, fsdp) mesh over a topology's devices, built as the trainer builds it on a pod
    (`sharding.make_mesh`); with num_slices > 1 the data axis spans the slices (DCN) times the data axis inside a
    slice (ICI)."""
    devices = targets.topology_devices(topology, num_slices)
    per_slice = len(devices) // num_slices
    if fsdp == -1:
        fsdp = per_slice // (data if data > 0 else 1) if data > 0 else per_slice
    if per_slice % fsdp:
        raise ConfigError(f"mesh: fsdp={fsdp} does not divide the {per_slice} chips of a {topology} slice")
    inner = per_slice // fsdp
    if data not in (-1, inner * num_slices):
        raise ConfigError(f"mesh: data={data} x fsdp={fsdp} does not cover {num_slices} x {per_slice} chips")
    return make_mesh(-1, fsdp, devices)


def modelled_seconds(optimal_seconds: float) -> tuple[float, int]:
    """(the compiler's time estimate of the ops it models, the number of ops it does not) from libtpu's
    `optimal_seconds`.

    libtpu adds -1 s for every op its cost model does not cover (measured here: one conv forward + backward gives
    -1 + 0.00056 s, two give -3 + 0.00108 s, three -4 + 0.00173 s, each fractional part growing with the FLOPs;
    the same programs split so that no op is unmodelled come back positive and sum to the fractional part). So
    a negative value is -(unmodelled ops) + (modelled estimate), and the estimate is its fractional part — valid
    while the modelled part is under 1 s, which every per-chip program here is (a loop body counted once).
    The unmodelled ops' own time is not in the estimate."""
    if not np.isfinite(optimal_seconds) or optimal_seconds >= 0:
        return optimal_seconds, 0
    unmodelled = int(np.ceil(-optimal_seconds))
    return optimal_seconds + unmodelled, unmodelled


def cost_of(compiled) -> dict:
    """XLA's cost analysis of a compiled program (per chip): flops, bytes accessed, optimal_seconds (the modelled
    estimate: `modelled_seconds`), unmodelled_ops (how many -1 s sentinels were taken out)."""
    c = compiled.cost_analysis() or {}
    if isinstance(c, (list, tuple)):  # older jax: one dict per computation
        c = c[0] if c else {}
    out = {k: float(c.get(k, float("nan"))) for k in ("flops", "bytes accessed")}
    seconds, unmodelled = modelled_seconds(float(c.get("optimal_seconds", float("nan"))))
    return {**out, "optimal_seconds": seconds, "unmodelled_ops": float(unmodelled)}


def loop_counted(whole: dict, body: dict, n: int) -> dict:
    """The cost of a program whose loop runs n times, from the compiled program (XLA counts the loop body once)
    and the body compiled on its own."""
    return {k: whole[k] + (n - 1) * body[k] for k in whole}


def accumulation_extrapolated(whole: dict, outside: dict, accum: int) -> dict:
    """The cost of a train step whose accumulation loop runs `accum` times, from the compiled step (XLA counts the
    loop body once: whole = outside + body) and the part outside the loop compiled on its own. The step's noise
    draws for the whole batch, also outside the loop, are counted `accum` times: a slight over-estimate."""
    return {k: outside[k] + accum * (whole[k] - outside[k]) for k in whole}


def collectives_extrapolated(whole: dict, outside: dict, accum: int) -> dict:
    """Per-step collectives of a train step whose accumulation loop runs `accum` times, from the compiled step's
    HLO (which holds the loop body once) and the part outside the loop compiled on its own (as
    `accumulation_extrapolated` does for the costs)."""
    return {k: {f: outside[k][f] + accum * max(whole[k][f] - outside[k][f], 0) for f in ("count", "bytes")}
            for k in whole}


def ici_estimate(per_step: dict, chip, group: int, step_s: float) -> dict:
    """A communication estimate, which the compiler's leaves out: the bytes each chip receives per step over the
    inter-chip interconnect, divided by half its bidirectional ICI bandwidth (what can come in), as if every link
    were busy and nothing else ran. Received bytes per collective, from its result size: an all-gather ~ its
    result, a reduce-scatter (group - 1) x its result (group: the FSDP group size, the only scatter in these
    programs), an all-reduce 2 x, a permute or all-to-all 1 x. Then the step's bounds: compute and communication
    fully overlapped (the larger of the two) and not at all (their sum). An estimate, not a measurement."""
    received = (per_step["all-gather"]["bytes"] + (group - 1) * per_step["reduce-scatter"]["bytes"]
                + 2 * per_step["all-reduce"]["bytes"] + per_step["collective-permute"]["bytes"]
                + per_step["all-to-all"]["bytes"])
    out = {"received_bytes_per_chip_per_step": float(received), "ici_bytes_per_s": chip.ici_bytes_per_s}
    if chip.ici_bytes_per_s:
        comm_s = received / (chip.ici_bytes_per_s / 2)
        out.update(ici_s=comm_s, step_s_overlapped=max(step_s, comm_s), step_s_serial=step_s + comm_s)
    return out


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per chip, as a compiled program's memory_analysis() gives them."""

    argument_size_in_bytes: int
    output_size_in_bytes: int
    temp_size_in_bytes: int
    alias_size_in_bytes: int = 0


def staged_memory(stages) -> Memory:
    """Per-chip memory of programs run one after another on the same inputs (the edit's stages, first one first:
    it takes every input): every input, every stage's outputs and the largest stage's temporaries, as if all were
    live at once — an upper bound of the peak."""
    ms = [c.memory_analysis() for c in stages]
    return Memory(ms[0].argument_size_in_bytes, sum(m.output_size_in_bytes for m in ms),
                  max(m.temp_size_in_bytes for m in ms))


def report(compiled, devices, *, program: str, topology: str, num_slices: int, model_flops: float,
           images_per_step: int, compile_s: float, extra: dict | None = None, costs: dict | None = None,
           memory: Memory | None = None, hlo_text: str | None = None) -> dict:
    """The per-chip report of a compiled program (see the module doc). model_flops: of the whole step, all chips.
    costs: XLA's cost figures to use instead of the compiled program's own (e.g. `loop_counted`); memory,
    hlo_text: likewise (a program of several stages: `staged_memory`, their texts together)."""
    devices = targets.devices_of(devices)
    chip, n = targets.chip(devices), len(devices)
    m = memory or compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    cost = costs or cost_of(compiled)
    compiler_s = float(cost.get("optimal_seconds", float("nan")))
    unmodelled = int(cost.get("unmodelled_ops", 0))
    flops_per_chip = model_flops / n
    roofline_s = max(flops_per_chip / chip.peak_bf16_flops,
                     float(cost.get("bytes accessed", 0.0)) / chip.hbm_bytes_per_s)
    # The compiler's estimate leaves out the ops it does not model; below the roofline (a lower bound of the whole
    # program) it has visibly left out real time, and the roofline is the better estimate.
    use_compiler = np.isfinite(compiler_s) and compiler_s >= roofline_s
    step_s = compiler_s if use_compiler else roofline_s
    gib = targets.GIB
    return {
        "program": program, "topology": topology, "num_slices": num_slices, "chips": n, "chip": chip.name,
        "device_kind": devices[0].device_kind,
        "compile_s": round(compile_s, 1),
        "memory_per_chip": {
            "argument_gib": m.argument_size_in_bytes / gib, "output_gib": m.output_size_in_bytes / gib,
            "alias_gib": m.alias_size_in_bytes / gib, "temp_gib": m.temp_size_in_bytes / gib,
            "total_gib": total / gib, "hbm_gib": chip.hbm_bytes / gib, "hbm_fraction": total / chip.hbm_bytes,
            "fits_with_10pct_headroom": total <= 0.9 * chip.hbm_bytes,
        },
        "model_flops_per_step": model_flops, "model_flops_per_chip": flops_per_chip,
        "images_per_step": images_per_step,
        "estimates": {
            "note": "compiler / roofline ESTIMATES for the target chip, not measurements",
            "compiler_optimal_s": compiler_s, "compiler_unmodelled_ops": unmodelled, "roofline_s": roofline_s,
            "step_s": step_s, "step_s_source": "compiler estimate" if use_compiler else "roofline estimate",
            "img_per_s_per_chip": images_per_step / n / step_s,
            "mfu": flops_per_chip / (step_s * chip.peak_bf16_flops),
            "xla_flops_per_chip": float(cost.get("flops", float("nan"))),
            "xla_bytes_accessed_per_chip": float(cost.get("bytes accessed", float("nan"))),
            "caveat": "XLA's cost analysis and the HLO text count a loop body once; model FLOPs count every "
                      "iteration",
        },
        "collectives": collectives(text := hlo_text or compiled.as_text()),
        "hlo_while_loops": len(re.findall(r"\swhile\(", text)),
        **(extra or {}),
    }


def check_fits(r: dict, path) -> None:
    """One-line ConfigError when the program does not fit the chip's HBM with 10 % headroom (the report is written
    first, to `path`)."""
    mem = r["memory_per_chip"]
    if mem["fits_with_10pct_headroom"]:
        return
    over = mem["total_gib"] - 0.9 * mem["hbm_gib"]
    hint = ("lower train.per_device_batch (raising train.accum_steps / keeping train.effective_batch), raise "
            "train.mesh_fsdp, or set train.remat=full" if r["program"] == "train_step" else
            "lower --batch-size or --resolution")
    if r["program"] == "train_step":

        same = [p for p in presets.PRESETS.values() if p.topology == r["topology"]]
        family = same or presets.for_generation(r["topology"].split(":")[0])
        if family:
            hint += "; or use the preset " + " / ".join(
                f"--preset {p.name} ({p.topology}: {p.per_device_batch} images/chip, FSDP {p.mesh_fsdp}, remat "
                f"{p.remat})" for p in family)
    raise ConfigError(f"{r['program']} for {r['topology']} needs {mem['total_gib']:.2f} GiB per chip, "
                      f"{over:.2f} GiB more than 90 % of a {r['chip']} chip's {mem['hbm_gib']:.0f} GiB HBM; "
                      f"{hint} (report: {path})")


def summary(r: dict) -> str:
    """A few printed lines of a report."""
    mem, est = r["memory_per_chip"], r["estimates"]
    coll = ", ".join(f"{k} {v['count']}x {v['bytes'] / 2**20:.0f} MiB" for k, v in r["collectives"].items()
                     if v["count"])
    return "\n".join([
        f"{r['program']} for {r['topology']}" + (f" x {r['num_slices']} slices" if r["num_slices"] > 1 else "")
        + f" ({r['chips']} x {r['device_kind']}), compiled in {r['compile_s']:.0f} s",
        f"  per chip: arguments {mem['argument_gib']:.2f} + temp {mem['temp_gib']:.2f} + output "
        f"{mem['output_gib']:.2f} - aliased {mem['alias_gib']:.2f} = {mem['total_gib']:.2f} GiB of "
        f"{mem['hbm_gib']:.0f} GiB HBM ({100 * mem['hbm_fraction']:.0f} %"
        + ("; fits with >= 10 % headroom)" if mem["fits_with_10pct_headroom"] else "; DOES NOT fit with 10 % headroom)"),
        f"  model FLOPs {r['model_flops_per_step']:.4g} per step ({r['images_per_step']} images)"
        + (f"; estimated {r['estimates']['s_per_edit'] * 1e3:.2f} ms per edit" if "s_per_edit" in r["estimates"] else ""),
        f"  {est['step_s_source']}: {est['step_s'] * 1e3:.1f} ms per step, {est['img_per_s_per_chip']:.2f} img/s "
        f"per chip, MFU {100 * est['mfu']:.1f} % (compiler estimate {est['compiler_optimal_s'] * 1e3:.1f} ms, "
        f"roofline estimate {est['roofline_s'] * 1e3:.1f} ms; estimates, not measurements)"
        + (f"\n  the compiler's cost model left out {est['compiler_unmodelled_ops']} ops (libtpu counts each as -1 s; "
           "their time is not in its estimate)" if est.get("compiler_unmodelled_ops") else ""),
        f"  collectives: {coll or 'none'}",
    ] + ([_communication_line(r)] if "communication" in est else [])
      + ([_memory_space_line(est["memory_space_roofline"])] if "memory_space_roofline" in est else [])
      + ([_stages_line(r["stages"])] if "stages" in r else []))


def _memory_space_line(m: dict) -> str:
    return (f"  DDIM loop body: {m['loop_body_bytes'] / 1e9:.2f} GB, of which {m['hbm_side_bytes'] / 1e9:.2f} GB "
            f"touch HBM ({100 * (1 - m['vmem_fraction']):.0f} %; the rest is VMEM-resident); memory-space-aware "
            f"roofline (ours, a lower bound): {m['step_s'] * 1e3:.2f} ms per step ({m['bound']}-bound), {m['s_per_edit'] * 1e3:.1f} ms "
            "per edit with prepare and finish at the compiler's estimate (estimates, not measurements)")


def _stages_line(stages: dict) -> str:
    return "  stages: " + "; ".join(
        f"{name} compiled in {s['compile_s']:.0f} s, temp {s['temp_gib']:.2f} GiB, XLA {s['xla_flops'] / 1e12:.3g} "
        f"TFLOP / {s['xla_bytes_accessed'] / 1e9:.3g} GB" for name, s in stages.items()) + " (loop bodies once)"


def _communication_line(r: dict) -> str:
    c, per_step = r["estimates"]["communication"], r.get("collectives_per_step", {})
    kinds = ", ".join(f"{k} {v['bytes'] / 1e9:.2f} GB" for k, v in per_step.items() if v["count"])
    line = (f"  per step, loop counted: {kinds or 'no collectives'}; received per chip "
            f"{c['received_bytes_per_chip_per_step'] / 1e9:.2f} GB")
    if "ici_s" not in c:
        return line + " (no ICI bandwidth known for this chip: communication not priced)"
    return (line + f" = {c['ici_s'] * 1e3:.1f} ms at half the {c['ici_bytes_per_s'] / 1e9:.0f} GB/s bidirectional "
            f"ICI; step {c['step_s_overlapped'] * 1e3:.1f} ms if overlapped with compute (MFU "
            f"{100 * c['mfu_overlapped']:.1f} %), {c['step_s_serial'] * 1e3:.1f} ms if not (MFU "
            f"{100 * c['mfu_serial']:.1f} %) (estimates)")


def write(r: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r, indent=1, default=float) + "\n")
    return path


# ------------------------------------------------------------------------------------------- the train step


def compile_train_step(config, topology: str, num_slices: int = 1) -> dict:
    """AOT-compile the config's UNet train step for a TPU topology; returns the report."""
    if config.stage != "unet":
        raise ConfigError(f"--compile-only compiles the UNet stage's step (stage=unet), not stage={config.stage!r}")
    mesh = target_mesh(topology, num_slices, config.train.mesh_data, config.train.mesh_fsdp)
    built = stages.for_config(config).build(config, mesh, abstract=True)  # the stage a TPU host would train
    optimizer = loop.optimizer_for(config)
    abstract_state = jax.eval_shape(lambda p: init_train_state(p, optimizer, 0), built.trainable)
    accum, micro = loop.batch_layout(config, mesh)
    t0 = time.perf_counter()
    step = loop.compile_step(config, mesh, built.objective, optimizer, abstract_state, built.frozen, built.example,
                             accum, micro)
    compile_s = time.perf_counter() - t0
    t = config.train
    outside = _compile_apply_gradients(step, abstract_state, optimizer, t.ema_decay, accum, mesh)
    unet = built.objective.unet
    out = report(step.fn, mesh, program="train_step", topology=topology, num_slices=num_slices,
                 model_flops=step.flops_per_step, images_per_step=accum * micro, compile_s=compile_s,
                 costs=accumulation_extrapolated(cost_of(step.fn), cost_of(outside), accum),
                 extra={"mesh": dict(mesh.shape), "per_chip_batch": t.per_device_batch, "accum_steps": accum,
                        "effective_batch": accum * micro, "resolution": config.data.resolution,
                        "remat": remat_policy(t.remat), "compute_dtype": jnp.dtype(unet.dtype).name,
                        "attention": unet.attention, "gather_params": t.get("gather_params", "per_use"),
                        "latent_cache": bool(config.data.get("latent_cache"))})
    out["estimates"]["cost_source"] = (f"the step with its accumulation loop counted {accum} times: the part "
                                       "outside the loop (optimizer, EMA) compiled on its own")
    per_step = collectives_extrapolated(out["collectives"], collectives(outside.as_text()), accum)
    out["collectives_per_step"] = per_step
    chip = targets.chip(mesh)
    comm = ici_estimate(per_step, chip, mesh.shape["fsdp"], out["estimates"]["step_s"])
    for bound in ("overlapped", "serial"):
        if f"step_s_{bound}" in comm:
            comm[f"mfu_{bound}"] = out["model_flops_per_chip"] / (comm[f"step_s_{bound}"] * chip.peak_bf16_flops)
    out["estimates"]["communication"] = comm
    return out


def compile_only(config, workdir: str | None, topology: str, num_slices: int = 1, *, config_path=None) -> dict:
    """train.py --compile-only: AOT-compile the UNet stage's train step for a TPU topology, print the report
    and write it to WORKDIR/compile_only/train_step_<topology>[_x<slices>].json; ConfigError when it does not fit
    the chip's HBM with 10 % headroom."""
    if workdir is None:
        workdir = os.path.join("runs", Path(config_path).stem if config_path else "run")
    unet_config = stage_config(config, "unet") if config.stage == "all" else config
    target = topology
    topology, num_slices, preset = presets.resolve_target(target, num_slices)
    if preset is not None:
        unet_config = presets.apply(unet_config, preset)
    r = compile_train_step(unet_config, topology, num_slices)
    if preset is not None:
        r["preset"] = preset.name
    name = target.replace(":", "_") + (f"_x{num_slices}" if num_slices > 1 else "")
    path = write(r, Path(workdir) / "compile_only" / f"train_step_{name}.json")
    print(summary(r))
    print(f"wrote {path}")
    check_fits(r, path)
    return r


def _compile_apply_gradients(step, abstract_state, optimizer, ema_decay: float, accum: int, mesh):
    """The train step's part outside the accumulation loop (`step.apply_gradients`), compiled with the step's
    state shardings; with train.gather_params=once it also makes the step's gathered copy of the parameters
    (returned, so that it is not dead code), which happens once per step too."""
    def outside(state, grads_sum, loss_sum):
        updated = apply_gradients(state, grads_sum, loss_sum, accum, jax.random.wrap_key_data(state.rng), optimizer,
                                  ema_decay)
        return updated if step.gather_once is None else (updated, step.gather_once.copy(state.params))

    st_sh, rep = step.state_shardings, replicated(mesh)
    out_sh = (st_sh, rep) if step.gather_once is None else ((st_sh, rep), rep)
    fn = jax.jit(outside, in_shardings=(st_sh, st_sh.params, rep), out_shardings=out_sh, donate_argnums=(0,))
    return fn.lower(ckpt.abstract_like(abstract_state, st_sh), ckpt.abstract_like(abstract_state.params, st_sh.params),
                    jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)).compile()


# ------------------------------------------------------------------------------------------- the edit program

SD15 = "sd15"  # --model sd15: the SD1.5 IP2P architecture (x2x_jax/models/architectures.py), no weights needed


def edit_model_configs(model: str) -> tuple[dict, dict]:
    """({component: config dict}, scheduler config) of a model directory's config.json files, or of SD1.5."""
    if model == SD15:
        return {"unet": sd15_ip2p_unet(), "vae": sd_vae(), "text_encoder": clip_vit_l14_text()}, scheduler_config()
    root = resolve_model_dir(model)
    configs = {c: read_json(root / c / "config.json", f"{c} config") for c in ("unet", "vae", "text_encoder")}
    sched = root / "scheduler" / "scheduler_config.json"
    return configs, {**scheduler_config(), **(read_json(sched, "scheduler config") if sched.is_file() else {})}


@dataclasses.dataclass(frozen=True)
class AbstractEdit:
    """The edit program's model and abstract inputs for a topology, as the Editor would load them there."""
    model: EditModel
    mesh: Mesh
    args: tuple  # (params, images, input_ids, empty_ids, priors, seeds, edit): ShapeDtypeStructs with shardings
    resolution: int
    dtype: object
    attention: str


def abstract_edit(model: str, topology: str, *, resolution: int | None, batch: int) -> AbstractEdit:
    """The RSE edit's modules (compute dtype and attention from the target) and abstract inputs for a TPU topology.
    The batch is split over the topology's chips when it divides evenly, else every chip runs the whole batch."""
    configs, sched = edit_model_configs(model)
    devices = targets.topology_devices(topology)
    mesh = Mesh(np.asarray(devices), ("data",))
    dtype, attention = targets.default_compute_dtype(mesh), targets.default_attention(mesh)
    modules = {c: model_from_config(c, cfg).clone(dtype=dtype) for c, cfg in configs.items()}
    modules["unet"] = modules["unet"].clone(attention=attention)
    vae = modules["vae"]
    r = int(resolution or configs["vae"].get("sample_size") or 512)
    multiple = latent_factor(vae) * 2 ** (len(modules["unet"].block_out_channels) - 1)
    if r % multiple:
        raise ConfigError(f"--resolution {r} must be a multiple of {multiple} for this model")
    # as the Editor loads them: kernels in the compute dtype (cast once at load, not in every DDIM step)
    params = jax.eval_shape(lambda p: kernels_in_compute_dtype(p, dtype),
                            {c: abstract_params(c, m) for c, m in modules.items()})
    edit_model = EditModel(modules["unet"], vae, modules["text_encoder"], noise_schedule(sched), sched)
    text_len = modules["text_encoder"].max_position_embeddings
    rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data") if batch % len(devices) == 0 else P())

    def arg(shape, dt, sharding=rep):
        return jax.ShapeDtypeStruct(shape, dt, sharding=sharding)

    args = (jax.tree.map(lambda x: arg(x.shape, x.dtype), params), arg((batch, r, r), jnp.float32, split),
            arg((batch, text_len), jnp.int32, split), arg((text_len,), jnp.int32), arg((batch, r, r), jnp.float32, split),
            arg((batch,), jnp.uint32, split), jax.tree.map(lambda x: arg((), x.dtype), EditParams().traced()))
    return AbstractEdit(edit_model, mesh, args, r, dtype, attention)


def compile_edit_program(model: str, topology: str, *, resolution: int | None, batch: int, steps: int,
                         relevance_draws: int = 1) -> dict:
    """AOT-compile the RSE edit program (relevance-map guidance) for a TPU topology; returns the report
    (`abstract_edit`: what it is compiled for)."""
    a = abstract_edit(model, topology, resolution=resolution, batch=batch)
    mesh, args, r, dtype, attention = a.mesh, a.args, a.resolution, a.dtype, a.attention
    program = compile_edit(a.model, steps, relevance_draws)
    with jax.set_mesh(mesh):  # the Pallas attention kernels run per device in a shard_map over the context mesh
        compiled = program.lower(*args).compile()
        flops = count_flops(program, *args)
    stages = [compiled.stages[name] for name in STAGES]
    # XLA counts the DDIM loop's body once: the denoise stage is that loop alone, so it is counted `steps` times
    # (its few ops outside the loop too: a slight over-estimate).
    costs = [cost_of(c) for c in stages]
    cost = {k: costs[0][k] + steps * costs[1][k] + costs[2][k] for k in costs[0]}
    out = report(stages[0], mesh, program="edit", topology=topology, num_slices=1, model_flops=flops,
                 images_per_step=batch, compile_s=sum(compiled.compile_seconds.values()), costs=cost,
                 memory=staged_memory(stages), hlo_text="\n".join(c.as_text() for c in stages),
                 extra={"model": model, "resolution": r, "batch": batch, "steps": steps,
                        "relevance_draws": relevance_draws, "compute_dtype": jnp.dtype(dtype).name,
                        "attention": attention, "stages": _stage_reports(stages, compiled.compile_seconds)})
    out["memory_per_chip"]["note"] = ("the edit runs as three programs (rse.EditProgram): every input, every "
                                      "stage's outputs and the largest stage's temporaries, an upper bound of the peak")
    out["estimates"]["cost_source"] = (f"prepare + {steps} x denoise (the stage holding the DDIM loop, whose body "
                                       "XLA counts once) + finish")
    out["estimates"]["s_per_edit"] = out["estimates"]["step_s"] / batch
    loop = memory_space_roofline(loop_body_traffic(stages[1].as_text()), costs[1]["flops"], targets.chip(mesh))
    outside_s = costs[0]["optimal_seconds"] + costs[2]["optimal_seconds"]
    out["estimates"]["memory_space_roofline"] = {
        **loop, "note": "ours, a lower bound and an ESTIMATE: one DDIM step's FLOPs at peak vs the bytes of its loop "
                        "body that touch HBM (not VMEM-resident) at HBM bandwidth; s_per_edit adds prepare and "
                        "finish at the compiler's estimate",
        "s_per_edit": (steps * loop["step_s"] + outside_s) / batch}
    return out


def _stage_reports(stages, seconds: dict) -> dict:
    gib = targets.GIB
    out = {}
    for name, c in zip(STAGES, stages):
        m, cost = c.memory_analysis(), cost_of(c)
        out[name] = {"compile_s": round(seconds[name], 1), "argument_gib": m.argument_size_in_bytes / gib,
                     "output_gib": m.output_size_in_bytes / gib, "temp_gib": m.temp_size_in_bytes / gib,
                     "xla_flops": cost["flops"], "xla_bytes_accessed": cost["bytes accessed"],
                     "compiler_optimal_s": cost["optimal_seconds"], "compiler_unmodelled_ops": cost["unmodelled_ops"]}
    return out
