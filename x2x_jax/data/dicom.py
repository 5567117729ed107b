"""DICOM pixel values both ways: stored values -> displayed grey in [0, 1], displayed grey -> stored values, and the
derived (edited) image written back as a DICOM of the same geometry and photometry.

Forward (`DicomDisplay.to_display`, what `x2x_jax.data.io` reads with):
    stored -> Modality LUT (RescaleSlope / RescaleIntercept, or a Modality LUT Sequence) -> VOI: the first
    WindowCenter / WindowWidth pair (VOILUTFunction LINEAR, LINEAR_EXACT or SIGMOID, PS3.3 C.11.2.1.2) if present,
    else the first VOI LUT Sequence item (scaled by its data's min..max), else a robust percentile window
    (0.5 .. 99.5 % of the image's modality values) -> MONOCHROME1 inverted (1 - y). `window_source` says which.

Inverse (`DicomDisplay.to_stored`): the same chain backwards — MONOCHROME1 un-inverted, the window's inverse (a
linear window maps 0 / 1 to its lower / upper edge; a sigmoid is inverted analytically; a LUT by monotone
interpolation), the Modality LUT's inverse — then rounded and clipped to the range BitsStored and
PixelRepresentation allow. Displayed values the window clipped (outside it) come back as the window's edges.

Derived file (`write_derived`): the input's dataset with the new pixel data (same Rows / Columns, BitsAllocated,
BitsStored, HighBit, PixelRepresentation, PhotometricInterpretation, rescale and VOI tags), a new SOP Instance UID
and Series Instance UID, ImageType DERIVED\\SECONDARY, a DerivationDescription (instruction and model) and a
SourceImageSequence item referencing the input; no other element is added. Always written uncompressed (Explicit
VR Little Endian); a compressed input's pixel data is decoded first.
"""

from __future__ import annotations

import copy
import os
import uuid
import warnings
from pathlib import Path

import numpy as np
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi
from pydicom.sequence import Sequence
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from x2x_jax.errors import DataError

PERCENTILE_WINDOW = (0.5, 99.5)
DERIVATION_LIMIT = 1024  # DerivationDescription is an ST: at most 1024 characters


def _first(value) -> float:
    """First of a possibly multi-valued DICOM number (WindowCenter '40\\400' -> 40.0)."""
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0]
    return float(value)


