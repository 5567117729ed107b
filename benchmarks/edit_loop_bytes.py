"""Where the bytes of one DDIM step of the edit go, on a TPU chip: the compiled denoise stage's loop body, read.

  python benchmarks/edit_loop_bytes.py [--model sd15 --topology v6e:1 --resolution 512 --batch-size 1]
  python benchmarks/edit_loop_bytes.py --hlo FILE      # read an HLO text saved with --hlo-out, compile nothing

Compiles only the edit's denoise stage (rse.denoise_stage: the loop of DDIM steps) for one abstract TPU chip on
this CPU host (needs libtpu: `pip install -e '.[tpu]'`; SD1.5 at 512 px takes ~10-20 min and ~7.5 GB here), prints
XLA's cost analysis per step (bytes accessed, FLOPs, libtpu's estimate), then accounts the loop body's bytes from
the HLO text: each instruction's result plus its operands, tile-padded as laid out; an asynchronous move
(slice-start, copy-start: HBM <-> VMEM) counts its moved bytes once. Grouped by instruction kind, by model part
(the op_name path); and the part that touches HBM (moves, arrays not placed in VMEM), with a roofline of it. An accounting of XLA's counting,
not a measurement of a TPU; it sums close to XLA's own figure (about 5 % under for SD1.5).
"""

import argparse
import collections
import functools
import math
import os
import re
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from x2x_jax import aot  # noqa: E402

SHAPE = re.compile(r"\b(" + "|".join(aot.DTYPE_BYTES) + r")\[([\d,]*)\](?:\{([^}]*)\})?")  # with its layout
INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
NO_TRAFFIC = {"get-tuple-element", "tuple", "parameter", "constant", "bitcast", "after-all", "copy-done",
              "slice-done", "partition-id", "replica-id"}
ASYNC_MOVES = {"slice-start", "copy-start"}


