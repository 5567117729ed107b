"""The MIMIC-EDIT-INSTRUCTION instruction grammar: sentences <-> structured edits.

(Interface fixed first so the synthetic generator and the parser can be written side by side; the parser and
renderer live below.)
"""

from __future__ import annotations

import dataclasses

# The 31 finding names InstructX2X matches, canonical spelling.
FINDINGS: tuple[str, ...] = (
    "pleural effusion", "atelectasis", "cardiomegaly", "enlargement of the cardiac silhouette", "edema",
    "hernia", "vascular congestion", "hilar congestion", "pneumothorax", "heart failure", "lung opacity",
    "pneumonia", "tortuosity of the descending aorta", "scoliosis", "gastric distention", "hypoxemia",
    "hypertensive heart disease", "hematoma", "tortuosity of the thoracic aorta", "contusion", "emphysema",
    "granuloma", "calcification", "pleural thickening", "thymoma", "blunting of the costophrenic angle",
    "consolidation", "fracture", "pneumomediastinum", "air collection", "infection",
)

OPS = ("add", "remove", "change")


@dataclasses.dataclass(frozen=True)
class Edit:
    """One edit sentence.

    op: "add" | "remove" | "change".
    findings: canonical names from FINDINGS (one or more; "change" has exactly one).
    severity: v2 level word for add/remove ("moderate"), or None.
    location: v2 location phrase ("left lower lung"), or None.
    level_from / level_to: the levels of a "change" edit ("mild", "severe").
    """

    op: str
    findings: tuple[str, ...]
    severity: str | None = None
    location: str | None = None
    level_from: str | None = None
    level_to: str | None = None
