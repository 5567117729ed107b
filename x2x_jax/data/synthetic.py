"""Procedural synthetic chest-radiograph edit pairs: the project's embedded default dataset.

Each example is a (past, current) pair of one synthetic patient, an instruction in the MIMIC-EDIT-INSTRUCTION
grammar (`x2x_jax.data.instructions`), the structured `Edit`s it says, and the ground-truth change mask. Because
we know which pixels an edit changed and which identity attributes it must keep, localization and preservation
can be measured exactly.

Conventions
-----------
* Images are PA views in radiological convention: the patient's RIGHT is on the image LEFT. Laterality words
  ("left", "right") are always the patient's side; internally side = -1 is the patient's right (image left,
  x < 0) and side = +1 the patient's left (image right, x > 0).
* Geometry lives in normalized coordinates x, y in [-1, 1] (x to the image right, y down), so the same example
  renders at any size (64 to 512 px). Only detector noise and a 0.5 px anti-alias blur are per-pixel, and lines
  thinner than ~0.6 px are widened (with their contrast lowered to match) so they survive low resolutions.
* Pixels: float32 in [-1, 1] (-1 = black = air outside the body, bright = attenuating). `to_uint8` gives 8-bit.
* Change mask: a pixel is "changed" iff the noise-free (blurred, display-mapped) renderings of the current and
  reference state differ by more than `CHANGE_THRESHOLD` (0.02, i.e. ~2.5 of 255 grey levels). The reference is
  the past finding state rendered with the current acquisition; outside the mask the current image takes the
  reference's pixels, so the edit's sub-threshold tail is cut. Both images then get the same additive noise
  realisation (truncated at 3.5 sigma, never clipped), hence with the default `jitter=False`:
  ``current == past`` bit for bit outside the mask and ``|current - past| >= CHANGE_THRESHOLD`` inside it; after
  `to_uint8` the two still differ exactly on the mask (the threshold is > 2 grey levels).
  With ``jitter=True`` the current image is a new acquisition (small shift / rotation / exposure change, fresh
  noise) and the mask still marks only the edit's change, in the current image's frame.
* Every edit is visible: a draw is rejected unless each edit, applied alone to the past state and applied on top
  of the other edit, changes >= 4 pixels at 64 px. That check always runs at 64 px, so an example's content
  (findings, edits, text, identity) is the same at every size; only the pixels are rendered at `size`.
* Findings (`SYNTH_FINDINGS`), severity -> geometry: pleural effusion (meniscus height, costophrenic blunting when
  mild), cardiomegaly (cardiothoracic ratio = baseline (0.38-0.5) + 0.07 + 0.2 x severity; `*_ctr`),
  pneumothorax (width and extent of the lucent apical/lateral rim without markings, visceral pleural line),
  consolidation (dense lobar opacity with air bronchograms; upper zone stops at the fissure), pneumonia (patchy
  airspace opacities in a zone), edema (bilateral perihilar haze + Kerley B lines), atelectasis (plate-like band
  with an elevated hemidiaphragm; lobar "sail" when severe), lung opacity (ill-defined rounded opacities).
  Levels map to continuous severities: mild 0.15-0.32, moderate 0.45-0.6, severe 0.74-0.92.

Splits and determinism
----------------------
Example ``index`` of ``split`` draws everything from ``np.random.default_rng([seed, split_id, index])`` plus
fixed sub-streams, so the bytes depend only on (seed, split, index, size, options), never on iteration order.
Every ``PAIRS_PER_PATIENT`` consecutive examples share one patient (identity from ``[seed, split_id, patient,
stream]``); patient ids carry the split name, so splits never share a patient. The pairs of one patient are
independent visits (their finding sets are drawn independently); identity and anatomy are shared.

CPU-friendly defaults: 5,000 train / 500 val / 500 test pairs at 64 px (`DEFAULT_SPLIT_SIZES`, `DEFAULT_SIZE`).

Contact sheet: ``python -m x2x_jax.data.synthetic --out /tmp/sheet.png --n 8 --size 256 --seed 0 --split train``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Iterator

import numpy as np

from x2x_jax.data import instructions
from x2x_jax.data.instructions import Edit
from x2x_jax.errors import ConfigError, cli_main

SYNTH_FINDINGS: tuple[str, ...] = (
    "pleural effusion", "cardiomegaly", "pneumothorax", "consolidation", "pneumonia", "edema", "atelectasis",
    "lung opacity",
)
assert all(f in instructions.FINDINGS for f in SYNTH_FINDINGS)

LEVELS: tuple[str, ...] = ("mild", "moderate", "severe")
# Continuous severity in (0, 1) per level word; gaps between bands keep "change" edits visible.
_LEVEL_BANDS = {"mild": (0.15, 0.32), "moderate": (0.45, 0.6), "severe": (0.74, 0.92)}
# Lateralities each finding may take (None: not lateral).
_LATERALITIES = {
    "pleural effusion": ("left", "right", "bilateral"),
    "cardiomegaly": (None,),
    "pneumothorax": ("left", "right"),
    "consolidation": ("left", "right"),
    "pneumonia": ("left", "right", "bilateral"),
    "edema": ("bilateral",),
    "atelectasis": ("left", "right", "bilateral"),
    "lung opacity": ("left", "right", "bilateral"),
}
_ZONED = ("consolidation", "pneumonia", "lung opacity")  # findings placed in a sampled upper/middle/lower zone
_FIXED_ZONE = {"pleural effusion": "lower", "atelectasis": "lower", "pneumothorax": "upper"}

SPLITS = {"train": 0, "val": 1, "test": 2}
DEFAULT_SPLIT_SIZES = {"train": 5000, "val": 500, "test": 500}
DEFAULT_SIZE = 64
PAIRS_PER_PATIENT = 2
CHANGE_THRESHOLD = 0.02
# Every edit must change at least this many pixels at _CHECK_SIZE (decided at one fixed size so that the sampled
# content of an example does not depend on the size it is rendered at).
_CHECK_SIZE = 64
_MIN_CHANGED_PIXELS = 4
_MAX_TRIES = 20
_DISPLAY_PEAK = 0.9  # clean images stay in [-0.9, 0.9]; noise <= 3.5 * 0.025 never reaches +-1
_PATIENT_STREAM, _NOISE_STREAM, _JITTER_STREAM = 0x51, 0x52, 0x53


# ----------------------------------------------------------------------------------------------------------------
# Findings and patients


@dataclasses.dataclass(frozen=True)
class Finding:
    """One finding instance. `shape_seed` fixes its shape, so a "change" edit only rescales it."""

    name: str
    level: str
    severity: float  # in (0, 1), inside `_LEVEL_BANDS[level]`
    laterality: str | None  # patient's "left" | "right" | "bilateral" | None
    zone: str | None  # "upper" | "middle" | "lower" | None
    shape_seed: int

    @property
    def sides(self) -> tuple[int, ...]:
        return {"right": (-1,), "left": (1,), "bilateral": (-1, 1)}.get(self.laterality, ())

    @property
    def location(self) -> str | None:
        """The v2 location phrase, in `instructions.LOCATION_WORDS`; None for cardiomegaly."""
        lat = self.laterality
        if lat is None:
            return None
        if self.name == "edema":
            return "bilateral perihilar"
        if self.name == "atelectasis":
            return "bibasilar" if lat == "bilateral" else f"{lat} basilar"
        if self.name in _ZONED:
            zone = "mid" if self.zone == "middle" else self.zone
            return f"bilateral {zone} lungs" if lat == "bilateral" else f"{lat} {zone} lung"
        return lat  # pleural effusion, pneumothorax: "left" / "right" / "bilateral"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "location": self.location}


def _sample_severity(rng: np.random.Generator, level: str) -> float:
    lo, hi = _LEVEL_BANDS[level]
    return float(rng.uniform(lo, hi))


def _sample_finding(rng: np.random.Generator, name: str) -> Finding:
    level = LEVELS[int(rng.integers(3))]
    lats = _LATERALITIES[name]
    laterality = lats[int(rng.integers(len(lats)))]
    zone = ("upper", "middle", "lower")[int(rng.integers(3))] if name in _ZONED else _FIXED_ZONE.get(name)
    if name == "edema":
        zone = "middle"
    return Finding(name, level, _sample_severity(rng, level), laterality, zone, int(rng.integers(2**31)))


@dataclasses.dataclass(frozen=True)
class Patient:
    """Identity attributes an edit must never change, plus the anatomy they imply."""

    patient_id: str
    age_years: float
    sex: str  # "F" | "M"
    habitus: float  # body / thorax width factor
    bone_density: float  # lower with age
    rib_spacing: float  # posterior rib pitch, normalized units; wider with age
    heart_ctr: float  # baseline cardiothoracic ratio
    breast_size: float  # 0 for "M"
    dome_right: float  # height (y) of the right hemidiaphragm dome
    dome_left: float
    aortic_knob: float  # size of the aortic knob; grows with age
    vessel_seed: int

    def attributes(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("patient_id", "vessel_seed")}


def _sample_patient(seed: int, split_id: int, patient_index: int, patient_id: str) -> Patient:
    rng = np.random.default_rng([seed, split_id, patient_index, _PATIENT_STREAM])
    age = float(rng.uniform(20.0, 90.0))
    sex = "F" if rng.random() < 0.5 else "M"
    a = (age - 55.0) / 35.0  # -1 .. 1
    habitus = float(np.clip(rng.normal(1.0, 0.05) + (0.03 if sex == "M" else -0.03), 0.85, 1.15))
    dome_right = float(rng.normal(0.43, 0.025) + 0.015 * a)
    return Patient(
        patient_id=patient_id,
        age_years=age,
        sex=sex,
        habitus=habitus,
        bone_density=float(np.clip(0.82 - 0.3 * a + rng.normal(0.0, 0.05), 0.35, 1.2)),
        rib_spacing=float(np.clip(0.125 * (1.0 + 0.07 * a) + rng.normal(0.0, 0.003), 0.11, 0.145)),
        heart_ctr=float(np.clip(rng.normal(0.44, 0.02) + 0.015 * a, 0.38, 0.5)),
        breast_size=float(rng.uniform(0.5, 1.0)) if sex == "F" else 0.0,
        dome_right=dome_right,
        dome_left=float(dome_right + rng.uniform(0.03, 0.07)),
        aortic_knob=float(np.clip(0.05 + 0.02 * a + rng.normal(0.0, 0.008), 0.025, 0.085)),
        vessel_seed=int(rng.integers(2**31)),
    )


@dataclasses.dataclass(frozen=True)
class Acquisition:
    shift_x: float
    shift_y: float
    rotation_deg: float
    exposure: float  # window level offset; higher = more exposed = darker
    contrast: float
    noise_sigma: float  # additive detector noise, [-1, 1] units
    blur: float  # Gaussian blur sigma, normalized units


def _sample_acquisition(rng: np.random.Generator) -> Acquisition:
    return Acquisition(
        shift_x=float(rng.normal(0.0, 0.02)),
        shift_y=float(rng.normal(0.0, 0.02)),
        rotation_deg=float(rng.normal(0.0, 1.5)),
        exposure=float(rng.normal(0.0, 0.05)),
        contrast=float(rng.uniform(0.85, 1.15)),
        noise_sigma=float(rng.uniform(0.006, 0.022)),
        blur=float(rng.uniform(0.002, 0.005)),
    )


def _jittered(acq: Acquisition, rng: np.random.Generator) -> Acquisition:
    return dataclasses.replace(
        acq,
        shift_x=acq.shift_x + float(rng.normal(0.0, 0.008)),
        shift_y=acq.shift_y + float(rng.normal(0.0, 0.008)),
        rotation_deg=acq.rotation_deg + float(rng.normal(0.0, 0.6)),
        exposure=acq.exposure + float(rng.normal(0.0, 0.015)),
    )


# ----------------------------------------------------------------------------------------------------------------
# Rendering primitives (pure numpy, all in normalized coordinates)


def _sig(t):
    return 0.5 * (1.0 + np.tanh(t))


class _Frame:
    """A pixel grid seen in the patient's anatomical coordinates under one acquisition's positioning."""

    def __init__(self, size: int, acq: Acquisition):
        self.size = size
        self.px = 2.0 / size  # pixel pitch in normalized units
        c = (np.arange(size) + 0.5) * self.px - 1.0
        xi, yi = np.meshgrid(c, c)
        th = math.radians(acq.rotation_deg)
        self._cos, self._sin, self._dx, self._dy = math.cos(th), math.sin(th), acq.shift_x, acq.shift_y
        u, v = xi - self._dx, yi - self._dy
        self.x = self._cos * u + self._sin * v
        self.y = -self._sin * u + self._cos * v

    def to_pixel(self, x, y):
        """Anatomical -> (row, col) pixel coordinates (floats)."""
        xi = self._cos * x - self._sin * y + self._dx
        yi = self._sin * x + self._cos * y + self._dy
        return (yi + 1.0) / self.px - 0.5, (xi + 1.0) / self.px - 0.5

    def window(self, x0, x1, y0, y1, margin):
        """Slices of the pixel grid covering the anatomical box [x0, x1] x [y0, y1] plus `margin`."""
        xs = np.array([x0 - margin, x1 + margin, x0 - margin, x1 + margin])
        ys = np.array([y0 - margin, y0 - margin, y1 + margin, y1 + margin])
        r, c = self.to_pixel(xs, ys)
        r0, r1 = max(int(np.floor(r.min())) - 1, 0), min(int(np.ceil(r.max())) + 2, self.size)
        c0, c1 = max(int(np.floor(c.min())) - 1, 0), min(int(np.ceil(c.max())) + 2, self.size)
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(r0, r1), slice(c0, c1)


def _capsules(fr: _Frame, segs, solid: bool) -> np.ndarray:
    """Max-composited tapered segments (x0, y0, x1, y1, r0, r1, amp).

    solid=False: Gaussian line profile of half-width r (vessels, septal lines); widths below 0.6 px are widened
    and dimmed to keep the line's integral. solid=True: filled capsule of radius r with a soft edge.
    """
    out = np.zeros((fr.size, fr.size))
    if not segs:
        return out
    x0, y0, x1, y1, r0, r1, amp = np.asarray(segs, np.float64).T
    rmax = np.maximum(r0, r1)
    edge = max(0.006, 0.5 * fr.px)
    if solid:
        margin = rmax + 4 * edge
    else:
        k = np.maximum(1.0, 0.6 * fr.px / rmax)
        amp, r0, r1, rmax = amp / k, r0 * k, r1 * k, rmax * k
        margin = 2.5 * rmax + fr.px
    # Pixel windows of all segments at once (positioning may rotate the box, so map its four corners).
    lo_x, hi_x = np.minimum(x0, x1) - margin, np.maximum(x0, x1) + margin
    lo_y, hi_y = np.minimum(y0, y1) - margin, np.maximum(y0, y1) + margin
    rows, cols = fr.to_pixel(np.stack([lo_x, hi_x, lo_x, hi_x]), np.stack([lo_y, lo_y, hi_y, hi_y]))
    ra = np.clip(np.floor(rows.min(0)).astype(int) - 1, 0, fr.size)
    rb = np.clip(np.ceil(rows.max(0)).astype(int) + 2, 0, fr.size)
    ca = np.clip(np.floor(cols.min(0)).astype(int) - 1, 0, fr.size)
    cb = np.clip(np.ceil(cols.max(0)).astype(int) + 2, 0, fr.size)
    dx, dy = x1 - x0, y1 - y0
    inv_len2 = 1.0 / np.maximum(dx * dx + dy * dy, 1e-12)
    for i in np.flatnonzero((ra < rb) & (ca < cb)):
        win = slice(ra[i], rb[i]), slice(ca[i], cb[i])
        px, py = fr.x[win] - x0[i], fr.y[win] - y0[i]
        t = np.clip((px * dx[i] + py * dy[i]) * inv_len2[i], 0.0, 1.0)
        d = np.hypot(px - t * dx[i], py - t * dy[i])
        r = r0[i] + (r1[i] - r0[i]) * t
        v = _sig((r - d) / edge) if solid else np.exp(-((d / r) ** 2))
        np.maximum(out[win], amp[i] * v, out=out[win])
    return out


def _value_noise(fr: _Frame, rng: np.random.Generator, freq: float) -> np.ndarray:
    """Smooth noise in [0, 1] with `freq` lattice cells per normalized unit; independent of resolution."""
    n = int(math.ceil(3.0 * freq)) + 2
    lattice = rng.random((n, n))
    gx = np.clip((fr.x + 1.5) * freq, 0.0, n - 1.001)
    gy = np.clip((fr.y + 1.5) * freq, 0.0, n - 1.001)
    ix, iy = gx.astype(np.int64), gy.astype(np.int64)
    tx, ty = gx - ix, gy - iy
    tx, ty = tx * tx * (3 - 2 * tx), ty * ty * (3 - 2 * ty)
    top = lattice[iy, ix] * (1 - tx) + lattice[iy, ix + 1] * tx
    bot = lattice[iy + 1, ix] * (1 - tx) + lattice[iy + 1, ix + 1] * tx
    return top * (1 - ty) + bot * ty


def _blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable Gaussian blur with reflected borders (explicit shifted sums: deterministic, BLAS-free)."""
    if sigma_px < 0.25:
        return img
    r = max(1, int(math.ceil(3.0 * sigma_px)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma_px) ** 2)
    k /= k.sum()
    n = img.shape[0]
    p = np.pad(img, ((r, r), (0, 0)), mode="reflect")
    img = sum(k[i] * p[i : i + n] for i in range(2 * r + 1))
    p = np.pad(img, ((0, 0), (r, r)), mode="reflect")
    return sum(k[i] * p[:, i : i + img.shape[1]] for i in range(2 * r + 1))


