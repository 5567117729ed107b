"""Pictures of an edit: the guidance overlay (red, as the paper's figures), the mask, a side-by-side figure."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[-1, 1] grey -> uint8."""
    return np.clip(np.round((np.asarray(image, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def upsample_to(map_: np.ndarray, height: int, width: int) -> np.ndarray:
    """A low-resolution map in [0, 1] -> (height, width), bilinear."""
    img = Image.fromarray(np.asarray(map_, np.float32)).resize((width, height), Image.BILINEAR)
    return np.clip(np.asarray(img), 0.0, 1.0)


def guidance_overlay(image: np.ndarray, guidance: np.ndarray, alpha: float = 0.6) -> Image.Image:
    """Grey image in [-1, 1] with G in [0, 1] painted red on top (opacity alpha * G)."""
    grey = to_uint8(image).astype(np.float32)
    g = upsample_to(guidance, *grey.shape)[..., None] * alpha
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    red = np.array([255.0, 0.0, 0.0])
    return Image.fromarray(np.round(rgb * (1 - g) + red * g).astype(np.uint8))


def mask_image(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255)


def figure(panels: list[tuple[str, Image.Image]], caption: str = "", height: int = 256) -> Image.Image:
    """Panels side by side, each scaled to `height`, a label above each and an optional caption below."""
    font = ImageFont.load_default()
    scaled = [(label, img.convert("RGB").resize((round(img.width * height / img.height), height), Image.NEAREST))
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
        draw.text((4, height + 22), caption[:200], fill="black", font=font)
    return out
