"""Anatomical priors M_pseudo for Region-Specific Editing: where on a PA chest radiograph a finding can appear.

Region-Specific Editing forms the guidance map G = M_pseudo * R (R: the UNet relevance map in [0, 1]) and edits
where G >= tau (tau = 0.1 by default). This module gives M_pseudo for the findings an instruction names.

Coordinates and conventions
---------------------------
* Every shape is defined in normalized image coordinates: x (u here) in [0, 1] from the image's left edge to its
  right edge, y (v here) in [0, 1] from the top edge to the bottom edge. Masks are rendered at any (H, W) by
  sampling at pixel centres ((j + 0.5) / W, (i + 0.5) / H), so the same prior renders at 64 or 1024 px. For a
  letterboxed ("pad") model input, render the prior for the content box and pad it the same way.
* PA view, radiological convention: the image's LEFT half is the patient's RIGHT side. "left" / "right" in
  instructions and in region names (``lung_left``) always mean the patient's side: ``lung_left`` lies in the
  image's right half (u > 0.5).
* The geometry is that of an average adult PA film, made slightly generous so that normal variation (habitus,
  diaphragm height, positioning) stays inside; it is aligned with the phantom of `x2x_jax.data.synthetic`
  (lung fields u in [0.04, 0.96], apices at v ~ 0.12, hemidiaphragm domes at v ~ 0.75-0.78 (the lowest
  plausible: the lung bases are generous), costophrenic angles around (0.13 | 0.87, 0.82), a normal heart
  centred near (0.63, 0.64) with its long axis tilted 32 degrees).
* Shapes are signed-distance fields (polygons, capsules, curves; negative inside), combined with min / max and
  offset for dilation / erosion (that is how the pleural-margin band is made). A rendered region is
  clip(0.5 - d / EDGE, 0, 1): 1 inside, 0 outside, a linear ramp EDGE = 0.02 (normalized units) wide across the
  border. Rendered masks are cached per (region, H, W) and returned read-only.
* Regions (`REGIONS`, rendered by `region_mask`; lateral ones also as ``<name>_left`` / ``<name>_right``): lung,
  pleural_margin, costophrenic_angle, hilum, perihilar, ribs, chest_wall, clavicle, diaphragm, upper_abdomen
  (lateral); heart, cardiac_envelope, cardiac_border, mediastinum, mediastinum_wide, anterior_mediastinum,
  hiatal (lower mediastinum / retrocardiac), aortic_knob, aortic_arch, descending_aorta(_envelope),
  thoracic_aorta(_envelope), spine, paraspinal, gastric (left upper quadrant / gastric bubble), thorax.
  Lung zones (upper / middle / lower, apices, bases, perihilar, retrocardiac): `lung_zone_mask`.

Weights
-------
A prior is a float32 (H, W) map in [0, 1], the elementwise max of weighted regions. Weight 1 marks a finding's
primary region; CONTEXT_WEIGHT = 0.5 marks context where the finding can extend (a large effusion rising into
the middle zone, the whole hemithorax of a pneumothorax). Since G = prior * R >= tau, a context pixel needs
R >= 2 tau instead of tau, and a pixel with prior 0 is never edited. Several findings (or edits) -> elementwise
max of their priors.

Findings -> regions (primary at weight 1; [context] at weight 0.5; zone mode, see "Refinement")
-----------------------------------------------------------------------------------------------
====================================== ============================================================ ==========
finding                                regions                                                      zone words
====================================== ============================================================ ==========
pleural effusion                       costophrenic angles, lower lung zones, pleural margins;      emphasis
                                       [middle lung zones] (large effusions rise)
atelectasis                            lower lung zones; [lung fields, diaphragm band] (volume      emphasis
                                       loss raises the hemidiaphragm, a lobe collapses to the hilum)
cardiomegaly                           cardiac envelope (silhouette + room to enlarge, mostly to    n/a
                                       the patient's left and inferiorly)
enlargement of the cardiac silhouette  cardiac envelope                                             n/a
edema                                  perihilar lung, hila; [lung fields]                          emphasis
hernia                                 hiatal / retrocardiac region, upper abdomen                  n/a
vascular congestion                    hila, perihilar lung                                         emphasis
hilar congestion                       hila, perihilar lung                                         emphasis
pneumothorax                           apices, pleural margins; [lung fields] (collapse)            emphasis
heart failure                          cardiac envelope, hila, perihilar lung; [lung fields,        emphasis
                                       costophrenic angles] (congestion, edema, effusions)
lung opacity                           lung fields                                                  restrict
pneumonia                              lung fields                                                  restrict
tortuosity of the descending aorta     descending aorta envelope, aortic knob                       n/a
scoliosis                              paraspinal column (spine +- 0.1)                             n/a
gastric distention                     gastric region (left upper quadrant); [upper abdomen]        n/a
hypoxemia                              lung fields (no focal correlate)                             emphasis
hypertensive heart disease             cardiac envelope; [thoracic aorta envelope]                  n/a
hematoma                               chest wall, widened mediastinum                              restrict
tortuosity of the thoracic aorta       thoracic aorta envelope (ascending, arch, knob, descending)  n/a
contusion                              lung fields                                                  restrict
emphysema                              lung fields; [diaphragm band] (flattening)                   emphasis
granuloma                              lung fields, hila                                            restrict
calcification                          lung fields, hila, aortic knob                               restrict
pleural thickening                     pleural margins, costophrenic angles                         restrict
thymoma                                anterior / upper mediastinum (with room to bulge)            n/a
blunting of the costophrenic angle     costophrenic angles                                          n/a
consolidation                          lung fields                                                  restrict
fracture                               ribs (rib cage), clavicles, spine                            restrict
pneumomediastinum                      widened mediastinum; [cardiac border]                        n/a
air collection                         pleural margins, apices, upper abdomen (subdiaphragmatic)    restrict
infection                              lung fields                                                  restrict
====================================== ============================================================ ==========

Refinement by the location words of an edit (``Edit.location``, via `instructions.location_sides/_zones`)
--------------------------------------------------------------------------------------------------------
* Side: a location naming exactly one side replaces every lateral region (lungs, pleura, costophrenic angles,
  hila, ribs, clavicles, chest wall, hemidiaphragms, upper abdomen) by that side's half, cut hard at the midline
  (u = 0.5): the patient's left keeps u > 0.5, the right u < 0.5. Midline regions (heart, mediastinum, aorta,
  spine, hiatal and gastric regions) are never side-restricted. "bilateral" / "both" / plural nouns ("lungs")
  keep both sides.
* Zones: upper / middle / lower / apical / basal are vertical bands with soft borders (ZONE_RAMP = 0.08 wide;
  the bands overlap: lobes overlap on a frontal projection, zone words are fuzzy, and the relevance map does the
  fine localization): upper v <= 0.46, middle 0.32-0.64, lower v >= 0.46, apical v <= 0.28, basal v >= 0.56
  (weight 0.5 at the stated border, 0 at ZONE_RAMP / 2 beyond it). perihilar and retrocardiac are areas (around
  the hila; the dilated cardiac silhouette plus the hiatal region). Several zone words -> union of their areas.
  How a finding uses them is its zone mode:
    - restrict (focal findings): its zonable regions (lungs, pleural margins, ribs, chest wall, perihilar lung)
      are intersected with the named zones, at the best weight the region has in the finding (a default zone,
      e.g. the apices of an air collection, is replaced by the named zones); other regions are kept.
    - emphasis (diffuse findings, or findings whose effect is not confined to the named zone: effusion layers
      with gravity, a pneumothorax collapses the whole lung, atelectasis pulls the hemidiaphragm and fissures,
      edema is diffuse): the named zones of the lung fields are added at weight 1; nothing is removed.
    - n/a (cardiac, mediastinal, aortic, skeletal, abdominal findings): zone words are noted and ignored.
  "medial" / "lateral" are not used; an edit that has them gets a warning.
Every refinement applied (or ignored) is listed in `PriorInfo.refinements`.

Fallbacks (never silent)
------------------------
No recognised finding (empty edits, an unparseable instruction), a finding without a prior, text the parser could
not read (`ParsedInstruction.unparsed` / `unknown_findings`: it may name a region we cannot place), or a prior
that refinement left empty -> the whole image (all ones), `PriorInfo.whole_image = True` and a warning.

MS-CXR priors
-------------
`priors_from_ms_cxr` builds the priors of the original InstructX2X: the union of all MS-CXR bounding boxes of a
category over PA views, rendered at (H, W). Pass the result as ``table=`` to `prior_for_edits` /
`prior_for_instruction`; findings it lacks keep the built-in prior (noted in the info).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np

from x2x_jax.data import instructions
from x2x_jax.data.instructions import FINDINGS, Edit, ParsedInstruction
from x2x_jax.errors import ConfigError, DataError

EDGE = 0.02  # width of the soft border of a rendered region (normalized units)
ZONE_RAMP = 0.08  # width of the soft border of a zone band
CONTEXT_WEIGHT = 0.5
SIDES = ("left", "right")  # the patient's
ZONES = ("upper", "middle", "lower", "apical", "basal", "retrocardiac", "perihilar")

# --- signed-distance fields ---------------------------------------------------------------------------------------
# A field maps (u, v) arrays to signed distances (negative inside), in normalized units.

Field = Callable[[np.ndarray, np.ndarray], np.ndarray]
_FAR = 1.0  # any distance beyond the largest offset / border we ever use
_CULL = 0.25  # polygons compute exact distances only within their bounding box grown by this


def _polygon(points) -> Field:
    """Exact signed distance to a closed polygon (even-odd rule for the inside)."""
    pts = np.asarray(points, np.float64)
    lo, hi = pts.min(0) - _CULL, pts.max(0) + _CULL

    def field(u, v):
        out = np.full(u.shape, _FAR)
        near = (u >= lo[0]) & (u <= hi[0]) & (v >= lo[1]) & (v <= hi[1])
        pu, pv = u[near], v[near]
        d2 = np.full(pu.shape, np.inf)
        sign = np.ones(pu.shape)
        for (au, av), (bu, bv) in zip(pts, np.roll(pts, 1, axis=0)):
            eu, ev = bu - au, bv - av
            wu, wv = pu - au, pv - av
            t = np.clip((wu * eu + wv * ev) / max(eu * eu + ev * ev, 1e-18), 0.0, 1.0)
            np.minimum(d2, (wu - t * eu) ** 2 + (wv - t * ev) ** 2, out=d2)
            # Crossing test of a ray from the point; flips the sign once per crossed edge.
            c1, c2, c3 = pv >= av, pv < bv, eu * wv > ev * wu
            sign[(c1 & c2 & c3) | (~c1 & ~c2 & ~c3)] *= -1.0
        out[near] = sign * np.sqrt(d2)
        return out

    return field


def _ellipse_points(cu, cv, ru, rv, tilt_deg=0.0, n=96):
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    c, s = math.cos(math.radians(tilt_deg)), math.sin(math.radians(tilt_deg))
    x, y = ru * np.cos(t), rv * np.sin(t)
    return np.stack([cu + c * x - s * y, cv + s * x + c * y], -1)


def _ellipse(cu, cv, ru, rv, tilt_deg=0.0) -> Field:
    """An ellipse (as a 96-gon: its distances are exact to ~5e-4 of the radius)."""
    return _polygon(_ellipse_points(cu, cv, ru, rv, tilt_deg))


def _capsule(points, radius) -> Field:
    """Everything within `radius` of a polyline."""
    pts = np.asarray(points, np.float64)

    def field(u, v):
        d2 = np.full(u.shape, np.inf)
        for (au, av), (bu, bv) in zip(pts[:-1], pts[1:]):
            eu, ev = bu - au, bv - av
            wu, wv = u - au, v - av
            t = np.clip((wu * eu + wv * ev) / max(eu * eu + ev * ev, 1e-18), 0.0, 1.0)
            np.minimum(d2, (wu - t * eu) ** 2 + (wv - t * ev) ** 2, out=d2)
        return np.sqrt(d2) - radius

    return field


def _above(curve: Callable[[np.ndarray], np.ndarray], slope: Callable[[np.ndarray], np.ndarray]) -> Field:
    """The region above (smaller v than) the graph v = curve(u); distance to first order in the slope."""
    return lambda u, v: (v - curve(u)) / np.sqrt(1.0 + slope(u) ** 2)


def _below(curve, slope) -> Field:
    above = _above(curve, slope)
    return lambda u, v: -above(u, v)


def _union(*fields: Field) -> Field:
    return lambda u, v: functools.reduce(np.minimum, (f(u, v) for f in fields))


def _intersect(*fields: Field) -> Field:
    return lambda u, v: functools.reduce(np.maximum, (f(u, v) for f in fields))


def _grow(f: Field, d: float) -> Field:
    """Dilate by d (erode for d < 0)."""
    return lambda u, v: f(u, v) - d


def _band(f: Field, outside: float, inside: float) -> Field:
    """The band from `inside` within the border of f to `outside` beyond it."""
    return lambda u, v: np.maximum(f(u, v) - outside, -(f(u, v) + inside))


# --- anatomy ----------------------------------------------------------------------------------------------------
# Lateral structures are functions of the patient's side, written in terms of the lateral distance from the
# midline a = sgn * (u - 0.5) (sgn = +1 for the patient's left = image right), so asymmetries (the left
# hemidiaphragm lower than the right) stay explicit.


def _sgn(side: str) -> float:
    return 1.0 if side == "left" else -1.0


_DOME = {"right": 0.755, "left": 0.78}  # lowest plausible dome heights (generous lung bases)
_DOME_HIGH = {"right": 0.69, "left": 0.71}  # highest plausible domes: where the upper abdomen may start
_CP_V = {"right": 0.81, "left": 0.825}  # costophrenic angles


def _diaphragm(side: str, peak: float) -> tuple[Callable, Callable]:
    """The hemidiaphragm as v(u): a parabola, highest ~0.18 from the midline, 0.11 lower at the lateral wall."""
    sgn = _sgn(side)

    def curve(u):
        a = sgn * (u - 0.5)
        return peak + 0.11 * ((a - 0.18) / 0.23) ** 2

    def slope(u):
        a = sgn * (u - 0.5)
        return 0.22 * (a - 0.18) / 0.23**2

    return curve, slope


def _hemithorax(side: str) -> Field:
    """The hemithorax ellipse: apex to costophrenic recess, midline to the lateral chest wall."""
    sgn = _sgn(side)
    return _ellipse(0.5 + sgn * 0.225, 0.52, 0.235, 0.405)


def _midline_cut(side: str, a_min: float) -> Field:
    """{a >= a_min} on `side` (a half-plane)."""
    sgn = _sgn(side)
    return lambda u, v: a_min - sgn * (u - 0.5)


def _lung(side: str) -> Field:
    return _intersect(_hemithorax(side), _midline_cut(side, 0.04), _above(*_diaphragm(side, _DOME[side])))


def _pleural_margin(side: str) -> Field:
    # Only the costal, apical and diaphragmatic pleura: the outer boundary is the ellipse and the dome, so the
    # straight mediastinal cut of the lung field is not a margin.
    outer = _intersect(_hemithorax(side), _above(*_diaphragm(side, _DOME[side])))
    return _intersect(_band(outer, 0.025, 0.05), _midline_cut(side, 0.04 - 0.025))


def _costophrenic_angle(side: str) -> Field:
    sgn = _sgn(side)
    return _ellipse(0.5 + sgn * 0.37, _CP_V[side], 0.09, 0.08)


def _hilum(side: str) -> Field:
    sgn = _sgn(side)
    return _ellipse(0.5 + sgn * 0.09, 0.445, 0.055, 0.075)


def _perihilar_area(side: str) -> Field:
    sgn = _sgn(side)
    return _union(_ellipse(0.5 + sgn * 0.13, 0.46, 0.13, 0.17), _hilum(side))


def _ribs(side: str) -> Field:
    return _grow(_hemithorax(side), 0.03)


def _chest_wall(side: str) -> Field:
    # Soft tissue and ribs along the lateral and apical thorax (not the mediastinal side).
    return _intersect(_band(_hemithorax(side), 0.07, 0.03), _midline_cut(side, 0.1))


def _clavicle(side: str) -> Field:
    sgn = _sgn(side)
    t = np.linspace(0.0, 1.0, 12)
    a = 0.03 + 0.30 * t
    v = 0.19 - 0.065 * t + 0.0125 * np.sin(2 * math.pi * t)  # slightly S-shaped, rising laterally
    return _capsule(np.stack([0.5 + sgn * a, v], -1), 0.03)


def _upper_abdomen(side: str) -> Field:
    sgn = _sgn(side)
    curve, slope = _diaphragm(side, _DOME_HIGH[side])
    return _intersect(_below(curve, slope), _midline_cut(side, -0.02), lambda u, v: sgn * (u - 0.5) - 0.45)


# Midline structures.


def _heart(ctr: float, habitus: float) -> Field:
    """The cardiac silhouette of cardiothoracic ratio `ctr` in a thorax `habitus` x the average width: an
    ellipse tilted 32 degrees (base up and to the patient's right, apex down and to the left) whose right border
    moves little as the heart enlarges, so it grows mostly to the patient's left and downwards."""
    thorax_half = 0.41 * habitus  # half the inner thoracic width
    half = ctr * thorax_half  # half the heart's horizontal extent
    grown = half - 0.44 * thorax_half  # growth over an average heart
    tilt, ratio = math.radians(32.0), 1.45
    ru = half / math.hypot(math.cos(tilt), math.sin(tilt) / ratio)
    right_border = 0.5 - 0.05 * habitus - 0.25 * grown
    return _ellipse(right_border + half, 0.635 + 0.35 * grown, ru, ru / ratio, 32.0)


# Normal hearts over the usual range of ratios and habitus; the envelope adds hearts up to ratio 0.78.
_HEART = _union(*(_heart(ctr, w) for ctr in (0.40, 0.50) for w in (0.9, 1.12)))
_CARDIAC_ENVELOPE = _union(_grow(_HEART, 0.03),
                           *(_heart(ctr, w) for ctr in (0.6, 0.7, 0.78) for w in (0.9, 1.0, 1.15)))
_MEDIASTINUM = _polygon([(0.43, 0.03), (0.575, 0.03), (0.575, 0.82), (0.43, 0.82)])
_ANTERIOR_MEDIASTINUM = _ellipse(0.5, 0.37, 0.12, 0.15)
_HIATAL = _ellipse(0.53, 0.70, 0.11, 0.10)  # retrocardiac, just above the hiatus
_AORTIC_KNOB = _ellipse(0.56, 0.285, 0.05, 0.05)
_ASCENDING_AORTA = [(0.455, 0.47), (0.455, 0.33), (0.475, 0.28)]
_ARCH = [(0.475, 0.28), (0.51, 0.25), (0.55, 0.265), (0.565, 0.29)]
_DESCENDING_AORTA = [(0.565, 0.29), (0.56, 0.50), (0.548, 0.80)]
_THORACIC_AORTA = _union(_capsule(_ASCENDING_AORTA + _ARCH[1:] + _DESCENDING_AORTA[1:], 0.03), _AORTIC_KNOB)
_SPINE = _capsule([(0.5, -0.05), (0.5, 1.05)], 0.045)


def _gastric() -> Field:
    curve, slope = _diaphragm("left", _DOME_HIGH["left"])
    return _intersect(_below(curve, slope), _polygon([(0.5, 0.55), (0.93, 0.55), (0.93, 1.05), (0.5, 1.05)]))


@dataclasses.dataclass(frozen=True)
class _Family:
    """A named anatomical region. Lateral families have a field per side (the region is their union)."""

    build: Callable  # side -> Field (lateral) or () -> Field
    lateral: bool
    zonable: bool = False  # spans several zones, so zone words can restrict it
    doc: str = ""


_FAMILIES: dict[str, _Family] = {
    "lung": _Family(_lung, True, True, "lung field: hemithorax above the hemidiaphragm, lateral to the midline"),
    "pleural_margin": _Family(_pleural_margin, True, True, "band along the costal, apical and diaphragmatic pleura"),
    "costophrenic_angle": _Family(_costophrenic_angle, True, False, "lateral costophrenic recess"),
    "hilum": _Family(_hilum, True, False, "pulmonary hilum"),
    "perihilar": _Family(lambda s: _intersect(_perihilar_area(s), _grow(_lung(s), 0.01)), True, True,
                         "perihilar lung"),
    "ribs": _Family(_ribs, True, True, "rib cage over each hemithorax"),
    "chest_wall": _Family(_chest_wall, True, True, "lateral / apical chest wall soft tissue and ribs"),
    "clavicle": _Family(_clavicle, True, False, "clavicle"),
    "upper_abdomen": _Family(_upper_abdomen, True, False, "below the (highest plausible) hemidiaphragm"),
    "heart": _Family(lambda: _HEART, False, doc="cardiac silhouette (normal size)"),
    "cardiac_envelope": _Family(lambda: _CARDIAC_ENVELOPE, False, doc="cardiac silhouette + room to enlarge"),
    "cardiac_border": _Family(lambda: _band(_HEART, 0.03, 0.03), False, doc="band along the heart border"),
    "mediastinum": _Family(lambda: _MEDIASTINUM, False, doc="central column from the thoracic inlet down"),
    "mediastinum_wide": _Family(lambda: _grow(_MEDIASTINUM, 0.04), False, doc="mediastinum + widening"),
    "anterior_mediastinum": _Family(lambda: _ANTERIOR_MEDIASTINUM, False, doc="upper / anterior mediastinum"),
    "hiatal": _Family(lambda: _HIATAL, False, doc="lower mediastinum behind the heart (hiatal hernias)"),
    "aortic_knob": _Family(lambda: _AORTIC_KNOB, False, doc="aortic knob"),
    "aortic_arch": _Family(lambda: _capsule(_ARCH, 0.03), False, doc="aortic arch"),
    "descending_aorta": _Family(lambda: _capsule(_DESCENDING_AORTA, 0.035), False, doc="descending aorta"),
    "descending_aorta_envelope": _Family(lambda: _capsule(_DESCENDING_AORTA, 0.065), False,
                                         doc="descending aorta + room for tortuosity"),
    "thoracic_aorta": _Family(lambda: _THORACIC_AORTA, False, doc="ascending aorta, arch, knob, descending"),
    "thoracic_aorta_envelope": _Family(lambda: _grow(_THORACIC_AORTA, 0.035), False,
                                       doc="thoracic aorta + room for tortuosity"),
    "spine": _Family(lambda: _SPINE, False, doc="vertebral column"),
    "paraspinal": _Family(lambda: _grow(_SPINE, 0.06), False, doc="spine + room for a lateral curve"),
    "gastric": _Family(_gastric, False, doc="left upper quadrant under the left hemidiaphragm"),
    "diaphragm": _Family(lambda s: _capsule(_curve_points(s), 0.04), True, False, "band along the hemidiaphragm"),
    "thorax": _Family(lambda: _grow(_union(_hemithorax("left"), _hemithorax("right"), _MEDIASTINUM), 0.02),
                      False, doc="whole thorax"),
}


def _curve_points(side: str) -> np.ndarray:
    curve, _ = _diaphragm(side, _DOME[side])
    sgn = _sgn(side)
    u = 0.5 + sgn * np.linspace(0.04, 0.44, 17)
    return np.stack([u, curve(u)], -1)


def _region_field(name: str) -> tuple[Field, str | None]:
    """(field, side) of a region name: a family, or family_left / family_right of a lateral family."""
    for side in SIDES:
        if name.endswith("_" + side) and name[: -len(side) - 1] in _FAMILIES:
            fam = _FAMILIES[name[: -len(side) - 1]]
            if fam.lateral:
                return fam.build(side), side
    fam = _FAMILIES.get(name)
    if fam is None:
        raise ConfigError(f"unknown region {name!r}; known: {', '.join(REGIONS)}")
    if fam.lateral:
        return _union(fam.build("left"), fam.build("right")), None
    return fam.build(), None


REGIONS: tuple[str, ...] = tuple(
    name for fam_name, fam in _FAMILIES.items()
    for name in ((fam_name, f"{fam_name}_left", f"{fam_name}_right") if fam.lateral else (fam_name,))
)


def _check_size(height, width) -> tuple[int, int]:
    if isinstance(height, bool) or isinstance(width, bool) or int(height) != height or int(width) != width \
            or height < 1 or width < 1:
        raise ConfigError(f"prior size must be positive integers, got height={height!r}, width={width!r}")
    return int(height), int(width)


@functools.lru_cache(maxsize=8)
def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    u = (np.arange(width) + 0.5) / width
    v = (np.arange(height) + 0.5) / height
    return np.meshgrid(u, v)


def _side_half(side: str, height: int, width: int) -> np.ndarray:
    u, _ = _grid(height, width)
    return (u > 0.5) if side == "left" else (u < 0.5)


def _freeze(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, np.float32)
    a.setflags(write=False)
    return a


@functools.lru_cache(maxsize=256)
def region_mask(name: str, height: int, width: int) -> np.ndarray:
    """The region `name` (see REGIONS) rendered at (height, width): float32 in [0, 1], read-only, cached."""
    height, width = _check_size(height, width)
    field, side = _region_field(name)
    u, v = _grid(height, width)
    mask = np.clip(0.5 - field(u, v) / EDGE, 0.0, 1.0)
    if side is not None:
        mask = mask * _side_half(side, height, width)  # hard cut: nothing leaks across the midline
    return _freeze(mask)


_ZONE_BANDS = {  # (top, bottom) in v; None = open
    "upper": (None, 0.46), "middle": (0.32, 0.64), "lower": (0.46, None), "apical": (None, 0.28),
    "basal": (0.56, None),
}


@functools.lru_cache(maxsize=64)
def zone_mask(zone: str, height: int, width: int) -> np.ndarray:
    """A zone's area at (height, width): a soft vertical band, or the perihilar / retrocardiac area."""
    height, width = _check_size(height, width)
    u, v = _grid(height, width)
    if zone in _ZONE_BANDS:
        top, bottom = _ZONE_BANDS[zone]
        mask = np.ones_like(v)
        if top is not None:
            mask = np.minimum(mask, np.clip((v - top) / ZONE_RAMP + 0.5, 0.0, 1.0))
        if bottom is not None:
            mask = np.minimum(mask, np.clip((bottom - v) / ZONE_RAMP + 0.5, 0.0, 1.0))
    elif zone == "perihilar":
        mask = np.clip(0.5 - _union(_perihilar_area("left"), _perihilar_area("right"))(u, v) / EDGE, 0.0, 1.0)
    elif zone == "retrocardiac":
        mask = np.clip(0.5 - _union(_grow(_HEART, 0.02), _HIATAL)(u, v) / EDGE, 0.0, 1.0)
    else:
        raise ConfigError(f"unknown zone {zone!r}; known: {', '.join(ZONES)}")
    return _freeze(mask)


def lung_zone_mask(zone: str, height: int, width: int, side: str | None = None) -> np.ndarray:
    """The lung fields (of one patient's `side`, or both) within a zone of ZONES ("apical": the apices, "basal":
    the bases), float32 (height, width) in [0, 1]."""
    if side is not None and side not in SIDES:
        raise ConfigError(f"side must be one of {SIDES} or None, got {side!r}")
    lung = region_mask("lung" if side is None else f"lung_{side}", height, width)
    return np.minimum(lung, zone_mask(zone, height, width))


# --- finding priors -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Component:
    """One weighted region of a finding's prior. `zone`: a default zone the region is limited to."""

    family: str
    weight: float = 1.0
    zone: str | None = None


@dataclasses.dataclass(frozen=True)
class FindingPrior:
    components: tuple[Component, ...]
    zone_mode: str  # "restrict" | "emphasis" | "n/a"


def _fp(zone_mode: str, *components) -> FindingPrior:
    return FindingPrior(tuple(Component(*c) if isinstance(c, tuple) else Component(c) for c in components), zone_mode)


_C = CONTEXT_WEIGHT
_CARDIAC = _fp("n/a", "cardiac_envelope")
_LUNG_ONLY = _fp("restrict", "lung")

FINDING_PRIORS: dict[str, FindingPrior] = {
    "pleural effusion": _fp("emphasis", "costophrenic_angle", ("lung", 1.0, "lower"), "pleural_margin",
                            ("lung", _C, "middle")),
    "atelectasis": _fp("emphasis", ("lung", 1.0, "lower"), ("lung", _C), ("diaphragm", _C)),
    "cardiomegaly": _CARDIAC,
    "enlargement of the cardiac silhouette": _CARDIAC,
    "edema": _fp("emphasis", "perihilar", "hilum", ("lung", _C)),
    "hernia": _fp("n/a", "hiatal", "upper_abdomen"),
    "vascular congestion": _fp("emphasis", "hilum", "perihilar"),
    "hilar congestion": _fp("emphasis", "hilum", "perihilar"),
    "pneumothorax": _fp("emphasis", ("lung", 1.0, "apical"), "pleural_margin", ("lung", _C)),
    "heart failure": _fp("emphasis", "cardiac_envelope", "hilum", "perihilar", ("lung", _C),
                         ("costophrenic_angle", _C)),
    "lung opacity": _LUNG_ONLY,
    "pneumonia": _LUNG_ONLY,
    "tortuosity of the descending aorta": _fp("n/a", "descending_aorta_envelope", "aortic_knob"),
    "scoliosis": _fp("n/a", "paraspinal"),
    "gastric distention": _fp("n/a", "gastric", ("upper_abdomen", _C)),
    "hypoxemia": _fp("emphasis", "lung"),
    "hypertensive heart disease": _fp("n/a", "cardiac_envelope", ("thoracic_aorta_envelope", _C)),
    "hematoma": _fp("restrict", "chest_wall", "mediastinum_wide"),
    "tortuosity of the thoracic aorta": _fp("n/a", "thoracic_aorta_envelope"),
    "contusion": _LUNG_ONLY,
    "emphysema": _fp("emphasis", "lung", ("diaphragm", _C)),
    "granuloma": _fp("restrict", "lung", "hilum"),
    "calcification": _fp("restrict", "lung", "hilum", "aortic_knob"),
    "pleural thickening": _fp("restrict", "pleural_margin", "costophrenic_angle"),
    "thymoma": _fp("n/a", "anterior_mediastinum"),
    "blunting of the costophrenic angle": _fp("n/a", "costophrenic_angle"),
    "consolidation": _LUNG_ONLY,
    "fracture": _fp("restrict", "ribs", "clavicle", "spine"),
    "pneumomediastinum": _fp("n/a", "mediastinum_wide", ("cardiac_border", _C)),
    "air collection": _fp("restrict", "pleural_margin", ("lung", 1.0, "apical"), "upper_abdomen"),
    "infection": _LUNG_ONLY,
}
assert set(FINDING_PRIORS) == set(FINDINGS)
assert all(c.family in _FAMILIES for p in FINDING_PRIORS.values() for c in p.components)


def _family_mask(family: str, sides: frozenset[str], height: int, width: int) -> np.ndarray:
    fam = _FAMILIES[family]
    if fam.lateral and len(sides) == 1:
        return region_mask(f"{family}_{next(iter(sides))}", height, width)
    return region_mask(family, height, width)


def _zones_mask(zones: Iterable[str], height: int, width: int) -> np.ndarray:
    return functools.reduce(np.maximum, (zone_mask(z, height, width) for z in sorted(zones)))


def finding_prior(finding: str, height: int, width: int, sides: Iterable[str] = (), zones: Iterable[str] = ()
                  ) -> tuple[np.ndarray, list[str]]:
    """The built-in prior of one canonical finding, refined by sides / zones; returns (prior, notes).

    sides: subset of SIDES (the patient's); one side restricts lateral regions, none or both keep both.
    zones: subset of ZONES; used according to the finding's zone mode (see the module docstring).
    """
    height, width = _check_size(height, width)
    if finding not in FINDING_PRIORS:
        raise ConfigError(f"no built-in prior for {finding!r}; findings: {', '.join(FINDINGS)}")
    spec = FINDING_PRIORS[finding]
    sides, zones = frozenset(sides), frozenset(zones)
    if not sides <= set(SIDES) or not zones <= set(ZONES):
        raise ConfigError(f"sides must be within {SIDES} and zones within {ZONES}, got {sorted(sides)}, "
                          f"{sorted(zones)}")
    notes = []
    if len(sides) == 1:
        side = next(iter(sides))
        if any(_FAMILIES[c.family].lateral for c in spec.components):
            half = "u > 0.5" if side == "left" else "u < 0.5"
            notes.append(f"{finding}: lateral regions restricted to the patient's {side} ({half})")
        else:
            notes.append(f"{finding}: side word '{side}' not applied (midline regions only)")

    zoned = bool(zones) and spec.zone_mode != "n/a"
    if zones and not zoned:
        notes.append(f"{finding}: zone words {sorted(zones)} not applied (cardiac / mediastinal / skeletal prior)")
    elif zoned:
        how = ("restrict its lung / pleura / chest-wall regions" if spec.zone_mode == "restrict"
               else "added as primary lung regions")
        notes.append(f"{finding}: zones {sorted(zones)} {how}")

    named = _zones_mask(zones, height, width) if zoned else None
    prior = np.zeros((height, width), np.float32)
    restricted_weight: dict[str, float] = {}
    for c in spec.components:
        fam = _FAMILIES[c.family]
        if zoned and spec.zone_mode == "restrict" and fam.zonable:
            # The named zones replace the default zone: weight = the family's best weight in this finding.
            restricted_weight[c.family] = max(restricted_weight.get(c.family, 0.0), c.weight)
            continue
        m = _family_mask(c.family, sides, height, width)
        if c.zone is not None:
            m = np.minimum(m, zone_mask(c.zone, height, width))
        np.maximum(prior, c.weight * m, out=prior)
    for family, weight in restricted_weight.items():
        np.maximum(prior, weight * np.minimum(_family_mask(family, sides, height, width), named), out=prior)
    if zoned and spec.zone_mode == "emphasis":
        np.maximum(prior, np.minimum(_family_mask("lung", sides, height, width), named), out=prior)
    return prior, notes


@dataclasses.dataclass(frozen=True)
class PriorInfo:
    """What `prior_for_edits` did.

    findings: canonical findings that contributed a prior, in order.
    refinements: each location refinement applied or ignored, one sentence each.
    warnings: everything that made the prior less specific than asked (whole-image fallback, unused words).
    whole_image: True when the prior is the whole image.
    sources: finding -> "builtin" | "table".
    """

    findings: tuple[str, ...] = ()
    refinements: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    whole_image: bool = False
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict)


