"""Chest X-ray image I/O: PNG / JPEG / DICOM -> float32 at model resolution, and back to the original geometry.

Values
    `load_array` gives grey float32 in [0, 1] at the original size; `load_image` gives float32 in [-1, 1] at
    (size, size). 0 / -1 is black. Display polarity is always "dense is bright" (MONOCHROME2).

    * PNG / JPEG: value / (2**bits - 1); no windowing, so a PNG round-trips exactly. RGB(A) -> BT.601 luminance
      (0.299 R + 0.587 G + 0.114 B, in float), alpha is ignored. Pillow decodes 16-bit colour and 16-bit
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

Round trip (`load_image` -> `to_original` -> `save_like`)
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
import io
import os
import re
import uuid
import warnings
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from x2x_jax.errors import DataError

FITS = ("pad", "stretch")
KINDS = ("png", "jpeg", "dicom")
PERCENTILE_WINDOW = (0.5, 99.5)
DICOM_EXTENSIONS = (".dcm", ".dicom")

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


def _decode_pillow(path, data: bytes, kind: str) -> tuple[np.ndarray, ImageMeta]:
    fmt = "PNG" if kind == "png" else "JPEG"
    try:
        if kind == "png":
            # verify() walks every chunk and checks its CRC: catches truncation and bit rot that load() misses.
            with Image.open(io.BytesIO(data), formats=[fmt]) as im:
                im.verify()
        with Image.open(io.BytesIO(data), formats=[fmt]) as im:
            if getattr(im, "n_frames", 1) > 1:
                raise _error(path, f"animated / multi-frame {fmt} ({im.n_frames} frames) is not supported")
            im.load()
            mode, bands = im.mode, len(im.getbands())
            if mode in ("P", "PA"):
                arr = np.asarray(im.convert("RGBA" if mode == "PA" else "RGB"))
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                arr = np.asarray(im.convert("RGB"))
            else:
                arr = np.asarray(im)
    except DataError:
        raise
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError, zlib/struct errors...)
        raise _error(path, f"cannot decode {fmt} ({_one_line(e)})") from e

    # PNG IHDR byte 24 is the bit depth per sample; Pillow's mode does not always show it (16-bit RGB -> "RGB").
    bit_depth = 16 if kind == "png" and data[24] == 16 else 8
    if mode == "1":
        top = 1
    elif mode.startswith("I;16") or (mode == "I" and bit_depth == 16):
        top = 65535
    elif arr.dtype == np.uint8 and (mode in ("L", "LA") or (arr.ndim == 3 and arr.shape[2] >= 3)):
        top = 255
    else:
        raise _error(path, f"unsupported {fmt} pixel mode {mode!r}")
    if arr.ndim == 3:
        grey = arr[..., 0].astype(np.float64) if mode == "LA" else _luminance(arr)
    else:
        grey = arr.astype(np.float64)
    height, width = grey.shape
    meta = ImageMeta(path=str(path), kind=kind, height=height, width=width, bit_depth=bit_depth, mode=mode,
                     channels=bands, window=(0.0, float(top)), window_source="full-range")
    return np.clip(grey / top, 0.0, 1.0).astype(np.float32), meta


def _first(value) -> float:
    """First of a possibly multi-valued DICOM number (WindowCenter '40\\400' -> 40.0)."""
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0]
    return float(value)


def _percentile_window(values: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    low, high = (float(v) for v in np.percentile(values, PERCENTILE_WINDOW))
    if high <= low:  # (nearly) constant image: nothing to stretch; everything maps to black
        return np.zeros_like(values), (low, high)
    return np.clip((values - low) / (high - low), 0.0, 1.0), (low, high)


def _dicom_window(path, values: np.ndarray, ds) -> tuple[np.ndarray, tuple[float, float], str] | None:
    """Apply the first WindowCenter/WindowWidth (PS3.3 C.11.2.1.2); None if absent or unusable."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    try:
        c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
    except (TypeError, ValueError, IndexError):
        warnings.warn(f"{path}: unreadable WindowCenter/WindowWidth; using a percentile window", stacklevel=3)
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function == "LINEAR":
        if not w >= 1:
            warnings.warn(f"{path}: WindowWidth {w} < 1 is invalid for LINEAR; using a percentile window",
                          stacklevel=3)
            return None
        if w == 1:  # step at c - 0.5; the general formula would divide by zero
            return (values > c - 0.5).astype(np.float64), (c - 0.5, c - 0.5), "dicom-window"
        low, high = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
        y = np.clip((values - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)
        return y, (low, high), "dicom-window"
    if not w > 0:
        warnings.warn(f"{path}: WindowWidth {w} <= 0 is invalid; using a percentile window", stacklevel=3)
        return None
    if function == "LINEAR_EXACT":
        return np.clip((values - c) / w + 0.5, 0.0, 1.0), (c - w / 2, c + w / 2), "dicom-window"
    if function == "SIGMOID":
        # No hard window for a sigmoid; record c -/+ w/2 (where it reaches ~12 % / ~88 %).
        return 1.0 / (1.0 + np.exp(-4.0 * (values - c) / w)), (c - w / 2, c + w / 2), "dicom-window"
    warnings.warn(f"{path}: unknown VOILUTFunction {function!r}; using a percentile window", stacklevel=3)
    return None


def _dicom_voi_lut(values: np.ndarray, ds) -> np.ndarray | None:
    if "VOILUTSequence" not in ds or len(ds.VOILUTSequence) == 0:
        return None
    lut = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64).ravel()
    # The LUT is indexed by integers; Modality LUT output is float when rescaled.
    mapped = np.asarray(apply_voi(np.rint(values).astype(np.int64), ds, index=0), dtype=np.float64)
    low, high = float(lut.min()), float(lut.max())
    if high <= low:
        return np.zeros_like(mapped)
    return np.clip((mapped - low) / (high - low), 0.0, 1.0)


