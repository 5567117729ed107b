"""Chest X-ray image I/O: PNG / JPEG / DICOM -> float32 at model resolution, and back to the original geometry.

Values
    `load_array` gives grey float32 in [0, 1] at the original size; `load_image` gives float32 in [-1, 1] at
    (size, size). 0 / -1 is black. Display polarity is always "dense is bright" (MONOCHROME2).

    * PNG / JPEG: value / (2**bits - 1); no windowing, so a PNG round-trips exactly. CMYK is refused. RGB(A) ->
      BT.601 luminance (0.299 R + 0.587 G + 0.114 B, in float), alpha is ignored. Pillow decodes 16-bit colour and 16-bit
      grey+alpha PNGs at 8-bit precision; their `bit_depth` is still 16 (the file's), so they save as 16-bit.
    * DICOM: stored values -> Modality LUT (RescaleSlope / RescaleIntercept or a Modality LUT Sequence) -> VOI:
      the first WindowCenter / WindowWidth pair (VOILUTFunction LINEAR, LINEAR_EXACT or SIGMOID) if present,
      else the first VOI LUT Sequence item (scaled by its data's min..max), else a robust percentile window
      (0.5 .. 99.5 %) -> MONOCHROME1 inverted (1 - y). What was used is recorded in `ImageMeta.window_source`.

Geometry (`fit`)
    * "pad" (default): keep the aspect ratio; the long side is resized to `size`, the short side to
      round(short * size / long), and the result is padded symmetrically (the odd pixel goes to the bottom /
      right) with black. No anatomy is cropped or distorted.
    * "stretch": resize to (size, size), distorting the aspect ratio.
    `ImageMeta.content_box` = (top, left, height, width) of the image inside the model canvas; `to_original`
    crops that box and resizes it back to the original (height, width).

    Resampling is Pillow's LANCZOS on float32 ("F" mode), antialiased when shrinking, deterministic; the
    result is clipped to the input's [min, max] so there is no ringing overshoot. When the content box already
    has the original size (e.g. the long side equals `size`) nothing is resampled.

Round trip (`load_image` -> `to_original` -> `save_like`): resamples the *whole* image, so it is not how edits are
written — `x2x_jax.editing.fullres` composites an edit into the input's stored pixels (`load_source`, `Source`,
`save_pixels`) and keeps every pixel outside the edit mask exactly.
    The PNG written has the original height, width and bit depth. If no resampling happened the pixel values are
    reproduced exactly (the float32 error is < 0.01 LSB even at 16 bits; tests allow 1 LSB); otherwise they
    differ by the down-/up-sampling error, small on smooth images and largest at sharp edges.
    For DICOM the saved values are the *displayed* ones (after LUTs, window and MONOCHROME1 inversion), not
    the stored ones.

Errors
    Anything wrong with an input file (missing, empty, unreadable, corrupt, truncated, unsupported format or
    DICOM feature) raises `x2x_jax.errors.DataError` with a one-line message "<path>: <problem>". The format is
    detected from the content (magic bytes), so a PNG named .jpg loads as a PNG; the extension is only a hint,
    used to accept DICOM files without the 128-byte preamble when they are named .dcm / .dicom. Supported: PNG,
    JPEG, DICOM. Nothing is ever replaced by a blank or partial image. Programming errors (bad `size` / `fit`,
    an image of the wrong shape) raise ValueError.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import re
import uuid
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from x2x_jax.data.dicom import DicomDisplay
from x2x_jax.errors import DataError

FITS = ("pad", "stretch")
KINDS = ("png", "jpeg", "dicom")
DICOM_EXTENSIONS = (".dcm", ".dicom")

# Editing limits (`load_source`). Below 32 px there is nothing to edit at any model size. Above 40 MP: the largest
# flat-panel chest detectors give 43 x 43 cm at 100 um = 4,300 x 4,300 = 18.5 MP, and the full-resolution composite
# keeps about a dozen float32/float64 copies of the image (~2-3 GB at 40 MP on a 24 GB machine).
MIN_EDIT_SIDE = 32
MAX_EDIT_PIXELS = 40_000_000
# Compressed DICOM transfer syntaxes -> the package index's decoder for them (the `dicom` extra installs them all).
DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg",  # JPEG Lossless, process 14
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",  # JPEG Lossless, first-order prediction (most CXR)
    "1.2.840.10008.1.2.4.50": "pylibjpeg pylibjpeg-libjpeg",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg",  # JPEG Extended
    "1.2.840.10008.1.2.4.80": "pyjpegls",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "pyjpegls",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.4.201": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K
}

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_BT601 = np.array([0.299, 0.587, 0.114])
# Recognised but unsupported formats, named in the error message.
_OTHER_MAGIC = (
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000 codestream"),
    (b"\x1f\x8b", "gzip"), (b"PK\x03\x04", "zip"), (b"%PDF", "PDF"), (b"\x93NUMPY", "NumPy .npy"),
)


@dataclasses.dataclass(frozen=True)
class ImageMeta:
    """Everything needed to map a model-resolution image back to its source file's geometry and format.

    path: the file as given. kind: "png" | "jpeg" | "dicom" (from the content, not the extension).
    height, width: original size in pixels. bit_depth: 8 or 16, the depth `save_like` writes by default.
    mode: Pillow mode of the decoded image ("L", "I;16", "RGB", ...) or, for DICOM, the stored pixels' dtype.
    channels: samples per pixel in the file (alpha included). photometric: DICOM PhotometricInterpretation.
    window: (low, high) input values mapped to 0 and 1 (after the Modality LUT for DICOM); None for a VOI LUT.
    window_source: "full-range" | "dicom-window" | "dicom-voi-lut" | "percentile".
    size, fit, content_box: the model canvas, the fit used and (top, left, height, width) of the image in
    it; None for `load_array` results.
    """

    path: str
    kind: str
    height: int
    width: int
    bit_depth: int
    mode: str
    channels: int
    photometric: str | None = None
    window: tuple[float, float] | None = None
    window_source: str = "full-range"
    size: int | None = None
    fit: str | None = None
    content_box: tuple[int, int, int, int] | None = None

    @property
    def scale(self) -> tuple[float, float]:
        """(y, x) factor from original to model pixels."""
        if self.content_box is None:
            raise ValueError(f"{self.path}: meta has no model geometry (it came from load_array)")
        _, _, h, w = self.content_box
        return h / self.height, w / self.width


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
    """An input image as its file stores it: what the full-resolution composite writes back into.

    pixels: the decoded stored values, (H, W) grey (uint8 / uint16; DICOM: its stored dtype, signed or not) or
    (H, W, C) uint8 colour (RGB, RGBA, LA; a palette image as RGB(A)). levels: the value of white for PNG / JPEG
    (255 or 65535), None for DICOM. dicom: the DICOM display mapping (`x2x_jax.data.dicom.DicomDisplay`, which
    holds the dataset). exact: False when `pixels` are not the file's own values (Pillow decodes 16-bit colour
    PNGs at 8-bit precision; YCbCr / LAB / HSV are converted), so they cannot be written back bit for bit.
    """

    pixels: np.ndarray
    meta: ImageMeta
    levels: int | None = None
    dicom: DicomDisplay | None = None
    exact: bool = True

    @property
    def grey_channels(self) -> int:
        """How many leading channels of a colour image carry the grey value (RGB(A): 3, LA: 1); 0 for 2-D grey."""
        if self.pixels.ndim == 2:
            return 0
        return 1 if self.pixels.shape[2] == 2 else 3

    @property
    def stored_range(self) -> tuple[int, int]:
        if self.dicom is not None:
            return self.dicom.low_stored, self.dicom.high_stored
        return 0, self.levels

    def to_display(self, pixels: np.ndarray) -> np.ndarray:
        """Stored pixels (this image's layout) -> displayed grey float64 (H, W) in [0, 1]."""
        if self.dicom is not None:
            return self.dicom.to_display(pixels)
        if self.grey_channels:  # colour: the last axis is the channels, also for (N, C) pixels picked out of it
            grey = pixels[..., 0].astype(np.float64) if self.grey_channels == 1 else _luminance(pixels)
        else:
            grey = pixels.astype(np.float64)
        return np.clip(grey / self.levels, 0.0, 1.0)

    def to_stored(self, grey: np.ndarray) -> np.ndarray:
        """Displayed grey in [0, 1] -> the stored grey level, float64 (H, W), not rounded, within `stored_range`."""
        if self.dicom is not None:
            return self.dicom.to_stored(grey)
        return np.clip(np.asarray(grey, np.float64), 0.0, 1.0) * self.levels

    @functools.cached_property
    def grey(self) -> np.ndarray:
        """The displayed image, float32 (H, W) in [0, 1]: what `load_array` returns."""
        return self.to_display(self.pixels).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Geometry (pure)
# ---------------------------------------------------------------------------------------------------------


def _check_size_fit(size: int, fit: str) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")


def content_box(height: int, width: int, size: int, fit: str = "pad") -> tuple[int, int, int, int]:
    """(top, left, height, width) of a height x width image placed on a size x size canvas by `fit`."""
    _check_size_fit(size, fit)
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if fit == "stretch":
        return 0, 0, size, size
    long = max(height, width)
    # Integer round-half-up of side * size / long; the long side maps to exactly `size`.
    h = max(1, (2 * height * size + long) // (2 * long))
    w = max(1, (2 * width * size + long) // (2 * long))
    return (size - h) // 2, (size - w) // 2, h, w


def _resample(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 LANCZOS resize to (height, width), clipped to the input's range; a copy if the size matches."""
    array = np.asarray(array, dtype=np.float32)
    if array.shape == (height, width):
        return array.copy()
    out = np.asarray(Image.fromarray(array).resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32)
    return np.clip(out, array.min(), array.max())


def resize_to_model(array: np.ndarray, size: int, fit: str = "pad", pad_value: float = 0.0) -> np.ndarray:
    """Resize a 2-D float image to (size, size) float32 by `fit` (see the module doc); pure and deterministic.

    pad_value fills the margins of fit="pad": 0.0 is black for `load_array`'s [0, 1] images (use -1.0 for
    [-1, 1] images). The input is not modified; values stay within its [min, max] (and pad_value).
    """
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D (height, width) image, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("image contains NaN or infinite values")
    top, left, h, w = content_box(array.shape[0], array.shape[1], size, fit)
    out = np.full((size, size), pad_value, dtype=np.float32)
    out[top:top + h, left:left + w] = _resample(array, h, w)
    return out


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def _one_line(e: BaseException) -> str:
    # Decoders are fed in-memory bytes; their messages would otherwise mention "<_io.BytesIO object at 0x...>".
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the data", " ".join(str(e).split()))
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _error(path, problem: str) -> DataError:
    return DataError(f"{path}: {' '.join(problem.split())}")


def _read_bytes(path) -> bytes:
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise _error(path, "no such file") from None
    except IsADirectoryError:
        raise _error(path, "is a directory, not an image file") from None
    except OSError as e:
        raise _error(path, f"cannot read file ({_one_line(e)})") from e
    if not data:
        raise _error(path, "empty file (0 bytes)")
    return data


def _sniff(path, data: bytes) -> str:
    """'png' | 'jpeg' | 'dicom' | 'dicom-raw' (no preamble, trusted from the extension) from the content."""
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if data[128:132] == b"DICM":
        return "dicom"
    for magic, name in _OTHER_MAGIC:
        if data.startswith(magic):
            raise _error(path, f"unsupported image format {name}; supported: PNG, JPEG, DICOM")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        raise _error(path, "unsupported image format WebP; supported: PNG, JPEG, DICOM")
    if Path(path).suffix.lower() in DICOM_EXTENSIONS:
        return "dicom-raw"
    suffix = Path(path).suffix or "(no extension)"
    raise _error(path, f"unrecognised file content for extension {suffix}: not a PNG, JPEG or DICOM file")


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return np.clip(rgb[..., :3].astype(np.float64) @ _BT601, 0.0, None)


def _check_geometry(path, height: int, width: int, limits: tuple[int, int] | None) -> None:
    """Refuse, before decoding the pixels, an image too small or too large to edit (limits = (min side, max pixels))."""
    if limits is None:
        return
    min_side, max_pixels = limits
    if min(height, width) < min_side:
        raise _error(path, f"image is {width}x{height} pixels; its short side must be at least {min_side} px")
    if height * width > max_pixels:
        raise _error(path, f"image is {width}x{height} = {height * width / 1e6:.1f} megapixels, above the limit of "
                           f"{max_pixels / 1e6:.0f} MP (see x2x_jax.data.io.MAX_EDIT_PIXELS)")


def _decode_pillow(path, data: bytes, kind: str, limits=None) -> Source:
    fmt = "PNG" if kind == "png" else "JPEG"
    try:
        if kind == "png":
            # verify() walks every chunk and checks its CRC: catches truncation and bit rot that load() misses.
            with Image.open(io.BytesIO(data), formats=[fmt]) as im:
                im.verify()
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            if getattr(im, "n_frames", 1) > 1:
                raise _error(path, f"animated / multi-frame {fmt} ({im.n_frames} frames) is not supported")
            if im.mode == "CMYK":
                raise _error(path, f"CMYK {fmt} is not supported (a print colour space: its grey levels cannot be "
                                   "recovered exactly); save the radiograph as greyscale")
            _check_geometry(path, im.height, im.width, limits)
            im.load()
            mode, bands = im.mode, len(im.getbands())
            if mode in ("P", "PA"):
                arr = np.asarray(im.convert("RGBA" if mode == "PA" else "RGB"))
            elif mode in ("YCbCr", "LAB", "HSV"):
                arr = np.asarray(im.convert("RGB"))
            else:
                arr = np.asarray(im)
    except DataError:
        raise
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError, zlib/struct errors...)
        raise _error(path, f"cannot decode {fmt} ({_one_line(e)})") from e

    # PNG IHDR byte 24 is the bit depth per sample; Pillow's mode does not always show it (16-bit RGB -> "RGB").
    bit_depth = 16 if kind == "png" and data[24] == 16 else 8
    exact = True
    if mode == "1":
        top, pixels = 255, arr.astype(np.uint8) * 255  # written back as 8-bit grey, levels 0 / 255
    elif mode.startswith("I;16") or (mode == "I" and bit_depth == 16):
        top, pixels = 65535, arr.astype(np.uint16)
    elif arr.dtype == np.uint8 and (mode in ("L", "LA") or (arr.ndim == 3 and arr.shape[2] >= 3)):
        top, pixels = 255, arr
        # Pillow decodes 16-bit colour / grey+alpha PNGs at 8-bit precision; converted modes are not the file's.
        exact = bit_depth == 8 and mode not in ("YCbCr", "LAB", "HSV")
    else:
        raise _error(path, f"unsupported {fmt} pixel mode {mode!r}")
    height, width = pixels.shape[:2]
    meta = ImageMeta(path=str(path), kind=kind, height=height, width=width, bit_depth=bit_depth, mode=mode,
                     channels=bands, window=(0.0, float(top)), window_source="full-range")
    return Source(pixels=pixels, meta=meta, levels=top, exact=exact)


def _decode_dicom(path, data: bytes, raw: bool, limits=None) -> Source:
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=raw)
    except Exception as e:
        raise _error(path, f"cannot parse DICOM ({_one_line(e)})") from e
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise _error(path, "DICOM float pixel data is not supported")
        raise _error(path, "DICOM has no pixel data (no (7FE0,0010) element; not an image or truncated)")

    file_meta = getattr(ds, "file_meta", None)
    if file_meta is None or "TransferSyntaxUID" not in file_meta:
        if not raw:
            raise _error(path, "DICOM file meta has no TransferSyntaxUID")
        # Preamble-less file: the transfer syntax is the encoding pydicom detected (always uncompressed).
        implicit, little = ds.original_encoding
        if file_meta is None:
            ds.file_meta = file_meta = FileMetaDataset()
        file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit
                                       else ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    syntax = UID(file_meta.TransferSyntaxUID)

    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise _error(path, f"unsupported DICOM PhotometricInterpretation {photometric or '(missing)'!r}; "
                           "only MONOCHROME1 / MONOCHROME2 are supported")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if samples != 1:
        raise _error(path, f"unsupported DICOM SamplesPerPixel {samples} (need 1)")
    if frames != 1:
        raise _error(path, f"multi-frame DICOM ({frames} frames) is not supported")
    bits_allocated = int(ds.get("BitsAllocated", 0) or 0)
    if bits_allocated not in (8, 16):
        raise _error(path, f"unsupported DICOM BitsAllocated {bits_allocated} (need 8 or 16)")
    bits_stored = int(ds.get("BitsStored", bits_allocated) or bits_allocated)
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise _error(path, "DICOM has no usable Rows / Columns") from None
    _check_geometry(path, rows, columns, limits)

    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise _error(path, f"no pixel data decoder exists for transfer syntax {syntax.name} ({syntax})") from None
    if not decoder.is_available:
        install = DECODER_PACKAGES.get(str(syntax))
        hint = (f"pip install {install} (or pip install 'x2x-jax[dicom]')" if install
                else "; ".join(decoder.missing_dependencies) or "a decoder plugin")
        raise _error(path, f"compressed DICOM ({syntax.name}, {syntax}) cannot be decoded: no decoder installed; "
                           f"to read it: {hint}")
    try:
        stored = ds.pixel_array
    except Exception as e:
        raise _error(path, f"cannot decode DICOM pixel data ({syntax.name}: {_one_line(e)})") from e
    if stored.ndim != 2:
        raise _error(path, f"unexpected DICOM pixel array shape {stored.shape} (need rows x columns)")

    try:
        display = DicomDisplay(ds, stored, path)
    except DataError:
        raise
    except Exception as e:
        raise _error(path, f"cannot apply the DICOM VOI LUT ({_one_line(e)})") from e
    height, width = stored.shape
    meta = ImageMeta(path=str(path), kind="dicom", height=height, width=width,
                     bit_depth=8 if bits_stored <= 8 else 16, mode=stored.dtype.name, channels=1,
                     photometric=photometric, window=display.window, window_source=display.window_source)
    return Source(pixels=stored, meta=meta, dicom=display)


def _decode(path, limits=None) -> Source:
    data = _read_bytes(path)
    kind = _sniff(path, data)
    if kind in ("png", "jpeg"):
        return _decode_pillow(path, data, kind, limits)
    return _decode_dicom(path, data, raw=(kind == "dicom-raw"), limits=limits)


def load_array(path: str | os.PathLike) -> tuple[np.ndarray, ImageMeta]:
    """Load a PNG / JPEG / DICOM as grey float32 (height, width) in [0, 1] at its original size.

    The returned meta has size / fit / content_box None. Raises DataError (message "<path>: <problem>").
    """
    source = _decode(path)
    return source.grey, source.meta


def load_source(path: str | os.PathLike, *, min_side: int = MIN_EDIT_SIDE,
                max_pixels: int = MAX_EDIT_PIXELS) -> Source:
    """Load an image to edit: its stored pixels, display mapping and grey (see `Source`). Refuses, before decoding
    the pixels, an image whose short side is below `min_side` or with more than `max_pixels` pixels, and (since
    its pixels could not be written back exactly) a 16-bit colour / grey+alpha PNG or a converted colour mode."""
    source = _decode(path, (min_side, max_pixels))
    if not source.exact:
        m = source.meta
        raise _error(path, f"{m.bit_depth}-bit {m.kind.upper()} in pixel mode {m.mode!r} cannot be edited exactly "
                           "(its pixels are decoded at other values than stored); save it as 8/16-bit greyscale")
    return source


def load_image(path: str | os.PathLike, size: int, fit: str = "pad") -> tuple[np.ndarray, ImageMeta]:
    """Load an image as float32 (size, size) in [-1, 1] (black = -1, also the padding) plus its ImageMeta."""
    _check_size_fit(size, fit)
    grey, meta = load_array(path)
    image = resize_to_model(grey, size, fit, pad_value=0.0) * 2.0 - 1.0
    box = content_box(meta.height, meta.width, size, fit)
    return np.clip(image, -1.0, 1.0), dataclasses.replace(meta, size=size, fit=fit, content_box=box)


# ---------------------------------------------------------------------------------------------------------
# Back to the original
# ---------------------------------------------------------------------------------------------------------


def _as_2d(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D (height, width) image, got shape {image.shape}")
    if not np.all(np.isfinite(image)):
        raise ValueError("image contains NaN or infinite values")
    return image


def to_original(image: np.ndarray, meta: ImageMeta) -> np.ndarray:
    """Map a (size, size) [-1, 1] image back to float32 (meta.height, meta.width) in [-1, 1].

    Crops meta.content_box (undoing the padding) and resizes it to the original size (LANCZOS, clipped).
    Accepts a trailing channel axis of 1.
    """
    if meta.size is None or meta.content_box is None:
        raise ValueError(f"{meta.path}: meta has no model geometry (it came from load_array, not load_image)")
    image = _as_2d(image)
    if image.shape != (meta.size, meta.size):
        raise ValueError(f"{meta.path}: expected a {meta.size}x{meta.size} image, got shape {image.shape}")
    top, left, h, w = meta.content_box
    crop = np.clip(image[top:top + h, left:left + w].astype(np.float32), -1.0, 1.0)
    return _resample(crop, meta.height, meta.width)


def save_like(image: np.ndarray, meta: ImageMeta, path: str | os.PathLike, *, bit_depth: int | None = None,
              overwrite: bool = False) -> Path:
    """Save a [-1, 1] image as a grey PNG with the original's size and bit depth; returns the path written.

    image: at the original size, or at model size (then `to_original` is applied first).
    bit_depth: 8 or 16, default meta.bit_depth (JPEG -> 8, DICOM -> 16 unless BitsStored <= 8).
    [-1, 1] maps linearly onto 0 .. 2**bit_depth - 1 (rounded; values outside are clipped).
    The file is written atomically. Never writes over the source file; an existing file is replaced only
    with overwrite=True. Raises DataError for a refused / failed write, ValueError for a bad image.
    """
    bit_depth = meta.bit_depth if bit_depth is None else bit_depth
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth!r}")
    image = _as_2d(image)
    if image.shape != (meta.height, meta.width):
        if meta.size is not None and image.shape == (meta.size, meta.size):
            image = to_original(image, meta)
        else:
            raise ValueError(f"{meta.path}: image shape {image.shape} is neither the original "
                             f"{(meta.height, meta.width)} nor the model size")

    out = Path(path)
    if out.suffix.lower() != ".png":
        raise _error(path, "save_like writes PNG; the output path must end in .png")
    if out.exists():
        if out.resolve() == Path(meta.path).resolve() or (Path(meta.path).exists()
                                                          and os.path.samefile(out, meta.path)):
            raise _error(path, "refusing to overwrite the source image")
        if not overwrite:
            raise _error(path, "output file exists (pass overwrite=True to replace it)")

    top = 2**bit_depth - 1
    levels = np.rint((np.clip(image.astype(np.float64), -1.0, 1.0) + 1.0) * 0.5 * top)
    return save_pixels(levels.astype(np.uint8 if bit_depth == 8 else np.uint16), out)


def save_pixels(pixels: np.ndarray, path: str | os.PathLike) -> Path:
    """Write stored pixels as a PNG exactly: (H, W) uint8 / uint16 grey, (H, W, 2 | 3 | 4) uint8 LA / RGB / RGBA.
    Written next to the target and renamed, so a crash never leaves a half-written PNG under the real name; creates
    the folder; raises DataError for a failed write."""
    pixels = np.asarray(pixels)
    grey = pixels.ndim == 2 and pixels.dtype in (np.uint8, np.uint16)
    colour = pixels.ndim == 3 and pixels.dtype == np.uint8 and pixels.shape[2] in (2, 3, 4)
    if not (grey or colour):
        raise ValueError(f"cannot write pixels of shape {pixels.shape} and dtype {pixels.dtype} as PNG")
    out = Path(path)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:
            Image.fromarray(pixels).save(f, format="PNG")
        os.replace(tmp, out)
    except OSError as e:
        raise _error(path, f"cannot write PNG ({_one_line(e)})") from e
    finally:
        tmp.unlink(missing_ok=True)
    return out
