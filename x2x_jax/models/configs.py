"""diffusers config.json dicts <-> our Flax modules' fields (shared by the UNet, the VAE and their converters)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from x2x_jax.errors import ConfigError

DIFFUSERS_VERSION = "0.42.1"  # the release whose config format and layout we write (and test against)


def _fixed_ok(value, allowed: tuple) -> bool:
    """`value` is one of `allowed`, or a per-block list of allowed values (e.g. transformer_layers_per_block)."""
    if isinstance(value, (list, tuple)):
        return len(value) > 0 and all(not isinstance(v, (list, tuple)) and v in allowed for v in value)
    return value in allowed


def _tuplify(value):
    return tuple(_tuplify(v) for v in value) if isinstance(value, (list, tuple)) else value


def listify(value):
    return [listify(v) for v in value] if isinstance(value, (list, tuple)) else value


def parse_config(config: Mapping[str, Any], fields: Sequence[str], fixed: Mapping[str, tuple],
                 irrelevant: frozenset, what: str) -> dict[str, Any]:
    """Split a diffusers config dict into our module fields; ConfigError for keys we cannot honour."""
    kwargs = {}
    for key, value in config.items():
        if key.startswith("_") or key in irrelevant:
            continue
        if key in fields:
            kwargs[key] = _tuplify(value)
        elif key in fixed:
            if not _fixed_ok(value, fixed[key]):
                raise ConfigError(f"{what} config: {key}={value!r} is not supported "
                                  f"(only {' or '.join(repr(v) for v in fixed[key])})")
        else:
            raise ConfigError(f"{what} config: unknown key {key!r} (value {value!r})")
    return kwargs
