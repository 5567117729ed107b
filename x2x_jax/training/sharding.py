"""Device mesh and sharding rules: data parallel x FSDP.

Mesh axes ("data", "fsdp"). The global batch is split over both axes. Parameters, optimizer state and EMA are
either replicated or fully sharded (FSDP): each large tensor is split over "fsdp" along its largest dimension
that divides evenly, so per-device bytes are ~1/fsdp of the total.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from x2x_jax.errors import ConfigError

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A (data, fsdp) mesh over all (or the given) devices; -1 means 'whatever is left'.

    Devices of several TPU slices (multi-slice: they carry distinct `slice_index`es) get a hybrid mesh: each FSDP
    group inside one slice (ICI), the data axis across slices (DCN) times the groups of a slice. The AOT compile
    (x2x_jax.aot.target_mesh) builds its mesh here too, so it compiles the program a pod would run.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ConfigError("mesh: at most one of mesh.data / mesh.fsdp may be -1")
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data * fsdp != n:
        raise ConfigError(f"mesh: data={data} x fsdp={fsdp} != {n} devices")
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices == 1:
        return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)
    if (n // slices) % fsdp:
        raise ConfigError(f"mesh: fsdp={fsdp} does not divide the {n // slices} devices of each of {slices} slices")
    # allow_split_physical_axes: an 8-chip FSDP group inside a 16x16 slice spans part of one torus axis
    grid = mesh_utils.create_hybrid_device_mesh((data // slices, fsdp), (slices, 1), devices,
                                                allow_split_physical_axes=True)
    return Mesh(grid, BATCH_AXES)


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
    """Shard the largest evenly divisible dimension over "fsdp"; small or indivisible tensors stay replicated."""
    if fsdp_size == 1 or math.prod(shape) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_tree, mesh: Mesh, mode: str = "fsdp", min_size: int = 2**14):
    """NamedShardings for a pytree of arrays / ShapeDtypeStructs (params, optimizer state, EMA alike)."""
    if mode not in ("fsdp", "replicated"):
        raise ConfigError(f"train.param_sharding must be 'fsdp' or 'replicated', got {mode!r}")
    fsdp_size = mesh.shape["fsdp"] if mode == "fsdp" else 1
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp_size, min_size)),
                        abstract_tree)


def batch_sharding(mesh: Mesh, batch_dim: int = 1) -> NamedSharding:
    """Batches are (accum, micro_batch, ...): the micro-batch dimension is split over every mesh axis."""
    spec = [None] * batch_dim + [BATCH_AXES]
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch_from_process_local(local_batch: dict, mesh: Mesh) -> dict:
    """Each process passes its own slice of the global batch (multi-host); returns global sharded arrays."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