# ----------------------------------------------------------------------------------------------------------------
# Anatomy


def _lung_ellipse(P: Patient, side: int):
    """Centre and radii of the ellipse bounding one hemithorax (apex, lateral chest wall)."""
    w = P.habitus
    return side * 0.41 * w, 0.04, 0.41 * w, 0.78


def _heart_ellipse(P: Patient, ctr: float):
    """Tilted ellipse (cx, cy, a, b, theta) whose horizontal extent is ctr x the inner thoracic width."""
    theta = math.radians(32.0)
    ratio = 1.45
    hx_of_a = math.sqrt(math.cos(theta) ** 2 + (math.sin(theta) / ratio) ** 2)
    thorax_half = 0.82 * P.habitus
    hx = ctr * thorax_half
    hx0 = P.heart_ctr * thorax_half
    a = hx / hx_of_a
    right_border = -0.1 * P.habitus - 0.25 * (hx - hx0)  # enlargement goes mostly to the patient's left
    return right_border + hx, 0.27 + 0.35 * (hx - hx0), a, a / ratio, theta


def _vessel_segments(P: Patient):
    """Branching pulmonary vessel trees from each hilum (anatomical coordinates), fading to the periphery."""
    rng = np.random.default_rng(P.vessel_seed)
    segs = []

    def grow(x, y, phi, length, width, amp, depth, side):
        x1, y1 = x + side * length * math.cos(phi), y + length * math.sin(phi)
        segs.append((x, y, x1, y1, width, 0.8 * width, amp))
        if depth < 3:
            for k in (-1.0, 1.0):
                grow(x1, y1, phi + k * rng.uniform(0.15, 0.45), length * rng.uniform(0.7, 0.9), 0.72 * width,
                     0.72 * amp, depth + 1, side)

    for side in (-1, 1):
        hx, hy = side * 0.17 * P.habitus, -0.13 if side > 0 else -0.1
        for phi in (-1.25, -0.55, 0.2, 0.85) + rng.normal(0.0, 0.12, 4):
            x0, y0 = hx + rng.normal(0, 0.015), hy + 0.06 * math.sin(phi)
            grow(x0, y0, float(phi), rng.uniform(0.11, 0.15) * P.habitus, 0.02, 1.0, 0, side)
    return segs


