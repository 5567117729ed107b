"""The edit at the patient's own resolution: the edit program works at model resolution; its output is composited
into the input's original pixels here, so that everything outside the edit mask is the input, bit for bit.

Geometry. The model canvas is (size, size); the input occupies its content box (top, left, h, w) (letterboxed, see
`x2x_jax.data.io`). A map over the canvas at any resolution (G at latent resolution, the decoded image at model
resolution) is brought to the input's (H, W) grid by separable resampling whose sample positions are the input
pixels' centres mapped into the canvas: pixel y of the input sits at canvas row top + (y + 0.5) * h / H.

Mask. G is upsampled *bilinearly* (triangle kernel) to the input's grid and thresholded there: mask = G_full >= tau.
Its boundary is the bilinear contour of G, not the latent grid's 8-pixel blocks. tau = 0 makes the mask the whole
image (plain InstructPix2Pix).

Feather. The blend weight alpha is 0 outside the mask and ramps up to 1 over `feather` pixels *inside* it:
alpha = mask * clip(2 * box_r(mask) - 1, 0, 1), box_r the mean over a (2r + 1)^2 window (r = feather; across a
straight boundary that is a linear ramp from 0 at the edge to 1 at depth r). feather = 0 is a hard edge. The
default (`default_feather`) is the larger of 1 % of the short side and one model pixel (the decoded edit's own
resolution), so the seam is hidden at any input size.

Edit. E = the decoded edit's content box resampled bicubically to (H, W) (display grey in [0, 1]). With keep_detail,
the input's high frequencies the model never saw are added back where the edit did not change the low-frequency
content: E + w * (input - lowpass(input)), lowpass(input) = the model's own input resampled back the same way,
w = clip(1 - |E - lowpass(input)| / DETAIL_CHANGE, 0, 1) (so detail fades out where the edit made a change of
DETAIL_CHANGE or more, e.g. a new opacity that hides the ribs).

Composite, in the input's *stored* values (PNG / JPEG levels, DICOM stored values): E is mapped to stored values
through the inverse of the display mapping the input was read with (`Source.to_stored`); then
out = round((1 - alpha) * input + alpha * E) where alpha > 0, and out = input elsewhere (the array is copied, not
recomputed). A colour input keeps its colour outside the mask and its alpha channel everywhere; inside, the grey
edit goes into its colour channels.

Only the mask's bounding box (plus the feather) is resampled and blended, so the cost follows the mask's size.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from x2x_jax.data.io import Source

DETAIL_CHANGE = 0.1  # display units: a low-frequency change this large or larger gets none of the input's detail
FEATHER_FRACTION = 0.01  # default feather: this fraction of the short side ...


@dataclasses.dataclass(frozen=True)
class FullRes:
    pixels: np.ndarray  # the output in the input's stored dtype and layout
    mask: np.ndarray  # bool (H, W): G_full >= tau, the mask of the composite
    alpha: np.ndarray  # float32 (H, W): the blend weight, 0 outside the mask
    feather: int  # the feather used, in input pixels
    keep_detail: bool


def default_feather(height: int, width: int, content_hw: tuple[int, int]) -> int:
    """max(1 % of the short side, one model pixel in input pixels), rounded."""
    model_pixel = max(height / content_hw[0], width / content_hw[1])
    return int(round(max(FEATHER_FRACTION * min(height, width), model_pixel)))


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel, a = -0.5 (Pillow's and OpenCV's bicubic)."""
    x = np.abs(x)
    a = -0.5
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.clip(1.0 - np.abs(x), 0.0, None)


KERNELS = {"bilinear": (_triangle, 1.0), "bicubic": (_cubic, 2.0)}


def resample_matrix(n_in: int, start: float, length: float, n_out: int, kernel: str) -> np.ndarray:
    """(n_out, n_in) float32 weights taking input samples 0..n_in-1 to n_out outputs that evenly cover the input
    interval [start, start + length) (in input pixels). Antialiased when shrinking (the kernel is widened by the
    scale, as Pillow does); edge samples are repeated beyond the input; each row sums to 1."""
    fn, support = KERNELS[kernel]
    scale = length / n_out
    widen = max(scale, 1.0)
    centres = start + (np.arange(n_out) + 0.5) * scale  # output pixel centres in input coordinates
    reach = int(np.ceil(support * widen)) + 1
    first = np.floor(centres - 0.5).astype(np.int64) - reach + 1
    taps = first[:, None] + np.arange(2 * reach)[None, :]  # (n_out, taps)
    weights = fn((taps + 0.5 - centres[:, None]) / widen)
    weights /= weights.sum(axis=1, keepdims=True)
    out = np.zeros((n_out, n_in), np.float64)
    np.add.at(out, (np.repeat(np.arange(n_out), taps.shape[1]), np.clip(taps, 0, n_in - 1).ravel()),
              weights.ravel())
    return out.astype(np.float32)


