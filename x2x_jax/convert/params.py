"""The one rename/transpose table between our Flax param trees and PyTorch state dicts, plus state-dict file I/O.

Our param paths mirror the PyTorch module names (see DESIGN.md), so the table is derived from the Flax tree alone:

    flax:  down_blocks_0/attentions_1/transformer_blocks_0/attn1/to_out_0/kernel
    torch: down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0.weight

* a path segment `<name>_<i>` is the torch list index `<name>.<i>` when `<name>` is one of the list containers in
  `LIST_CONTAINERS` (so `time_embedding/linear_1` stays `linear_1`);
* leaves: `kernel` -> `weight` (4-D: HWIO <-> OIHW, 2-D: (in, out) <-> (out, in)), `scale` -> `weight`,
  `embedding` -> `weight`, `bias` -> `bias`; anything else keeps its name, untransposed.

Both directions only transpose; dtypes are kept unless a `dtype` is asked for. Every state dict in this package is
`dict[str, np.ndarray]` with torch key names and torch layouts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from x2x_jax.errors import WeightsError

# Module names that are `nn.ModuleList`/`nn.Sequential` in diffusers / transformers (indices follow them).
LIST_CONTAINERS = frozenset(
    {
        "down_blocks",
        "up_blocks",
        "resnets",
        "attentions",
        "downsamplers",
        "upsamplers",
        "transformer_blocks",
        "to_out",
        "net",  # FeedForward.net
        "layers",  # CLIPEncoder.layers
    }
)

# Buffers that torch state dicts may carry but that are not parameters of ours.
IGNORED_TORCH_KEYS = re.compile(r"(^|\.)position_ids$")

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_INDEXED = re.compile(r"^(?P<name>.+)_(?P<index>\d+)$")


@dataclass(frozen=True)
class Entry:
    """One parameter: where it lives in the Flax tree, its torch key, and how the layouts differ."""

    flax_path: tuple[str, ...]
    torch_key: str
    transform: str  # "conv" (HWIO <-> OIHW), "linear" ((in,out) <-> (out,in)) or "none"
    flax_shape: tuple[int, ...]

    @property
    def torch_shape(self) -> tuple[int, ...]:
        axes = _TO_TORCH_AXES.get(self.transform, range(len(self.flax_shape)))
        return tuple(self.flax_shape[i] for i in axes)


_TO_TORCH_AXES = {"conv": (3, 2, 0, 1), "linear": (1, 0)}  # HWIO -> OIHW, (in, out) -> (out, in)
_TO_FLAX_AXES = {"conv": (2, 3, 1, 0), "linear": (1, 0)}


def torch_key(flax_path: Iterable[str]) -> str:
    """The torch state-dict key of a Flax param path (a tuple of names, leaf last)."""
    *modules, leaf = flax_path
    parts = []
    for seg in modules:
        m = _INDEXED.match(seg)
        if m and m["name"] in LIST_CONTAINERS:
            parts += [m["name"], m["index"]]
        else:
            parts.append(seg)
    parts.append(_LEAF_TO_TORCH.get(leaf, leaf))
    return ".".join(parts)


def _transform(flax_path: tuple[str, ...], ndim: int) -> str:
    if flax_path[-1] != "kernel":
        return "none"
    if ndim == 4:
        return "conv"
    if ndim == 2:
        return "linear"
    raise ValueError(f"{'/'.join(flax_path)}: a {ndim}-D kernel has no torch layout rule")


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Nested mapping -> {path tuple: leaf}."""
    flat = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(flatten(v, prefix + (k,)))
        else:
            flat[prefix + (k,)] = v
    return flat


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return tree


def _unwrap(tree: Mapping[str, Any]) -> tuple[Mapping[str, Any], bool]:
    """Accept both `model.init(...)` output ({"params": tree}) and the bare param tree."""
    if set(tree) == {"params"} and isinstance(tree["params"], Mapping):
        return tree["params"], True
    return tree, False


def build_table(template: Mapping[str, Any]) -> list[Entry]:
    """The table for a Flax param tree (arrays or `jax.ShapeDtypeStruct`s), sorted by torch key."""
    params, _ = _unwrap(template)
    table = []
    for path, leaf in flatten(params).items():
        shape = tuple(int(d) for d in leaf.shape)
        table.append(Entry(path, torch_key(path), _transform(path, len(shape)), shape))
    keys = [e.torch_key for e in table]
    if len(set(keys)) != len(keys):  # a bug in a module's naming, not a user error
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"Flax paths collide on torch keys: {dup[:5]}")
    return sorted(table, key=lambda e: e.torch_key)


def _fmt_keys(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else f" ({len(keys)} in all)")


def check_finite(name: str, key: str, array: np.ndarray) -> None:
    # kind "V" covers ml_dtypes' bfloat16 / float8, which numpy does not count as floating.
    if array.dtype.kind in "fcV" and not np.isfinite(array).all():
        raise WeightsError(f"{name}: {key} contains NaN or inf values")