def _static_layers(P: Patient, fr: _Frame) -> dict:
    """Everything no finding changes: soft tissue, bones, airway, vessels; plus per-side lung coordinates."""
    x, y, w = fr.x, fr.y, P.habitus
    # Body outline: neck, sloping shoulders, chest wall.
    sh = _sig((y + 0.8) / 0.07)
    half = w * (0.22 + (0.93 - 0.22) * sh - 0.05 * np.clip(y, 0, 1))
    edge = _sig((half - np.abs(x)) / 0.015)
    body = edge * (0.3 + 0.7 * np.clip(1 - (x / (half + 1e-6)) ** 2, 0, 1) ** 0.35)
    # Pectoral muscles and the shoulder girdle make the upper zones a little denser.
    soft = (0.95 + 0.1 * (w - 1.0)) * body * (1 + 0.1 * _sig((-0.35 - y) / 0.15))

    bd = P.bone_density
    rib_jitter = np.random.default_rng(P.vessel_seed + 2).uniform(-0.08, 0.08, 12)
    bones = np.zeros_like(x)
    # Shoulders: humeral heads at the top corners.
    for side in (-1, 1):
        d = np.hypot(x - side * 0.98 * w, (y + 0.68) * 1.1)
        bones += 0.35 * bd * _sig((0.16 - d) / 0.01) * body
    # Spine: vertebral bodies with discs, pedicles; pitch = rib pitch.
    col = _sig((0.075 * w - np.abs(x)) / 0.01)
    phase = (y + 0.77) / P.rib_spacing
    fr_ = phase - np.floor(phase)
    vert = 0.7 + 0.3 * _sig((0.4 - np.abs(fr_ - 0.5)) / 0.05)
    ped = np.exp(-(((np.abs(x) - 0.05 * w) / 0.014) ** 2 + ((fr_ - 0.35) / 0.12) ** 2))
    bones += bd * (0.14 * col * vert + 0.06 * ped)
    # Ribs. Posterior arcs start at the spine, rise to a peak, then curve down along the chest wall;
    # anterior ribs (fainter) run from the chest wall down and medially.
    for side in (-1, 1):
        s = side * x  # lateral distance on this side
        sp = P.rib_spacing
        inside = _sig((s - 0.05) / 0.01) * _sig((0.87 * w - s) / 0.02) * body
        curve = 0.8 * ((s - 0.3 * w) ** 2 - (0.3 * w) ** 2) + 1.5 * np.clip(s - 0.66 * w, 0, None) ** 2
        t = (y - curve + 0.72) / sp
        t = t + rib_jitter[np.clip(np.floor(t).astype(np.int64), 0, 11)]  # no two ribs exactly alike
        k = np.floor(t)
        f = t - k
        z = (f - 0.24) / 0.2
        rib = np.exp(-(z**4)) * (0.55 + 0.6 * z**2)  # brighter cortical margins
        rib *= _sig((k + 0.5) / 0.1) * _sig((9.5 - k) / 0.1)
        bones += 0.11 * bd * rib * inside
        s_ant = np.clip(s, 0.2 * w, None)
        curve_a = 0.62 * (0.86 * w - s_ant) - 1.6 * np.clip(s_ant - 0.72 * w, 0, None) ** 2
        ta = (y - curve_a + 0.62) / (1.25 * sp)
        fa = ta - np.floor(ta)
        ka = np.floor(ta)
        arib = np.exp(-(((fa - 0.2) / 0.12) ** 4)) * _sig((ka + 0.5) / 0.1) * _sig((6.5 - ka) / 0.1)
        bones += 0.06 * bd * arib * _sig((s - 0.3 * w) / 0.03) * inside
        # Clavicle: slightly S-shaped bar from the sternal notch up and out to the shoulder.
        u = np.clip((s - 0.06) / (0.6 * w), 0, 1)
        cy = -0.62 - 0.13 * u + 0.025 * np.sin(2 * math.pi * u)
        dcl = np.abs(y - cy)
        clav = _sig((0.032 - dcl) / 0.006) * (0.75 + 0.6 * (dcl / 0.032) ** 2)
        bones += 0.3 * bd * clav * _sig((s - 0.05) / 0.01) * _sig((0.66 * w - s) / 0.015)
        # Scapula's medial border: a faint line over the upper lateral lung.
        bx = 0.62 * w + 0.1 * (y + 0.6)
        bones += 0.06 * bd * np.exp(-(((s - bx) / 0.012) ** 2)) * _sig((y + 0.7) / 0.02) * _sig((-0.15 - y) / 0.04)
    # Breast shadows: soft tissue over the lower zones with a curved lower border.
    breast = np.zeros_like(x)
    if P.breast_size > 0:
        for side in (-1, 1):
            g = np.hypot((x - side * 0.55 * w) / (0.38 * w), (y - 0.45) / 0.3)
            breast += 0.16 * P.breast_size * np.sqrt(np.clip(1 - g * g, 0, 1)) * _sig((y - 0.1) / 0.15)
    # Airway: trachea to the carina, then the main bronchi.
    air = 0.18 * _sig((0.032 - np.abs(x - 0.005)) / 0.006) * _sig((-0.27 - y) / 0.02) * _sig((y + 1.0) / 0.05)
    air = np.maximum(air, _capsules(fr, [(0.0, -0.27, -0.15 * w, -0.12, 0.022, 0.016, 0.14),
                                         (0.0, -0.27, 0.16 * w, -0.15, 0.02, 0.014, 0.14)], solid=True))
    vessels = _capsules(fr, _vessel_segments(P), solid=False)
    texture = _value_noise(fr, np.random.default_rng(P.vessel_seed + 1), 14.0)
    hila = sum(np.exp(-(((x - s * 0.17 * w) / 0.05) ** 2 + ((y + 0.1) / 0.08) ** 2)) for s in (-1, 1))
    # Gastric air bubble under the left hemidiaphragm.
    bubble = 0.08 * _sig((1 - np.hypot((x - 0.45 * w) / 0.1, (y - P.dome_left - 0.12) / 0.06)) / 0.25)
    lungs = {}
    for side in (-1, 1):
        cx, cy, rx, ry = _lung_ellipse(P, side)
        vx, vy = side * (x - cx) / rx, (y - cy) / ry
        g = np.hypot(vx, vy)
        s = side * x
        # Mediastinal border; the aortic knob and pulmonary trunk bulge on the patient's left.
        med = 0.085 * w + 0.012 * np.clip(y + 0.3, 0, None)
        if side > 0:
            med = med + P.aortic_knob * np.exp(-(((y + 0.43) / 0.07) ** 2)) + 0.03 * np.exp(-(((y + 0.2) / 0.05) ** 2))
        hem = _sig((1.0 - g) / 0.012) * _sig((s - med) / 0.01)  # hemithorax air space above the diaphragm cut
        lungs[side] = dict(g=g, psi=np.arctan2(vx, -vy), s=s, hem=hem, depth=np.sqrt(np.clip(1 - g * g, 0, 1)))
    return dict(soft=soft + breast + 0.08 * hila * edge, bones=bones, air=air + bubble * edge, vessels=vessels,
                texture=texture, lungs=lungs, body=body)


