"""Where the bytes of one DDIM step of the edit go, on a TPU chip: the compiled denoise stage's loop body, read.

  python benchmarks/edit_loop_bytes.py [--model sd15 --topology v6e:1 --resolution 512 --batch-size 1]
  python benchmarks/edit_loop_bytes.py --hlo FILE      # read an HLO text saved with --hlo-out, compile nothing

Compiles only the edit's denoise stage (rse.denoise_stage: the loop of DDIM steps) for one abstract TPU chip on
this CPU host (needs libtpu: `pip install -e '.[tpu]'`; SD1.5 at 512 px takes ~10-20 min and ~7.5 GB here), prints
XLA's cost analysis per step (bytes accessed, FLOPs, libtpu's estimate), then accounts the loop body's bytes from
the HLO text (aot.loop_body_traffic: each instruction's result plus its operands, tile-padded as laid out; an
asynchronous move, HBM <-> VMEM, counts its moved bytes once), grouped by instruction kind and by model part (the
op_name path), and the part that touches HBM with our roofline of it (aot.memory_space_roofline, which
`edit.py --compile-only` reports too). An accounting of XLA's counting, not a measurement of a TPU; it sums close
to XLA's own figure (about 5 % under for SD1.5).
"""

import argparse
import collections
import functools
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from x2x_jax import aot  # noqa: E402


def print_breakdown(rows: list[dict], top: int, roofline: dict | None = None, xla_bytes: float | None = None,
                    chip=None) -> None:
    total, hbm = sum(r["bytes"] for r in rows), sum(r["hbm"] for r in rows)
    print(f"loop body: {len(rows)} instructions, {total / 1e9:.2f} GB accounted; HBM side {hbm / 1e9:.2f} GB "
          f"({100 * hbm / total:.0f} %: moves between HBM and VMEM, and arrays left in HBM), the rest reads and "
          "writes of arrays the compiler placed in VMEM (S(1))")
    if roofline:
        print(f"memory-space-aware roofline per step (ours, an ESTIMATE, not libtpu's): FLOPs at peak "
              f"{1e3 * roofline['flops_s']:.2f} ms, HBM-side bytes at HBM bandwidth {1e3 * roofline['hbm_s']:.2f} ms "
              f"-> {1e3 * roofline['step_s']:.2f} ms; all {xla_bytes / 1e9:.2f} GB XLA counts at HBM bandwidth: "
              f"{1e3 * xla_bytes / chip.hbm_bytes_per_s:.2f} ms")
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
    roofline = cost = chip = None
    if a.hlo:
        hlo = open(a.hlo).read()
    else:
        hlo, cost, chip = compile_denoise(a.model, a.topology, a.resolution, a.batch_size)
        if a.hlo_out:
            with open(a.hlo_out, "w") as f:
                f.write(hlo)
    rows = aot.loop_body_traffic(hlo)
    if cost:
        roofline = aot.memory_space_roofline(rows, cost["flops"], chip)
    print_breakdown(rows, a.top, roofline, cost and cost["bytes accessed"], chip)
    return 0


if __name__ == "__main__":
    sys.exit(main())