def _decode_dicom(path, data: bytes, raw: bool) -> tuple[np.ndarray, ImageMeta]:
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
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise _error(path, f"no pixel data decoder exists for transfer syntax {syntax.name} ({syntax})") from None
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise _error(path, f"compressed DICOM ({syntax.name}, {syntax}) cannot be decoded: no decoder installed "
                           f"(needs {needs})")
    try:
        stored = ds.pixel_array
    except Exception as e:
        raise _error(path, f"cannot decode DICOM pixel data ({syntax.name}: {_one_line(e)})") from e
    if stored.ndim != 2:
        raise _error(path, f"unexpected DICOM pixel array shape {stored.shape} (need rows x columns)")

    try:
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    except Exception as e:
        raise _error(path, f"cannot apply the DICOM Modality LUT / rescale ({_one_line(e)})") from e
    windowed = _dicom_window(path, values, ds)
    if windowed is not None:
        grey, window, source = windowed
    else:
        try:
            grey = _dicom_voi_lut(values, ds)
        except Exception as e:
            raise _error(path, f"cannot apply the DICOM VOI LUT ({_one_line(e)})") from e
        window, source = None, "dicom-voi-lut"
        if grey is None:
            grey, window = _percentile_window(values)
            source = "percentile"
    if photometric == "MONOCHROME1":
        grey = 1.0 - grey

    height, width = grey.shape
    meta = ImageMeta(path=str(path), kind="dicom", height=height, width=width,
                     bit_depth=8 if bits_stored <= 8 else 16, mode=stored.dtype.name, channels=1,
                     photometric=photometric, window=window, window_source=source)
    return np.clip(grey, 0.0, 1.0).astype(np.float32), meta


def load_array(path: str | os.PathLike) -> tuple[np.ndarray, ImageMeta]:
    """Load a PNG / JPEG / DICOM as grey float32 (height, width) in [0, 1] at its original size.

    The returned meta has size / fit / content_box None. Raises DataError (message "<path>: <problem>").
    """
    data = _read_bytes(path)
    kind = _sniff(path, data)
    if kind in ("png", "jpeg"):
        return _decode_pillow(path, data, kind)
    return _decode_dicom(path, data, raw=(kind == "dicom-raw"))


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
    pixels = levels.astype(np.uint8 if bit_depth == 8 else np.uint16)
    # Write next to the target, then rename: a crash never leaves a half-written PNG under the real name.
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