def _dome(P: Patient, side: int, s, raise_: float):
    """Hemidiaphragm dome height y(s) along the lateral distance s (deepest at the costophrenic angle)."""
    peak = (P.dome_right if side < 0 else P.dome_left) - raise_
    return peak + 0.22 * ((s - 0.36 * P.habitus) / (0.46 * P.habitus)) ** 2


# ----------------------------------------------------------------------------------------------------------------
# Findings: each adds to `fill` (fraction of lung air replaced by fluid / tissue), `clear` (pleural air: no lung
# markings, extra lucency) or `extra` (additive attenuation of thin lines).


def _zone_centre(P: Patient, side: int, zone: str, rng: np.random.Generator):
    ys = {"upper": -0.4, "middle": -0.02, "lower": (P.dome_right if side < 0 else P.dome_left) - 0.15}
    lo, hi = (0.5, 0.6) if side > 0 and zone != "upper" else (0.38, 0.52)  # keep clear of the heart
    return side * P.habitus * rng.uniform(lo, hi), ys[zone] + rng.uniform(-0.05, 0.05)


def _blob(fr: _Frame, cx, cy, radius, edge, rng, lobes=0.12):
    """Soft irregular blob: radius modulated by a few random harmonics of the polar angle."""
    win = fr.window(cx, cx, cy, cy, 1.5 * radius + 4 * edge)
    out = np.zeros((fr.size, fr.size))
    amps, phases = rng.uniform(0, lobes, 3), rng.uniform(0, 2 * math.pi, 3)
    if win is None:
        return out
    dx, dy = fr.x[win] - cx, fr.y[win] - cy
    ang = np.arctan2(dy, dx)
    r = radius * (1 + sum(a * np.cos((k + 2) * ang + p) for k, (a, p) in enumerate(zip(amps, phases))))
    out[win] = _sig((r - np.hypot(dx, dy)) / edge)
    return out


