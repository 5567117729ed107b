"""Orbax checkpoints of the whole train state plus the data iterator state.

A checkpoint holds params, optimizer state, EMA, step and RNG (one pytree, saved asynchronously) and the input
pipeline's iterator state (JSON), so a resumed run continues bit-for-bit. Restoring takes a target tree of
ShapeDtypeStructs carrying the *new* shardings, which is what lets an 8-device checkpoint restore on 1 device.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

STATE = "state"
DATA = "data"


def make_manager(directory: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=(STATE, DATA))


def save(manager: ocp.CheckpointManager, step: int, state, data_state: dict | None, force: bool = False) -> bool:
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                 DATA: ocp.args.JsonSave(data_state or {})})
    return manager.save(step, args=args, force=force)


def abstract_like(tree, shardings):
    """ShapeDtypeStructs with the given shardings: the restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore_latest(manager: ocp.CheckpointManager, abstract_state):
    """-> (step, state, data_state) of the newest checkpoint, or None when there is none."""
    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state),
                                                                 DATA: ocp.args.JsonRestore()}))
    return step, restored[STATE], dict(restored[DATA] or {})
