"""Pictures of an edit: the guidance overlay (red, as the paper's figures), the mask and a side-by-side figure.
(Maps over the model canvas are brought to the input's geometry by `x2x_jax.editing.fullres`.)"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RED = np.array([255.0, 0.0, 0.0])
FIGURE_HEIGHT = 256


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[-1, 1] grey -> uint8."""
    return np.clip(np.round((np.asarray(image, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def resize_map(map_: np.ndarray, height: int, width: int, nearest: bool = False) -> np.ndarray:
    """A 2-D float map -> (height, width): bilinear (values stay within the input's range) or nearest."""
    map_ = np.asarray(map_, np.float32)
    if map_.shape == (height, width):
        return map_.copy()
    resample = Image.NEAREST if nearest else Image.BILINEAR
    out = np.asarray(Image.fromarray(map_).resize((width, height), resample), np.float32)
    return np.clip(out, map_.min(), map_.max())


def guidance_overlay(image: np.ndarray, guidance: np.ndarray, alpha: float = 0.6) -> Image.Image:
    """Grey image in [-1, 1] with G in [0, 1] painted red on top (opacity alpha * G); G is resized (bilinear) to
    the image when its resolution differs."""
    grey = to_uint8(image).astype(np.float32)
    g = np.clip(resize_map(guidance, *grey.shape), 0.0, 1.0)[..., None] * alpha
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    return Image.fromarray(np.round(rgb * (1 - g) + RED * g).astype(np.uint8))


def grey_image(image: np.ndarray) -> Image.Image:
    return Image.fromarray(to_uint8(image))


def mask_image(mask: np.ndarray) -> Image.Image:
    """Boolean mask -> 8-bit PNG-ready image (255 = edited)."""
    return Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255)


def figure(panels: list[tuple[str, Image.Image]], caption: str = "", height: int = FIGURE_HEIGHT) -> Image.Image:
    """Panels side by side, each scaled to `height`, a label above each and an optional caption below."""
    font = ImageFont.load_default()
    scaled = [(label, img.convert("RGB").resize((max(1, round(img.width * height / img.height)), height),
                                                Image.NEAREST if img.height < height else Image.LANCZOS))
              for label, img in panels]
    width = sum(img.width for _, img in scaled) + 4 * (len(scaled) + 1)
    out = Image.new("RGB", (width, height + 40), "white")
    draw = ImageDraw.Draw(out)
    x = 4
    for label, img in scaled:
        draw.text((x, 2), label, fill="black", font=font)
        out.paste(img, (x, 16))
        x += img.width + 4
    if caption:
        # Keep the caption inside the figure: cut it to what fits the width (about 6 px per character).
        limit = max(10, (width - 8) // 6)
        draw.text((4, height + 22), caption if len(caption) <= limit else caption[:limit - 3] + "...",
                  fill="black", font=font)
    return out