def _add_effusion(fr, P, st, f, rng, geo, acc):
    for side in f.sides:
        L = st["lungs"][side]
        s = L["s"]
        y_cp = _dome(P, side, 0.82 * P.habitus, geo["raise"][side])  # costophrenic angle
        lat = np.clip((s - 0.1 * P.habitus) / (0.72 * P.habitus), 0, 1)
        h_lat = 0.12 + 0.8 * f.severity
        top = y_cp - h_lat + (0.16 + 0.14 * f.severity) * (1 - lat**2.5)  # meniscus: concave, rising laterally
        trans = 0.025 + 0.03 * f.severity
        # Fluid thins towards the meniscus, so density ramps up over the top ~0.1.
        acc["fill"].append(_sig((fr.y - top) / trans) * (0.75 + 0.22 * _sig((fr.y - top - 0.08) / 0.05)) * L["hem"])


def _add_pneumothorax(fr, P, st, f, rng, geo, acc):
    for side in f.sides:
        L = st["lungs"][side]
        w0 = 0.05 + 0.22 * f.severity
        psi_max = 0.5 + 1.4 * f.severity  # apical only when mild, down the lateral wall when severe
        taper = _sig((psi_max - L["psi"]) / 0.18) * _sig((L["psi"] + 0.7) / 0.15)
        wpsi = w0 * taper
        inner = 1.0 - wpsi
        rim = _sig((L["g"] - inner) / 0.006) * L["hem"] * taper
        acc["clear"].append(rim)
        # Visceral pleural line along the edge of the collapsed lung.
        lw = max(0.005, 0.6 * fr.px) / 0.6
        amp = 0.09 * min(1.0, 0.005 / (lw * 0.6))
        acc["extra"].append(amp * np.exp(-(((L["g"] - inner) * 0.6 / lw) ** 2)) * L["hem"] * _sig((wpsi - 0.02) / 0.01))


def _add_consolidation(fr, P, st, f, rng, geo, acc):
    side = f.sides[0]
    cx, cy = _zone_centre(P, side, f.zone, rng)
    radius = P.habitus * (0.08 + 0.12 * f.severity)
    fill = 0.85 * _blob(fr, cx, cy, radius, 0.02, rng, lobes=0.15)
    for _ in range(3):  # ragged margin: a few satellite patches
        a = rng.uniform(0, 2 * math.pi)
        fill = np.maximum(fill, 0.6 * _blob(fr, cx + radius * math.cos(a), cy + radius * math.sin(a),
                                            0.45 * radius, 0.025, rng, lobes=0.2))
    if f.zone == "upper":  # an upper-lobe consolidation stops at the fissure: flat, sharp lower border
        fill = fill * _sig((cy + 0.55 * radius - fr.y) / 0.006)
    # Air bronchograms: dark branching tubes inside the opacity, pointing away from the hilum.
    hx, hy = side * 0.17 * P.habitus, -0.12
    phi = math.atan2(cy - hy, side * (cx - hx))
    segs = []
    for _ in range(3):
        a = phi + rng.uniform(-0.4, 0.4)
        x0, y0 = cx - side * 0.6 * radius * math.cos(a), cy - 0.6 * radius * math.sin(a)
        segs.append((x0, y0, x0 + side * 1.2 * radius * math.cos(a), y0 + 1.2 * radius * math.sin(a),
                     0.007, 0.003, 0.45))
    fill = fill * (1 - _capsules(fr, segs, solid=False))
    acc["fill"].append(fill * (0.8 + 0.2 * _value_noise(fr, rng, 12.0)))