def stored_range(ds) -> tuple[int, int]:
    """The smallest and largest stored value BitsStored and PixelRepresentation allow."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _lut_data(ds, item) -> np.ndarray:
    """An item's LUT Data as float64. Its VR is US or OW (an Implicit VR file always reads it as OW, raw bytes): OW is
    16-bit words in the dataset's byte order, as pydicom's apply_modality_lut / apply_voi read it."""
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):
        little = ds.original_encoding[1] is not False  # None (a dataset made in memory): little endian
        return np.frombuffer(data, dtype="<u2" if little else ">u2").astype(np.float64)
    return np.asarray(data, dtype=np.float64).ravel()


def _invert_monotone(y: np.ndarray, inputs: np.ndarray, outputs: np.ndarray, what: str, path) -> np.ndarray:
    """x with f(x) = y for a monotone table f(inputs) = outputs (linear between entries, clamped at the ends)."""
    outputs = np.asarray(outputs, np.float64)
    steps = np.diff(outputs)
    if np.all(steps >= 0):
        order = slice(None)
    elif np.all(steps <= 0):
        order = slice(None, None, -1)
    else:
        raise DataError(f"{path}: the {what} is not monotone, so edited values cannot be mapped back through it")
    xs, ys = np.asarray(inputs, np.float64)[order], outputs[order]
    # On flat runs np.interp would pick an end of the run; any x of the run displays the same, so that is fine.
    return np.interp(y, ys, xs)


class DicomDisplay:
    """The display mapping of one DICOM image, decided once from its tags (and, for the percentile window, from its
    modality values), usable in both directions."""

    def __init__(self, ds, stored: np.ndarray, path):
        self.ds, self.path = ds, str(path)
        self.photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
        self.low_stored, self.high_stored = stored_range(ds)
        values = self.modality(stored)
        self.function, self.window, self.window_source = None, None, "percentile"
        self._voi_lut = None
        if not self._read_window():
            if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
                lut = _lut_data(ds, ds.VOILUTSequence[0])
                self._voi_lut = (float(lut.min()), float(lut.max()))
                self.window_source = "dicom-voi-lut"
            else:
                self.window = tuple(float(v) for v in np.percentile(values, PERCENTILE_WINDOW))
                self.function = "PERCENTILE"

    # --- the window -------------------------------------------------------------------------------------------

    def _read_window(self) -> bool:
        ds, path = self.ds, self.path
        if "WindowCenter" not in ds or "WindowWidth" not in ds:
            return False
        try:
            c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
        except (TypeError, ValueError, IndexError):
            warnings.warn(f"{path}: unreadable WindowCenter/WindowWidth; using a percentile window", stacklevel=4)
            return False
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        if function == "LINEAR":
            if not w >= 1:
                warnings.warn(f"{path}: WindowWidth {w} < 1 is invalid for LINEAR; using a percentile window",
                              stacklevel=4)
                return False
            self.window = (c - 0.5, c - 0.5) if w == 1 else (c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2)
        elif function in ("LINEAR_EXACT", "SIGMOID"):
            if not w > 0:
                warnings.warn(f"{path}: WindowWidth {w} <= 0 is invalid; using a percentile window", stacklevel=4)
                return False
            # No hard window for a sigmoid; record c -/+ w/2 (where it reaches ~12 % / ~88 %).
            self.window = (c - w / 2, c + w / 2)
        else:
            warnings.warn(f"{path}: unknown VOILUTFunction {function!r}; using a percentile window", stacklevel=4)
            return False
        self.function, self.center, self.width, self.window_source = function, c, w, "dicom-window"
        return True

    def _voi(self, values: np.ndarray) -> np.ndarray:
        f = self.function
        if f == "LINEAR":
            c, w = self.center, self.width
            if w == 1:  # step at c - 0.5; the general formula would divide by zero
                return (values > c - 0.5).astype(np.float64)
            return np.clip((values - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)
        if f == "LINEAR_EXACT":
            return np.clip((values - self.center) / self.width + 0.5, 0.0, 1.0)
        if f == "SIGMOID":
            return 1.0 / (1.0 + np.exp(-4.0 * (values - self.center) / self.width))
        if f == "PERCENTILE":
            low, high = self.window
            if high <= low:  # (nearly) constant image: nothing to stretch; everything maps to black
                return np.zeros_like(values)
            return np.clip((values - low) / (high - low), 0.0, 1.0)
        # VOI LUT Sequence: indexed by integers; Modality LUT output is float when rescaled.
        low, high = self._voi_lut
        mapped = np.asarray(apply_voi(np.rint(values).astype(np.int64), self.ds, index=0), dtype=np.float64)
        return np.zeros_like(mapped) if high <= low else np.clip((mapped - low) / (high - low), 0.0, 1.0)

    def _voi_inverse(self, y: np.ndarray) -> np.ndarray:
        f = self.function
        if f == "LINEAR":
            c, w = self.center, self.width
            return np.where(y >= 0.5, c, c - 1.0) if w == 1 else (y - 0.5) * (w - 1) + c - 0.5
        if f == "LINEAR_EXACT":
            return (y - 0.5) * self.width + self.center
        if f == "SIGMOID":
            y = np.clip(y, 1e-6, 1.0 - 1e-6)
            return self.center - self.width / 4.0 * np.log(1.0 / y - 1.0)
        if f == "PERCENTILE":
            low, high = self.window
            return np.full_like(y, low) if high <= low else low + y * (high - low)
        item = self.ds.VOILUTSequence[0]
        n, first = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
        lut = _lut_data(self.ds, item)[:n]
        low, high = self._voi_lut
        return _invert_monotone(low + y * (high - low), first + np.arange(lut.size), lut, "VOI LUT", self.path)

    # --- the modality LUT -------------------------------------------------------------------------------------

    def modality(self, stored: np.ndarray) -> np.ndarray:
        try:
            return np.asarray(apply_modality_lut(stored, self.ds), dtype=np.float64)
        except Exception as e:
            raise DataError(f"{self.path}: cannot apply the DICOM Modality LUT / rescale ({type(e).__name__}: "
                            f"{' '.join(str(e).split())})") from e

    def _modality_inverse(self, values: np.ndarray) -> np.ndarray:
        ds = self.ds
        if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence) > 0:
            item = ds.ModalityLUTSequence[0]
            n, first = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
            lut = _lut_data(ds, item)[:n]
            return _invert_monotone(values, first + np.arange(lut.size), lut, "Modality LUT", self.path)
        if "RescaleSlope" not in ds or "RescaleIntercept" not in ds:  # as apply_modality_lut: both, or no rescale
            return values
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        return (values - intercept) / slope

    # --- both ways --------------------------------------------------------------------------------------------

    def to_display(self, stored: np.ndarray) -> np.ndarray:
        """Stored values -> displayed grey float64 in [0, 1] (dense is bright)."""
        grey = self._voi(self.modality(stored))
        return np.clip(1.0 - grey if self.photometric == "MONOCHROME1" else grey, 0.0, 1.0)

    def to_stored(self, grey: np.ndarray) -> np.ndarray:
        """Displayed grey in [0, 1] -> stored values (float64, not yet rounded), clipped to the stored range."""
        grey = np.clip(np.asarray(grey, np.float64), 0.0, 1.0)
        y = 1.0 - grey if self.photometric == "MONOCHROME1" else grey
        return np.clip(self._modality_inverse(self._voi_inverse(y)), self.low_stored, self.high_stored)


def write_derived(source_ds, pixels: np.ndarray, path, *, instruction: str, model: str) -> Path:
    """Write `pixels` (the input's stored dtype and shape) as a derived image of `source_ds` (see the module doc).
    The file is written to a temporary name and renamed; raises DataError when it cannot be written."""
    ds = copy.deepcopy(source_ds)
    src_class, src_instance = str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", ""))
    pixels = np.ascontiguousarray(pixels)
    if pixels.shape != (int(ds.Rows), int(ds.Columns)):
        raise ValueError(f"pixels of shape {pixels.shape} for a {ds.Rows}x{ds.Columns} DICOM")
    bits_allocated = int(ds.BitsAllocated)
    dtype = np.dtype(("i" if int(ds.get("PixelRepresentation", 0) or 0) else "u") + str(bits_allocated // 8))
    ds.PixelData = pixels.astype(dtype.newbyteorder("<")).tobytes()
    ds["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"
    ds["PixelData"].is_undefined_length = False
    for tag in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if tag in ds:
            del ds[tag]
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian

    instance = generate_uid()
    ds.SOPInstanceUID = instance
    ds.file_meta.MediaStorageSOPInstanceUID = instance
    ds.SeriesInstanceUID = generate_uid()
    ds.ImageType = ["DERIVED", "SECONDARY"]
    text = (f"Counterfactual edit by x2x-jax (InstructX2X region-specific editing): instruction \"{instruction}\"; "
            f"model {model}; pixels outside the edit mask are the source image's stored values")
    ds.DerivationDescription = text if len(text) <= DERIVATION_LIMIT else text[:DERIVATION_LIMIT - 3] + "..."
    if src_class and src_instance:
        ref = Dataset()
        ref.ReferencedSOPClassUID = src_class
        ref.ReferencedSOPInstanceUID = src_instance
        ds.SourceImageSequence = Sequence([ref])

    out = Path(path)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    try:
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, out)
    except OSError as e:
        raise DataError(f"{out}: cannot write DICOM ({type(e).__name__}: {' '.join(str(e).split())})") from e
    finally:
        tmp.unlink(missing_ok=True)
    return out