def torch_state_to_flax(
    state: Mapping[str, np.ndarray], template: Mapping[str, Any], *, name: str = "model", dtype: Any = None
) -> dict[str, Any]:
    """A torch-layout state dict -> a Flax param tree shaped like `template` (same wrapping as the template).

    Raises WeightsError (naming `name`, e.g. "unet") on missing, unexpected, mis-shaped or non-finite tensors.
    Values come back as contiguous numpy arrays with the state's dtype, or `dtype` when given.
    """
    table = build_table(template)
    given = {k for k in state if not IGNORED_TORCH_KEYS.search(k)}
    wanted = {e.torch_key for e in table}
    missing = sorted(wanted - given)
    if missing:
        raise WeightsError(f"{name}: missing tensors {_fmt_keys(missing)}")
    unexpected = sorted(given - wanted)
    if unexpected:
        raise WeightsError(f"{name}: unexpected tensors {_fmt_keys(unexpected)}")
    flat = {}
    for e in table:
        array = np.asarray(state[e.torch_key])
        if array.shape != e.torch_shape:
            raise WeightsError(f"{name}: {e.torch_key} expected {e.torch_shape}, found {tuple(array.shape)}")
        check_finite(name, e.torch_key, array)
        if e.transform != "none":
            array = array.transpose(_TO_FLAX_AXES[e.transform])
        flat[e.flax_path] = np.ascontiguousarray(array if dtype is None else array.astype(dtype))
    params = unflatten(flat)
    return {"params": params} if _unwrap(template)[1] else params


def flax_to_torch_state(params: Mapping[str, Any], *, dtype: Any = None) -> dict[str, np.ndarray]:
    """A Flax param tree -> a torch-layout state dict (contiguous numpy arrays, keys sorted)."""
    flat = flatten(_unwrap(params)[0])
    state = {}
    for e in build_table(params):
        array = np.asarray(flat[e.flax_path])
        if e.transform != "none":
            array = array.transpose(_TO_TORCH_AXES[e.transform])
        state[e.torch_key] = np.ascontiguousarray(array if dtype is None else array.astype(dtype))
    return state


# ---------------------------------------------------------------------------------------------------------------
# State-dict files: safetensors (numpy API, no torch needed) and, only when allowed, pickles via torch.load.


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: cannot read safetensors file ({_first_line(e)})") from e


def read_sharded_safetensors(index_path: Path) -> dict[str, np.ndarray]:
    """Read `*.safetensors.index.json` and every shard it names; each key must come from the shard it is listed in."""
    weight_map = read_index(index_path)
    state: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise WeightsError(f"{index_path}: shard {shard_path} is missing")
        part = read_safetensors(shard_path)
        listed = {k for k, f in weight_map.items() if f == shard}
        if set(part) != listed:
            extra = sorted(set(part) ^ listed)
            raise WeightsError(f"{shard_path}: tensors do not match the index ({_fmt_keys(extra)})")
        state.update(part)
    return state


def read_index(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"{index_path}: not a valid shard index ({_first_line(e)})") from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f"{index_path}: weight_map is empty or not an object")
    return weight_map


def read_pickle(path: Path, allow_pickle: bool) -> dict[str, np.ndarray]:
    """A torch pickle (`.bin`, `.ckpt`, `.pt`) via `torch.load(weights_only=True)`; refused unless `allow_pickle`."""
    if not allow_pickle:
        raise WeightsError(
            f"{path} is a pickle file; loading it runs code from the file, so pass allow_pickle=True "
            "(--allow-pickle) if you trust it, or convert it to safetensors"
        )
    try:
        import torch
    except ImportError as e:
        raise WeightsError(f"{path}: reading pickle files needs torch installed") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds here; all mean "cannot read this file"
        raise WeightsError(f"{path}: torch.load(weights_only=True) failed: {_first_line(e)}") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return {k: _torch_to_numpy(v) for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _torch_to_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; reinterpret the bits (ml_dtypes comes with jax)
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def write_safetensors(path: Path, state: Mapping[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(state[k]) for k in sorted(state)}
    save_file(tensors, str(path), metadata={"format": "pt"})


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB" (10**9) / "5GiB" (2**30), as huggingface writes them."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not m:
        raise ValueError(f"not a size: {size!r}")
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(m[1]) * units[m[2] or "B"])


def write_state(folder: Path, stem: str, state: Mapping[str, np.ndarray], max_shard_size: int | str | None) -> None:
    """Write `<stem>.safetensors`, or shards `<stem>-0000i-of-0000n.safetensors` + `<stem>.safetensors.index.json`.

    Shards are filled greedily in sorted key order, like huggingface's `split_torch_state_dict_into_shards`.
    """
    keys = sorted(state)
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    size = 0
    for k in keys:
        n = state[k].nbytes
        if limit is not None and shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    if len(shards) == 1:
        write_safetensors(folder / f"{stem}.safetensors", state)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / fname, {k: state[k] for k in shard})
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": sum(state[k].nbytes for k in keys)}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__

