"""Model FLOPs of a JAX program, counted from its jaxpr: for MFU figures that loops cannot hide.

XLA's cost analysis (`compiled.cost_analysis()["flops"]`) counts a while loop's body once, not once per iteration,
so it misses most of whatever runs in a `lax.scan` / `lax.map` / `fori_loop`: the query blocks of our attention,
the 100 denoising steps of an edit, scanned gradient accumulation. Here every `dot_general` and convolution counts
2 FLOPs per multiply-add, times the trip count of each scan around it and the grid size of each Pallas kernel
around it (the TPU splash attention, which XLA's cost analysis cannot see into at all); elementwise work is not
counted (the usual convention for MFU). A `while_loop` with a data-dependent trip count is counted once (our
programs have none: static-bound `fori_loop`s trace to scans).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax.extend import core as jcore


def count_flops(fn: Callable, *args: Any, **kwargs: Any) -> float:
    """Matmul + convolution FLOPs of `fn(*args, **kwargs)`; args may be arrays or jax.ShapeDtypeStruct."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def jaxpr_flops(jaxpr: jcore.Jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr)
        elif name == "cond":  # one branch runs
            total += max(jaxpr_flops(branch.jaxpr) for branch in eqn.params["branches"])
        elif name == "pallas_call":  # a kernel (the TPU splash attention): its body runs once per grid point
            total += math.prod(eqn.params["grid_mapping"].grid) * jaxpr_flops(eqn.params["jaxpr"])
        else:  # jit, custom_jvp/vjp calls, remat, shard_map, while (once): whatever sub-programs they hold
            total += sum(jaxpr_flops(sub) for sub in _sub_jaxprs(eqn.params))
    return total


def _sub_jaxprs(params: dict):
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jcore.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jcore.Jaxpr):
                yield item


def _dot_flops(eqn) -> float:
    (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    rhs_free = math.prod(d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch)
    return 2.0 * math.prod(lhs) * rhs_free  # lhs = batch x free x contracted


def _conv_flops(eqn) -> float:
    out = eqn.outvars[0].aval.shape
    rhs = eqn.invars[1].aval.shape
    rhs_out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
    return 2.0 * math.prod(out) * math.prod(rhs) / rhs_out_features  # each output: in-features/group x window