def array_bytes(m: re.Match) -> int:
    """Bytes of one printed array type, its two minor-most dims padded to the layout's tile (e.g. T(8,128))."""
    dims = [int(x) for x in m.group(2).split(",")] if m.group(2) else []
    layout = (m.group(3) or "").split(":")
    order = [int(x) for x in layout[0].split(",") if x] if layout[0] else []
    tile = re.search(r"T\((\d+)(?:,(\d+))?\)", layout[1]) if len(layout) > 1 else None
    if tile and order:
        sizes = [int(t) for t in tile.groups() if t]
        for axis, t in zip(order, reversed(sizes)):  # the last tile size goes with the most minor dim
            dims[axis] = -(-dims[axis] // t) * t
    return (math.prod(dims) if dims else 1) * aot.DTYPE_BYTES[m.group(1)]


def type_bytes(text: str, vmem_only: bool = False) -> int:
    """Bytes of the arrays printed in `text` (with vmem_only: of those laid out in memory space 1, VMEM)."""
    return sum(array_bytes(m) for m in SHAPE.finditer(text) if not vmem_only or "S(1)" in (m.group(3) or ""))


def loop_body_rows(hlo: str) -> tuple[str, list[dict]]:
    """The largest while body's instructions with their bytes (all, and HBM side), kind and model part."""
    comps = aot.hlo_computations(hlo)
    bodies = re.findall(r"body=%?([\w.\-]+)", hlo)
    if not bodies:
        raise SystemExit("error: no while loop in this HLO text")
    body = max(bodies, key=lambda b: len(comps.get(b, [])))
    parsed = [m.groups() for m in map(INSTRUCTION.match, comps[body]) if m]
    types = {name: result for name, result, _, _ in parsed}
    rows = []
    for name, result, op, rest in parsed:
        if op in NO_TRAFFIC:
            continue
        if op in ASYNC_MOVES:  # ((source), destination, context): the destination's bytes are what moves
            moved = list(SHAPE.finditer(result))
            nbytes = hbm = array_bytes(moved[1]) if len(moved) > 1 else 0  # one side of every move is HBM
        else:
            depth, i = 1, 0
            while i < len(rest) and depth:
                depth += {"(": 1, ")": -1}.get(rest[i], 0)
                i += 1
            operands = re.findall(r"%([\w.\-]+)", rest[:i])
            nbytes = type_bytes(result) + sum(type_bytes(types.get(o, "")) for o in operands)
            hbm = nbytes - type_bytes(result, True) - sum(type_bytes(types.get(o, ""), True) for o in operands)
        kind = op
        if op in ("fusion", "custom-call"):
            k = re.search(r'kind=(\w+)|custom_call_target="([^"]+)"', rest)
            kind = f"{op}:{(k.group(1) or k.group(2)) if k else '?'}"
        meta = re.search(r'op_name="([^"]+)"', rest)
        path = [p for p in (meta.group(1).split("/") if meta else [])
                if p and not p.startswith("jit(") and p not in ("while", "body", "closed_call", "UNet2DConditionModel")]
        part = re.sub(r"_\d+", "", "/".join(path[-2:])) if path else f"({kind})"
        rows.append({"bytes": nbytes, "hbm": hbm, "kind": kind, "part": part})
    return body, rows


def print_breakdown(rows: list[dict], top: int, cost: dict | None = None, chip=None) -> None:
    total, hbm = sum(r["bytes"] for r in rows), sum(r["hbm"] for r in rows)
    print(f"loop body: {len(rows)} instructions, {total / 1e9:.2f} GB accounted; HBM side {hbm / 1e9:.2f} GB "
          f"({100 * hbm / total:.0f} %: moves between HBM and VMEM, and arrays left in HBM), the rest reads and "
          "writes of arrays the compiler placed in VMEM (S(1))")
    if cost and chip:
        flop_s, hbm_s = cost["flops"] / chip.peak_bf16_flops, hbm / chip.hbm_bytes_per_s
        print(f"memory-space-aware roofline per step (ours, an ESTIMATE, not libtpu's): FLOPs at peak "
              f"{1e3 * flop_s:.2f} ms, HBM-side bytes at HBM bandwidth {1e3 * hbm_s:.2f} ms -> "
              f"{1e3 * max(flop_s, hbm_s):.2f} ms; all {cost['bytes accessed'] / 1e9:.2f} GB XLA counts at HBM "
              f"bandwidth: {1e3 * cost['bytes accessed'] / chip.hbm_bytes_per_s:.2f} ms")
    for key in ("kind", "part"):
        sums, counts = collections.Counter(), collections.Counter()
        for r in rows:
            sums[r[key]] += r["bytes"]
            counts[r[key]] += 1
        print(f"by {key}:")
        for k, v in sums.most_common(top):
            print(f"  {v / 1e9:7.2f} GB {100 * v / total:5.1f} %  n={counts[k]:5d}  {k}")


def compile_denoise(model: str, topology: str, resolution: int, batch: int) -> str:
    import jax

    from x2x_jax import targets
    from x2x_jax.editing import rse

    a = aot.abstract_edit(model, topology, resolution=resolution, batch=batch)
    if a.mesh.devices.size != 1:
        raise SystemExit(f"error: --topology {topology}: one chip only (e.g. v6e:1), the breakdown is per chip")
    params, images, ids, empty, priors, seeds, edit = a.args
    steps = 10  # XLA counts the loop body once, whatever the number of steps
    with jax.set_mesh(a.mesh):
        prepared = jax.eval_shape(functools.partial(rse.prepare_stage, a.model, num_steps=steps), params, images, ids,
                                  empty, priors, seeds, edit)
        sharding = images.sharding
        prepared = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), prepared)
        t0 = time.perf_counter()
        compiled = jax.jit(functools.partial(rse.denoise_stage, a.model, num_steps=steps)).lower(
            params["unet"], prepared, edit).compile()
    cost = aot.cost_of(compiled)
    print(f"denoise stage, {model}, {topology}, {a.resolution} px, batch {batch}, {a.attention} attention, compiled "
          f"in {time.perf_counter() - t0:.0f} s; per DDIM step (XLA cost analysis, compiler ESTIMATES): "
          f"{cost['bytes accessed'] / 1e9:.2f} GB accessed, {cost['flops'] / 1e12:.3f} TFLOP, libtpu estimate "
          f"{1e3 * cost['optimal_seconds']:.1f} ms ({cost['unmodelled_ops']:.0f} ops it does not model)", flush=True)
    return compiled.as_text(), cost, targets.chip(a.mesh)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="sd15", help="sd15 (the architecture, no weights) or a model directory")
    p.add_argument("--topology", default="v6e:1")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--hlo", default=None, help="an HLO text to read instead of compiling")
    p.add_argument("--hlo-out", default=None, help="write the compiled denoise stage's HLO text here")
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args(argv)
    cost = chip = None
    if a.hlo:
        hlo = open(a.hlo).read()
    else:
        hlo, cost, chip = compile_denoise(a.model, a.topology, a.resolution, a.batch_size)
        if a.hlo_out:
            with open(a.hlo_out, "w") as f:
                f.write(hlo)
    _, rows = loop_body_rows(hlo)
    print_breakdown(rows, a.top, cost, chip)
    return 0


if __name__ == "__main__":
    sys.exit(main())