def _add_pneumonia(fr, P, st, f, rng, geo, acc):
    for side in f.sides:
        cx, cy = _zone_centre(P, side, f.zone, rng)
        spread = P.habitus * (0.07 + 0.1 * f.severity)
        keep = np.ones((fr.size, fr.size))
        for _ in range(4 + int(6 * f.severity)):
            bx, by = cx + rng.normal(0, spread), cy + rng.normal(0, 0.8 * spread)
            r = P.habitus * rng.uniform(0.03, 0.055) * (0.8 + f.severity)
            keep *= 1 - rng.uniform(0.45, 0.7) * _blob(fr, bx, by, r, 0.025, rng, lobes=0.2)
        acc["fill"].append((1 - keep) * (0.6 + 0.4 * _value_noise(fr, rng, 10.0)))


def _add_lung_opacity(fr, P, st, f, rng, geo, acc):
    for side in f.sides:
        cx, cy = _zone_centre(P, side, f.zone, rng)
        for _ in range(1 + int(rng.integers(2))):
            bx, by = cx + rng.normal(0, 0.04), cy + rng.normal(0, 0.04)
            r = P.habitus * (0.05 + 0.08 * f.severity) * rng.uniform(0.8, 1.1)
            blob = _blob(fr, bx, by, r, 0.03, rng, lobes=0.15)
            acc["fill"].append(rng.uniform(0.5, 0.7) * blob * (0.7 + 0.3 * _value_noise(fr, rng, 12.0)))


def _add_edema(fr, P, st, f, rng, geo, acc):
    noise = _value_noise(fr, rng, 9.0)
    for side in (-1, 1):
        L = st["lungs"][side]
        hx, hy = side * 0.17 * P.habitus, -0.08
        d = np.hypot((fr.x - hx) / 1.3, (fr.y - hy) / 1.0)  # "bat wing": wider than tall
        r = 0.12 + 0.14 * f.severity
        acc["fill"].append((0.3 + 0.45 * f.severity) * np.exp(-((d / r) ** 2)) * (0.55 + 0.45 * noise) * L["hem"])
        # Kerley B lines: short horizontal septal lines meeting the lateral pleura at the bases.
        cx, cy, rx, ry = _lung_ellipse(P, side)
        y_cp = _dome(P, side, 0.82 * P.habitus, geo["raise"][side])
        segs = []
        for y in rng.uniform(y_cp - 0.3, y_cp - 0.06, 2 + int(8 * f.severity)):
            xe = cx + side * rx * math.sqrt(max(0.0, 1 - ((y - cy) / ry) ** 2)) - side * 0.008
            segs.append((xe, y, xe - side * P.habitus * rng.uniform(0.035, 0.07), y, 0.005, 0.004, 0.2))
        acc["extra"].append(_capsules(fr, segs, solid=False) * L["hem"])


def _add_atelectasis(fr, P, st, f, rng, geo, acc):
    for side in f.sides:
        peak = (P.dome_right if side < 0 else P.dome_left) - geo["raise"][side]
        cx = side * P.habitus * (rng.uniform(0.48, 0.58) if side > 0 else rng.uniform(0.38, 0.52))
        cy = peak - rng.uniform(0.1, 0.18)
        half = P.habitus * (0.08 + 0.1 * f.severity)
        tilt = rng.uniform(-0.2, 0.15)
        th = 0.006 + 0.014 * f.severity
        segs = [(cx - half * math.cos(tilt), cy - side * half * math.sin(tilt),
                 cx + half * math.cos(tilt), cy + side * half * math.sin(tilt), th, 0.7 * th, 0.55)]
        if f.severity > 0.65:  # lobar collapse: a triangular paracardiac opacity from the hilum to the diaphragm
            segs.append((side * 0.16 * P.habitus, -0.06, side * 0.3 * P.habitus, peak + 0.06, 0.005, 0.1, 0.45))
        acc["fill"].append(_capsules(fr, segs, solid=True))


_FINDING_RENDERERS = {
    "pleural effusion": _add_effusion,
    "pneumothorax": _add_pneumothorax,
    "consolidation": _add_consolidation,
    "pneumonia": _add_pneumonia,
    "lung opacity": _add_lung_opacity,
    "edema": _add_edema,
    "atelectasis": _add_atelectasis,
    "cardiomegaly": None,  # changes the heart geometry in `_render_clean`
}


def _cardiac_ctr(P: Patient, findings) -> float:
    for f in findings:
        if f.name == "cardiomegaly":
            return P.heart_ctr + 0.07 + 0.2 * f.severity
    return P.heart_ctr


def _render_clean(P: Patient, acq: Acquisition, fr: _Frame, st: dict, findings) -> np.ndarray:
    """Noise-free display image in [-0.9, 0.9] of patient P with `findings`."""
    x, y = fr.x, fr.y
    # Volume loss of atelectasis raises the hemidiaphragm.
    raise_ = {-1: 0.0, 1: 0.0}
    for f in findings:
        if f.name == "atelectasis":
            for side in f.sides:
                raise_[side] += 0.02 + 0.07 * f.severity
    geo = {"raise": raise_}

    cx, cy, a, b, th = _heart_ellipse(P, _cardiac_ctr(P, findings))
    u = (x - cx) * math.cos(th) + (y - cy) * math.sin(th)
    v = -(x - cx) * math.sin(th) + (y - cy) * math.cos(th)
    heart = _sig((1 - np.hypot(u / a, v / b)) / 0.025)

    acc = {"fill": [], "clear": [], "extra": []}
    for f in findings:
        fn = _FINDING_RENDERERS[f.name]
        if fn is not None:
            fn(fr, P, st, f, np.random.default_rng(f.shape_seed), geo, acc)
    fill = 1 - np.prod([1 - np.clip(v_, 0, 1) for v_ in acc["fill"]], axis=0) if acc["fill"] else 0.0
    clear = np.clip(sum(acc["clear"]), 0, 1) if acc["clear"] else 0.0

    lung_air = np.zeros_like(x)
    lung_mask = np.zeros_like(x)
    for side in (-1, 1):
        L = st["lungs"][side]
        m = L["hem"] * _sig((_dome(P, side, L["s"], raise_[side]) - y) / 0.012)
        lung_mask += m
        lung_air += m * (0.45 + 0.55 * L["depth"])
    behind_heart = 1 - 0.9 * heart
    tissue = (1 - fill) * (1 - clear)  # where lung markings are visible
    A = (st["soft"] + st["bones"] - st["air"]
         - 0.6 * lung_air * behind_heart * (1 - fill) - 0.12 * lung_mask * clear
         + (0.16 * st["vessels"] + 0.06 * st["texture"]) * lung_mask * behind_heart * tissue
         + (sum(acc["extra"]) if acc["extra"] else 0.0))
    img = _DISPLAY_PEAK * np.tanh(2.0 * acq.contrast * (A - 0.6 - acq.exposure))
    return _blur(img, math.hypot(acq.blur / fr.px, 0.5))  # acquisition blur + pixel integration (anti-alias)