def canvas_to_original(maps: np.ndarray, size: int, box: tuple[int, int, int, int], rows: slice, cols: slice,
                       height: int, width: int, kernel: str) -> np.ndarray:
    """Maps (..., n, n) covering the (size, size) canvas at any resolution n -> the input-grid window
    [rows, cols] of an (height, width) input placed at content box `box`; float32."""
    top, left, h, w = box
    n = maps.shape[-1]
    f = n / size  # map pixels per canvas pixel
    ay = resample_matrix(n, top * f, h * f, height, kernel)[rows]
    ax = resample_matrix(n, left * f, w * f, width, kernel)[cols]
    return np.einsum("yi,...ij,xj->...yx", ay, np.asarray(maps, np.float32), ax, optimize=True)


def guidance_to_original(g: np.ndarray, size: int, box, height: int, width: int) -> np.ndarray:
    """G over the canvas at latent resolution -> (height, width), bilinear."""
    return canvas_to_original(g, size, box, slice(None), slice(None), height, width, "bilinear")


def feather_alpha(mask: np.ndarray, feather: int) -> np.ndarray:
    """float32 blend weight: 0 outside `mask`, ramping to 1 over `feather` pixels inside it (see the module doc)."""
    mask = np.asarray(mask, bool)
    if feather <= 0:
        return mask.astype(np.float32)
    box = ndimage.uniform_filter(mask.astype(np.float32), size=2 * feather + 1, mode="nearest")
    return np.where(mask, np.clip(2.0 * box - 1.0, 0.0, 1.0), 0.0).astype(np.float32)


def _bounds(mask: np.ndarray, pad: int) -> tuple[slice, slice] | None:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    h, w = mask.shape
    return (slice(max(rows[0] - pad, 0), min(rows[-1] + 1 + pad, h)),
            slice(max(cols[0] - pad, 0), min(cols[-1] + 1 + pad, w)))


def composite(source: Source, decoded: np.ndarray, model_input: np.ndarray, guidance: np.ndarray, tau: float, *,
              size: int, box: tuple[int, int, int, int], feather: int, keep_detail: bool) -> FullRes:
    """The edited image at the input's own geometry (see the module doc).

    decoded, model_input: (size, size) in [-1, 1] (the VAE decode of the edit and the model's input, both over the
    canvas); guidance: G (h, w) over the canvas; tau: the mask threshold; feather >= 0 in input pixels.
    """
    if feather < 0:
        raise ValueError(f"feather must be >= 0, got {feather}")
    height, width = source.meta.height, source.meta.width
    mask = np.zeros((height, width), bool)
    alpha = np.zeros((height, width), np.float32)
    pixels = source.pixels.copy()
    # A bilinear sample of G is a convex combination of its 4 nearest cells, so G_full >= tau only next to cells
    # with G >= tau: G is resampled over the box of those cells, grown by one cell, and nowhere else.
    g = np.asarray(guidance, np.float32)
    cells = g >= np.float32(tau)
    if cells.any():
        rows, cols = _cells_window(cells, size, box, height, width)
        mask[rows, cols] = canvas_to_original(g, size, box, rows, cols, height, width, "bilinear") >= np.float32(tau)
    window = _bounds(mask, feather)
    if window is not None:
        rows, cols = window
        a = feather_alpha(mask[rows, cols], feather)
        alpha[rows, cols] = a
        inside = a > 0
        canvases = np.stack([decoded, model_input]) if keep_detail else np.asarray(decoded)[None]
        up = canvas_to_original(canvases, size, box, rows, cols, height, width, "bicubic")
        edit = np.clip((up[0][inside] + 1.0) * 0.5, 0.0, 1.0)
        sub = pixels[rows, cols]
        current = sub[inside]
        if keep_detail:
            low = np.clip((up[1][inside] + 1.0) * 0.5, 0.0, 1.0)
            original = source.to_display(current).astype(np.float32)
            weight = np.clip(1.0 - np.abs(edit - low) * (1.0 / DETAIL_CHANGE), 0.0, 1.0)
            edit = np.clip(edit + weight * (original - low), 0.0, 1.0)
        stored_edit = source.to_stored(edit).astype(np.float32)
        w = a[inside]
        channels = source.grey_channels
        blended = current.astype(np.float32)
        if channels:
            part = blended[:, :channels]
            blended[:, :channels] = part + w[:, None] * (stored_edit[:, None] - part)
        else:
            blended += w * (stored_edit - blended)
        low_s, high_s = source.stored_range
        sub[inside] = np.clip(np.rint(blended), low_s, high_s).astype(pixels.dtype)
        pixels[rows, cols] = sub
    return FullRes(pixels=pixels, mask=mask, alpha=alpha, feather=int(feather), keep_detail=bool(keep_detail))


def _cells_window(cells: np.ndarray, size: int, box, height: int, width: int) -> tuple[slice, slice]:
    """The input-grid window that can hold mask pixels: the latent cells' box grown by one cell, mapped to input
    pixels (generously rounded)."""
    top, left, h, w = box
    f = size / cells.shape[-1]
    r, c = np.flatnonzero(cells.any(axis=1)), np.flatnonzero(cells.any(axis=0))

    def span(first, last, start, length, n):  # latent cells [first, last] -> input pixels, +-1 cell
        lo = ((first - 1) * f - start) * n / length
        hi = ((last + 2) * f - start) * n / length
        return slice(max(int(np.floor(lo)) - 1, 0), min(int(np.ceil(hi)) + 1, n))

    return span(r[0], r[-1], top, h, height), span(c[0], c[-1], left, w, width)