_UNUSED_LOCATION_WORDS = ("medial", "lateral")


def _check_table(table: Mapping[str, np.ndarray], height: int, width: int) -> dict[str, np.ndarray]:
    out = {}
    for name, mask in table.items():
        if name not in FINDINGS:
            raise ConfigError(f"prior table key {name!r} is not a canonical finding (see instructions.FINDINGS)")
        m = np.asarray(mask, np.float32)
        if m.shape != (height, width):
            raise ConfigError(f"prior table entry {name!r} has shape {m.shape}, expected {(height, width)}")
        if not np.all(np.isfinite(m)) or m.min() < 0.0 or m.max() > 1.0:
            raise ConfigError(f"prior table entry {name!r} must be finite and within [0, 1]")
        out[name] = m
    return out


def prior_for_edits(edits: Iterable[Edit] | ParsedInstruction, height: int, width: int, *,
                    table: Mapping[str, np.ndarray] | None = None) -> tuple[np.ndarray, PriorInfo]:
    """The prior M_pseudo (float32 (height, width), in [0, 1]) of the findings of `edits`, and a PriorInfo.

    Each edit's findings get their prior refined by that edit's location words; all are combined by elementwise
    max. table: optional finding -> (height, width) mask in [0, 1] (e.g. from `priors_from_ms_cxr`) used instead
    of the built-in prior for the findings it has; a single side word still restricts it to one half when the
    finding's built-in prior is lateral, zone words are not applied to it.
    A ParsedInstruction with unparsed text or unknown findings gives the whole image (see the module docstring).
    """
    height, width = _check_size(height, width)
    custom = _check_table(table, height, width) if table is not None else {}
    parsed = edits if isinstance(edits, ParsedInstruction) else None
    edits = tuple(parsed.edits if parsed is not None else edits)

    prior = np.zeros((height, width), np.float32)
    findings: list[str] = []
    refinements: list[str] = []
    warns: list[str] = []
    sources: dict[str, str] = {}
    unknown: list[str] = []
    for edit in edits:
        sides = instructions.location_sides(edit.location)
        zones = instructions.location_zones(edit.location)
        if edit.location:
            unused = [w for w in _UNUSED_LOCATION_WORDS if w in edit.location.replace("-", " ").split()]
            if unused:
                warns.append(f"location word(s) {unused} of {edit.location!r} are not used by the prior")
        for finding in edit.findings:
            if finding in custom:
                m = custom[finding]
                if len(sides) == 1 and any(_FAMILIES[c.family].lateral
                                           for c in FINDING_PRIORS[finding].components):
                    side = next(iter(sides))
                    m = m * _side_half(side, height, width)
                    refinements.append(f"{finding}: table prior restricted to the patient's {side}")
                if zones:
                    refinements.append(f"{finding}: zone words {sorted(zones)} not applied to a table prior")
                sources[finding] = "table"
            elif finding in FINDING_PRIORS:
                m, notes = finding_prior(finding, height, width, sides, zones)
                refinements.extend(notes)
                if table is not None:
                    refinements.append(f"{finding}: not in the table, built-in prior used")
                sources[finding] = "builtin"
            else:
                unknown.append(finding)
                continue
            if finding not in findings:
                findings.append(finding)
            np.maximum(prior, m, out=prior)

    fallback = None
    if parsed is not None and (parsed.unparsed or parsed.unknown_findings):
        parts = ", ".join(repr(t) for t in parsed.unparsed + parsed.unknown_findings)
        fallback = f"instruction text not understood ({parts}): whole image"
    elif unknown:
        fallback = f"no prior for finding(s) {unknown}: whole image"
    elif not findings:
        fallback = "no recognised finding in the edits: whole image"
    elif float(prior.max()) <= 0.0:
        fallback = "the refined prior is empty: whole image"
    if fallback is not None:
        prior = np.ones((height, width), np.float32)
        warns.insert(0, fallback)
    return prior, PriorInfo(tuple(findings), tuple(refinements), tuple(warns), fallback is not None, sources)


