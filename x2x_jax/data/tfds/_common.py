"""Pieces shared by the two builders and the input pipeline: PNG encoding and the edits' JSON form."""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Iterable

import numpy as np
from PIL import Image

from x2x_jax.data.instructions import Edit


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a 2-D uint8 image (mode "L").

    TFDS' `Image` feature needs TensorFlow to encode a numpy array, but stores already-encoded bytes as they
    are, and `tfds.data_source` decodes them with Pillow.
    """
    image = np.asarray(image)
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"encode_png expects a 2-D uint8 image, got {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def unit_to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8, rounded to nearest."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def edits_to_json(edits: Iterable[Edit]) -> str:
    """Compact JSON list of the Edit fields (findings as a list); `edits_from_json` inverts it."""
    return json.dumps(
        [{**dataclasses.asdict(e), "findings": list(e.findings)} for e in edits], separators=(",", ":")
    )


def edits_from_json(text: str | bytes) -> tuple[Edit, ...]:
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return tuple(Edit(**{**item, "findings": tuple(item["findings"])}) for item in json.loads(text or "[]"))