# ----------------------------------------------------------------------------------------------------------------
# Edits


def _sample_edits(rng: np.random.Generator, past: tuple[Finding, ...], v2: bool):
    """1-2 edits on distinct findings. Returns (edits, steps); a step is (name, new Finding or None = removed)."""
    current = {f.name: f for f in past}
    edits, steps = [], []
    for _ in range(1 if rng.random() < 0.7 else 2):
        touched = {name for name, _ in steps}
        absent = [n for n in SYNTH_FINDINGS if n not in current and n not in touched]
        present = [n for n in current if n not in touched]
        ops = (["add"] if absent else []) + (["remove", "change"] if present else [])
        op = ops[int(rng.integers(len(ops)))]
        if op == "add":
            name = absent[int(rng.integers(len(absent)))]
            new = _sample_finding(rng, name)
            edits.append(Edit("add", (name,), new.level if v2 else None, new.location if v2 else None))
        else:
            name = present[int(rng.integers(len(present)))]
            old = current[name]
            if op == "remove":
                new = None
                edits.append(Edit("remove", (name,), old.level if v2 else None, old.location if v2 else None))
            else:
                level = [lv for lv in LEVELS if lv != old.level][int(rng.integers(2))]
                new = dataclasses.replace(old, level=level, severity=_sample_severity(rng, level))
                edits.append(Edit("change", (name,), location=old.location if v2 else None,
                                  level_from=old.level, level_to=level))
        steps.append((name, new))
        current = _apply(current.values(), [(name, new)])
        current = {f.name: f for f in current}
    # v1 sometimes names two findings in one sentence: "Add the findings of edema and pneumonia."
    if not v2 and len(edits) == 2 and edits[0].op == edits[1].op != "change" and rng.random() < 0.5:
        edits = [Edit(edits[0].op, edits[0].findings + edits[1].findings)]
    return tuple(edits), steps


def _apply(findings, steps) -> tuple[Finding, ...]:
    """`findings` with the edit steps applied, in SYNTH_FINDINGS order."""
    state = {f.name: f for f in findings}
    for name, new in steps:
        state.pop(name, None)
        if new is not None:
            state[name] = new
    return tuple(state[n] for n in SYNTH_FINDINGS if n in state)


class _View:
    """One patient under one acquisition at one size; memoizes the static layers and the clean renders."""

    def __init__(self, P: Patient, acq: Acquisition, size: int):
        self.P, self.acq, self.frame = P, acq, _Frame(size, acq)
        self._static: dict | None = None
        self._renders: dict[tuple[Finding, ...], np.ndarray] = {}

    def render(self, findings) -> np.ndarray:
        key = tuple(findings)
        if key not in self._renders:
            if self._static is None:
                self._static = _static_layers(self.P, self.frame)
            self._renders[key] = _render_clean(self.P, self.acq, self.frame, self._static, key)
        return self._renders[key]


def _edits_visible(view: _View, past, steps) -> bool:
    """Every step changes >= _MIN_CHANGED_PIXELS pixels, applied alone to the past state and applied last (on top
    of the other step), so that no edit hides under another (an opacity removed under a new effusion)."""

    def visible(a, b):
        return int((np.abs(view.render(a) - view.render(b)) > CHANGE_THRESHOLD).sum()) >= _MIN_CHANGED_PIXELS

    current = _apply(past, steps)
    for k, step in enumerate(steps):
        others = steps[:k] + steps[k + 1:]
        if not visible(past, _apply(past, [step])):
            return False
        if others and not visible(_apply(past, others), current):
            return False
    return True


def _label_arrays(findings) -> dict:
    labels = np.zeros(len(SYNTH_FINDINGS), np.uint8)
    levels = np.zeros(len(SYNTH_FINDINGS), np.int8)  # 0 absent, 1 mild, 2 moderate, 3 severe
    severity = np.zeros(len(SYNTH_FINDINGS), np.float32)
    laterality = np.zeros(len(SYNTH_FINDINGS), np.int8)  # 0 n/a, 1 right, 2 left, 3 bilateral (patient's)
    for f in findings:
        i = SYNTH_FINDINGS.index(f.name)
        labels[i], levels[i], severity[i] = 1, LEVELS.index(f.level) + 1, f.severity
        laterality[i] = {None: 0, "right": 1, "left": 2, "bilateral": 3}[f.laterality]
    return dict(labels=labels, levels=levels, severity=severity, laterality=laterality)


def _split_id(split: str) -> int:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    return SPLITS[split]


