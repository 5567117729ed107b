"""The stage interface (documented in training/stages/__init__.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass
class Built:
    objective: Any
    trainable: Any
    frozen: dict
    example: dict
    data: Callable | None
    export: Callable
    sampler: Callable | None = None