def prior_for_instruction(text: str, height: int, width: int, *,
                          table: Mapping[str, np.ndarray] | None = None) -> tuple[np.ndarray, PriorInfo]:
    """`prior_for_edits` of `instructions.parse(text)`; a text the grammar cannot read gives the whole image
    with a warning that names any findings `instructions.scan_findings` sees in it."""
    parsed = instructions.parse(text)
    prior, info = prior_for_edits(parsed, height, width, table=table)
    if info.whole_image and not parsed.edits:
        mentioned = instructions.scan_findings(text)
        if mentioned:
            info = dataclasses.replace(info, warnings=info.warnings + (
                f"the text mentions {list(mentioned)} but is not in the instruction grammar",))
    return prior, info


# --- MS-CXR box priors -----------------------------------------------------------------------------------------------

MS_CXR_COLUMNS = ("dicom_id", "category_name", "x", "y", "w", "h", "image_width", "image_height")
METADATA_COLUMNS = ("dicom_id", "ViewPosition")


def _csv_rows(path, required: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a CSV file, streamed (the MIMIC metadata has ~377k rows); DataError on a missing or
    unreadable file or a missing column."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(f"{path}: missing column(s) {missing} (has {header})")
            for row in reader:
                yield reader.line_num, row
    except OSError as e:
        raise DataError(f"{path}: cannot read CSV ({e.strerror or e})") from e
    except (csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable CSV ({e})") from e


def ms_cxr_category_finding(category: str) -> str | None:
    """The canonical finding of an MS-CXR category name ("Pleural effusion" -> "pleural effusion"), or None."""
    found = instructions.scan_findings(category)
    return found[0] if len(found) == 1 else None


def priors_from_ms_cxr(csv_path, metadata_csv_path, height: int, width: int) -> dict[str, np.ndarray]:
    """Box priors of the original InstructX2X from MS-CXR: {canonical finding: float32 (height, width) in {0, 1}}.

    Rows of `csv_path` (MS_CXR_Local_Alignment_v1.1.0.csv) whose dicom_id is a PA view in `metadata_csv_path`
    (mimic-cxr-2.0.0-metadata.csv) are kept; each box (x, y, w, h in pixels of an image_width x image_height
    image) is normalised by its image size and rendered at (height, width) as pixel rows
    round(y / image_height * height) .. round((y + h) / image_height * height) (columns alike), clipped to the
    image; a finding's prior is the union of its boxes. Categories map to findings with
    `ms_cxr_category_finding`; unmapped categories are skipped with a `warnings.warn`.
    Raises DataError for a missing / unreadable file, a missing column, a bad number or no PA box at all.
    """
    height, width = _check_size(height, width)
    path, meta_path = os.fspath(csv_path), os.fspath(metadata_csv_path)
    pa_ids = {(row["dicom_id"] or "").strip() for _, row in _csv_rows(meta_path, METADATA_COLUMNS)
              if (row["ViewPosition"] or "").strip().upper() == "PA"}

    masks: dict[str, np.ndarray] = {}
    skipped: set[str] = set()
    for line, row in _csv_rows(path, MS_CXR_COLUMNS):
        if (row["dicom_id"] or "").strip() not in pa_ids:
            continue
        category = (row["category_name"] or "").strip()
        finding = ms_cxr_category_finding(category)
        if finding is None:
            skipped.add(category)
            continue
        try:
            x, y, w, h, iw, ih = (float(row[c]) for c in ("x", "y", "w", "h", "image_width", "image_height"))
        except (TypeError, ValueError) as e:
            raise DataError(f"{path}: line {line}: box / image size is not a number ({e})") from e
        if not all(map(math.isfinite, (x, y, w, h, iw, ih))) or iw <= 0 or ih <= 0 or w <= 0 or h <= 0:
            raise DataError(f"{path}: line {line}: box (x={x}, y={y}, w={w}, h={h}) or image size "
                            f"({iw} x {ih}) is not positive and finite")
        r0, r1 = (int(np.clip(round(t / ih * height), 0, height)) for t in (y, y + h))
        c0, c1 = (int(np.clip(round(t / iw * width), 0, width)) for t in (x, x + w))
        mask = masks.setdefault(finding, np.zeros((height, width), np.float32))
        mask[r0:r1, c0:c1] = 1.0
    if skipped:
        warnings.warn(f"{path}: MS-CXR categories without a canonical finding skipped: {sorted(skipped)}",
                      stacklevel=2)
    if not masks:
        raise DataError(f"{path}: no box of a known category on a PA view listed in {meta_path}")
    return masks