def generate_example(seed: int, index: int, size: int = DEFAULT_SIZE, v2: bool = False, *, split: str = "train",
                     jitter: bool = False) -> dict:
    """One (past, current) edit pair. See the module docstring for conventions.

    Returns a dict with keys:
      example_id, patient_id (str); split (str); index (int)
      past, current: float32 (size, size) in [-1, 1]; mask: bool (size, size), the changed pixels
      instruction (str); edits (tuple[Edit, ...])
      identity (dict: age_years, sex, habitus, bone_density, rib_spacing, heart_ctr, breast_size, dome_right,
        dome_left, aortic_knob); acquisition, acquisition_current (dict: positioning, exposure, contrast, noise, blur)
      past_findings, current_findings (tuple of Finding dicts: name, level, severity, laterality, zone, location)
      past_labels / current_labels (uint8 multi-hot over SYNTH_FINDINGS), *_levels (int8 0..3), *_severity
        (float32), *_laterality (int8 0 n/a, 1 right, 2 left, 3 bilateral); past_ctr, current_ctr (float)
    """
    split_id = _split_id(split)
    if not 16 <= int(size) <= 2048:
        raise ConfigError(f"size must be in [16, 2048], got {size}")
    if index < 0:
        raise ConfigError(f"index must be >= 0, got {index}")
    size = int(size)
    patient_index = index // PAIRS_PER_PATIENT
    P = _sample_patient(seed, split_id, patient_index, f"{split}-p{patient_index:07d}")
    rng = np.random.default_rng([seed, split_id, index])
    acq = _sample_acquisition(rng)
    view = _View(P, acq, size)
    check = view if size == _CHECK_SIZE else _View(P, acq, _CHECK_SIZE)
    for _ in range(_MAX_TRIES):
        n_past = int(rng.choice(3, p=[0.3, 0.45, 0.25]))
        names = sorted(rng.permutation(len(SYNTH_FINDINGS))[:n_past])
        past = tuple(_sample_finding(rng, SYNTH_FINDINGS[i]) for i in names)
        edits, steps = _sample_edits(rng, past, v2)
        if _edits_visible(check, past, steps):
            break
    else:  # ~0.3% of draws are rejected, so this never happens in practice
        raise RuntimeError(f"no visible edit after {_MAX_TRIES} draws (seed={seed}, split={split}, index={index})")
    current = _apply(past, steps)
    text = instructions.render(edits)

    acq_cur = acq
    cur_view = view
    if jitter:
        acq_cur = _jittered(acq, np.random.default_rng([seed, split_id, index, _JITTER_STREAM]))
        cur_view = _View(P, acq_cur, size)
    clean_past = view.render(past)
    ref = cur_view.render(past)  # the past state in the current acquisition (== clean_past without jitter)
    clean_cur = cur_view.render(current)
    mask = np.abs(clean_cur - ref) > CHANGE_THRESHOLD
    clean_cur = np.where(mask, clean_cur, ref)

    nrng = np.random.default_rng([seed, split_id, index, _NOISE_STREAM])
    noise = _detector_noise(nrng, size, acq.noise_sigma)
    if jitter:
        noise_cur = _detector_noise(nrng, size, acq_cur.noise_sigma)
    else:
        noise_cur = noise
    past_img = (clean_past + noise).astype(np.float32)
    cur_img = (clean_cur + noise_cur).astype(np.float32)

    pl, cl = _label_arrays(past), _label_arrays(current)
    return {
        "example_id": f"synth-{split}-s{seed}-{index:07d}",
        "patient_id": P.patient_id,
        "split": split,
        "index": int(index),
        "past": past_img,
        "current": cur_img,
        "mask": mask,
        "instruction": text,
        "edits": edits,
        "identity": P.attributes(),
        "acquisition": dataclasses.asdict(acq),
        "acquisition_current": dataclasses.asdict(acq_cur),
        "past_findings": tuple(f.to_dict() for f in past),
        "current_findings": tuple(f.to_dict() for f in current),
        **{f"past_{k}": v for k, v in pl.items()},
        **{f"current_{k}": v for k, v in cl.items()},
        "past_ctr": _cardiac_ctr(P, past),
        "current_ctr": _cardiac_ctr(P, current),
    }


def _detector_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """White plus slightly correlated Gaussian noise, truncated at 3.5 sigma so no pixel ever clips."""
    white = rng.standard_normal((size, size))
    corr = _blur(rng.standard_normal((size, size)), 1.0)
    corr /= 0.28  # unit variance again after a sigma = 1 px blur
    return sigma * np.clip(0.85 * white + 0.53 * corr, -3.5, 3.5)


def iterate_split(split: str, num_examples: int | None = None, size: int = DEFAULT_SIZE, seed: int = 0,
                  v2: bool = False, *, jitter: bool = False) -> Iterator[dict]:
    """Yields examples 0..num_examples-1 of `split` (default count: `DEFAULT_SPLIT_SIZES[split]`)."""
    _split_id(split)
    n = DEFAULT_SPLIT_SIZES[split] if num_examples is None else int(num_examples)
    for i in range(n):
        yield generate_example(seed, i, size, v2, split=split, jitter=jitter)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """[-1, 1] float -> uint8 (round to nearest)."""
    return np.round((np.clip(img, -1, 1) + 1) * 127.5).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Contact sheet


def contact_sheet(examples, text: bool = True):
    """PIL image: one row per example, past | current | current with the mask in red; instruction underneath."""
    from PIL import Image, ImageDraw, ImageFont

    examples = list(examples)
    size = examples[0]["past"].shape[0]
    font = ImageFont.load_default(size=max(10, size // 16)) if text else None
    line_h = (max(10, size // 16) + 4) if text else 0
    chars = max(20, int(3 * size / (0.55 * max(10, size // 16))))
    rows = []
    for ex in examples:
        past, cur = to_uint8(ex["past"]), to_uint8(ex["current"])
        over = np.stack([cur] * 3, -1).astype(np.float32)
        m = ex["mask"]
        over[m] = 0.55 * over[m] + 0.45 * np.array([255, 0, 0], np.float32)
        strip = np.concatenate([np.stack([past] * 3, -1), np.stack([cur] * 3, -1), over.astype(np.uint8)], 1)
        lines = _wrap(f"{ex['example_id']}: {ex['instruction']}", chars) if text else []
        canvas = Image.new("RGB", (3 * size, size + line_h * len(lines) + (4 if text else 0)), "white")
        canvas.paste(Image.fromarray(strip), (0, 0))
        draw = ImageDraw.Draw(canvas)
        for k, ln in enumerate(lines):
            draw.text((4, size + 2 + k * line_h), ln, fill="black", font=font)
        rows.append(canvas)
    sheet = Image.new("RGB", (3 * size, sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height
    return sheet


def _wrap(s: str, width: int) -> list[str]:
    lines, cur = [], ""
    for word in s.split():
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}".strip()
    return lines + ([cur] if cur else [])


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m x2x_jax.data.synthetic",
                                 description="Render a contact sheet of synthetic edit pairs (past | current | mask).")
    ap.add_argument("--out", required=True, help="output PNG path")
    ap.add_argument("--num-examples", "--n", dest="n", type=int, default=8, help="number of examples (rows)")
    ap.add_argument("--size", type=int, default=128, help="image size in pixels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="train", choices=sorted(SPLITS))
    ap.add_argument("--start", type=int, default=0, help="first example index")
    ap.add_argument("--v2", action="store_true", help="v2 instructions (severity and location words)")
    ap.add_argument("--jitter", action="store_true", help="re-acquire the current image with small jitter")
    args = ap.parse_args(argv)
    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    exs = [generate_example(args.seed, args.start + i, args.size, args.v2, split=args.split, jitter=args.jitter)
           for i in range(args.n)]
    contact_sheet(exs).save(args.out)
    print(f"wrote {args.out} ({args.n} examples at {args.size} px)")


if __name__ == "__main__":
    main()
