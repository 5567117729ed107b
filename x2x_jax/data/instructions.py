"""The MIMIC-EDIT-INSTRUCTION instruction grammar: sentences <-> structured edits.

Grammar (case-insensitive, any run of whitespace counts as one space, the final period is optional):

    instruction := sentence ((". " | "; " | newline | [","] ["and" | "then"] before an op head) sentence)*
    sentence    := ("Add" | "Remove") ["the"] ("finding" | "findings") "of" items
                 | ("Add" | "Remove") ["the" | "a" | "an"] items          # lenient short form: "Add mild cardiomegaly"
                 | "Change" ["the"] ("level" | "severity") "of" items "from" LEVEL "to" LEVEL
    items       := item (("," | ", and" | "and") item)*                  # "X, Y and Z", "X, Y, and Z", "X, and Y"
    item        := [LEVEL] [LOCATION] FINDING [("in" | "at" | "within") ["the"] LOCATION]
    LEVEL       := a word of LEVEL_WORDS, or "A to B" / "A-to-B" with A, B scale words ("mild to moderate")
    LOCATION    := location words (LOCATION_WORDS) joined by spaces, hyphens or " to " ("left lower lobe",
                   "mid to lower lung", "right-sided")
    FINDING     := a canonical name of FINDINGS or one of its synonyms (_SYNONYMS), matched as a whole phrase

Representation:
  * Severity and location bind to the item they are written with ("mild edema and bilateral atelectasis": edema
    is mild, atelectasis is bilateral). A maximal run of consecutive items of one sentence that share (severity,
    location) becomes one `Edit`, so a v1 sentence is one Edit with all its findings, and a v2 sentence with
    different attributes per finding is several Edits. `ParsedInstruction.sentence_ids` records which edits share
    a sentence, so `render(parse(s)) == s` for every canonical sentence s; `render(edits)` renders each Edit as its
    own sentence and `parse(render(edits)).edits == edits` for every valid tuple of edits.
  * A location given both before and after the finding ("small right pneumothorax at the apex") is stored as one
    phrase "right apex". The stored location has no preposition / article, is lower-cased and single-spaced.
  * The canonical rendering puts a location that ends with a noun (lung, lobe, base, apex, ...) after the finding
    ("... in the left lower lobe") and an adjective-only location before it ("small right pneumothorax").
  * "Change" names one finding per Edit: "Change the level of edema and effusion from mild to moderate" gives two
    Edits. A change item carries no severity (a level word before the finding makes the sentence unparsed).
    "from mild to moderate to severe" is ambiguous; the parser takes the first split that leaves two valid levels
    (mild -> moderate to severe) and the renderer writes "mild-to-moderate" where the plain form would be misread.

Nothing is dropped silently:
  * A sentence that fits no form, or yields no edit, is kept verbatim in `unparsed`.
  * An item in finding position that is not [LEVEL] [LOCATION] FINDING [in the LOCATION] (unknown finding, unknown
    level / location word, or free text) is kept verbatim in `unknown_findings`; the sentence's other items still
    make Edits. When no item of a sentence is known, the sentence is in `unparsed` as well.
  * Change levels outside the grammar send the whole sentence to `unparsed`.
  Callers that must reject partial parses check `ParsedInstruction.complete`.

Synonym decisions (see _SYNONYMS): "infiltrate(s)" -> lung opacity (as the CheXpert labeler does); "enlarged
heart" / "cardiac enlargement" -> cardiomegaly but "enlarged cardiac silhouette" -> enlargement of the cardiac
silhouette (its own canonical finding); "emphysematous change(s)" -> emphysema (bare "emphysematous" is an adjective,
not a finding); "pericardial effusion" is NOT pleural effusion (it stays unknown); "blunting of the left
costophrenic angle" stays unknown rather than losing its side.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

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


@dataclasses.dataclass(frozen=True)
class ParsedInstruction:
    """The result of `parse`.

    text: the instruction as given.
    edits: the edits, in the order they are written.
    sentence_ids: for each edit, the index of the sentence (clause) it came from; `render` joins add/remove edits
        that share one back into one sentence.
    unparsed: sentences / clauses that yielded no edit, verbatim.
    unknown_findings: phrases in finding position that are not in the grammar, verbatim.
    """

    text: str
    edits: tuple[Edit, ...] = ()
    sentence_ids: tuple[int, ...] = ()
    unparsed: tuple[str, ...] = ()
    unknown_findings: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        """True when every part of the text became an edit."""
        return not self.unparsed and not self.unknown_findings


# --- vocabulary -------------------------------------------------------------------------------------------------

# Words that can stand on either side of "to" in a compound level ("small to moderate").
_SCALE_WORDS = (
    "trace", "tiny", "minimal", "subtle", "slight", "small", "mild", "moderate", "large", "severe", "marked",
    "extensive", "massive",
)
_COMPOUND_LEVELS = (
    "minimal to mild", "mild to moderate", "small to moderate", "moderate to large", "moderate to severe",
)
# MIMIC-Diff-VQA's level_lib plus common report words. Any "A to B" of two _SCALE_WORDS is also a level;
# the listed compounds are the ones that occur in practice.
LEVEL_WORDS: tuple[str, ...] = _SCALE_WORDS + (
    "minimally", "mildly", "moderately", "minor", "low", "acute",
    "increased", "decreased", "increasing", "decreasing",
) + _COMPOUND_LEVELS

_SIDE_WORDS = {
    "left": {"left"}, "left-sided": {"left"}, "right": {"right"}, "right-sided": {"right"},
    "bilateral": {"left", "right"}, "both": {"left", "right"},
    "bibasilar": {"left", "right"}, "bibasal": {"left", "right"},
    # The lingula is part of the left lung only.
    "lingula": {"left"}, "lingular": {"left"},
}
_ZONE_WORDS = {
    "upper": {"upper"}, "middle": {"middle"}, "mid": {"middle"}, "lower": {"lower"},
    "apical": {"apical"}, "apicolateral": {"apical"}, "apex": {"apical"}, "apices": {"apical"},
    "basal": {"basal"}, "basilar": {"basal"}, "bibasilar": {"basal"}, "bibasal": {"basal"},
    "base": {"basal"}, "bases": {"basal"},
    "retrocardiac": {"retrocardiac"},
    "perihilar": {"perihilar"}, "hilar": {"perihilar"}, "hilum": {"perihilar"}, "hila": {"perihilar"},
    # The lingula projects over the mid zone on a frontal film.
    "lingula": {"middle"}, "lingular": {"middle"},
}
# Nouns: a location ending in one of these is rendered after the finding ("in the left lower lobe").
_LOCATION_NOUNS = (
    "lung", "lungs", "lobe", "lobes", "zone", "zones", "field", "fields", "base", "bases", "apex", "apices",
    "hemithorax", "hemithoraces", "lingula", "hilum", "hila", "area", "region",
)
# Plural nouns name both sides when no side is given ("the lung bases", "the upper lobes").
_PLURAL_NOUNS = {"lungs", "lobes", "zones", "fields", "bases", "apices", "hemithoraces", "hila"}
# "pleural" is deliberately not a location word: it is part of "pleural effusion" / "pleural thickening", and
# "pericardial effusion" must not become a located pleural effusion.
LOCATION_WORDS: tuple[str, ...] = tuple(dict.fromkeys(
    ("left", "right", "left-sided", "right-sided", "bilateral", "both", "bibasilar", "bibasal",
     "upper", "middle", "mid", "lower", "apical", "apicolateral", "basal", "basilar", "retrocardiac", "perihilar",
     "hilar", "lingular", "medial", "lateral") + _LOCATION_NOUNS
))

# synonym (lower case) -> canonical finding. Canonical names map to themselves (added below).
_SYNONYMS: dict[str, str] = {
    "pleural effusions": "pleural effusion", "effusion": "pleural effusion", "effusions": "pleural effusion",
    "pleural fluid": "pleural effusion",
    "atelectases": "atelectasis", "atelectatic change": "atelectasis", "atelectatic changes": "atelectasis",
    "enlarged heart": "cardiomegaly", "cardiac enlargement": "cardiomegaly", "heart enlargement": "cardiomegaly",
    "enlarged cardiac silhouette": "enlargement of the cardiac silhouette",
    "enlargement of cardiac silhouette": "enlargement of the cardiac silhouette",
    "pulmonary edema": "edema", "oedema": "edema", "pulmonary oedema": "edema",
    "hernias": "hernia", "hiatal hernia": "hernia", "hiatus hernia": "hernia", "hiatal hernias": "hernia",
    "pulmonary vascular congestion": "vascular congestion",
    "pneumothoraces": "pneumothorax", "pneumothoraxes": "pneumothorax",
    "congestive heart failure": "heart failure", "chf": "heart failure", "cardiac decompensation": "heart failure",
    "lung opacities": "lung opacity", "opacity": "lung opacity", "opacities": "lung opacity",
    "airspace opacity": "lung opacity", "airspace opacities": "lung opacity", "lung opacification": "lung opacity",
    "opacification": "lung opacity", "infiltrate": "lung opacity", "infiltrates": "lung opacity",
    "pneumonias": "pneumonia",
    "tortuous descending aorta": "tortuosity of the descending aorta",
    "thoracolumbar scoliosis": "scoliosis",
    "gastric distension": "gastric distention",
    "hematomas": "hematoma",
    "tortuous thoracic aorta": "tortuosity of the thoracic aorta",
    "contusions": "contusion", "pulmonary contusion": "contusion", "pulmonary contusions": "contusion",
    "emphysematous change": "emphysema", "emphysematous changes": "emphysema",
    "granulomas": "granuloma", "granulomata": "granuloma", "granulomatous disease": "granuloma",
    "calcifications": "calcification",
    "thymomas": "thymoma",
    "blunting of the costophrenic angles": "blunting of the costophrenic angle",
    "blunted costophrenic angle": "blunting of the costophrenic angle",
    "blunted costophrenic angles": "blunting of the costophrenic angle",
    "consolidations": "consolidation",
    "fractures": "fracture", "rib fracture": "fracture", "rib fractures": "fracture",
    "air collections": "air collection",
    "infections": "infection",
}
_SYNONYMS.update({name: name for name in FINDINGS})
assert set(_SYNONYMS.values()) == set(FINDINGS)


# --- regular expressions ----------------------------------------------------------------------------------------

def _alternation(phrases: Iterable[str], end: str = r"(?!\w)") -> str:
    """Longest first, so "pleural effusions" wins over "pleural effusion"; inner spaces match any whitespace."""
    ordered = sorted(set(phrases), key=lambda p: (-len(p), p))
    return "(?:" + "|".join(re.escape(p).replace(r"\ ", r"\s+") for p in ordered) + ")" + end


_SCALE = _alternation(_SCALE_WORDS)
_LEVEL = rf"(?:{_SCALE}(?:\s+to\s+|\s*-\s*to\s*-\s*){_SCALE}|{_alternation(w for w in LEVEL_WORDS if ' ' not in w)})"
_LOC_WORD = _alternation(LOCATION_WORDS)
_LOC_SEP = r"(?:\s+to\s+|\s*-\s*to\s*-\s*|\s*-\s*|\s+)"
_LOCATION = rf"{_LOC_WORD}(?:{_LOC_SEP}{_LOC_WORD})*"
# Lazy, so that a location written before the finding takes as few words as possible: "left lung opacity" is
# left + lung opacity, not left lung + opacity.
_LOCATION_LAZY = rf"{_LOC_WORD}(?:{_LOC_SEP}{_LOC_WORD})*?"
_FINDING = _alternation(_SYNONYMS, end=r"(?![\w-])")

_LEVEL_RE = re.compile(_LEVEL, re.I)
_LOCATION_RE = re.compile(_LOCATION, re.I)
_ITEM_RE = re.compile(
    rf"(?:(?P<level>{_LEVEL})\s+)?(?:(?P<pre>{_LOCATION_LAZY})\s+)??(?P<finding>{_FINDING})"
    rf"(?:\s+(?:in|at|within)\s+(?:the\s+)?(?P<post>{_LOCATION}))?",
    re.I,
)
_FINDING_SCAN_RE = re.compile(rf"(?<![\w-])(?<!pericardial\s){_FINDING}", re.I)

_ADD_REMOVE_RE = re.compile(r"(?P<op>add|remove)\s+(?:the\s+)?findings?\s+of(?:\s+(?P<items>.*))?", re.I | re.S)
_ADD_REMOVE_SHORT_RE = re.compile(r"(?P<op>add|remove)\s+(?:(?:the|a|an)\s+)?(?P<items>.+)", re.I | re.S)
_CHANGE_RE = re.compile(
    r"change\s+(?:the\s+)?(?:level|severity)\s+of\s+(?P<items>.+?)\s+from\s+(?P<levels>.+)", re.I | re.S
)
_LIST_SEP_RE = re.compile(r"\s*,\s*(?:and\s+)?|\s+and\s+", re.I)
# A sentence ends at . ! ? ; or a newline; a period between digits ("1.5") does not end one.
_SENTENCE_RE = re.compile(r"(?:[^.!?;\n]|\.(?=\d))+[.!?;]*")
# A new op head inside a sentence starts a new clause: "Add the finding of edema and remove the finding of ...".
_CLAUSE_SPLIT_RE = re.compile(
    r"(?:\s*,\s*|\s+)(?:(?:and|then)\s+)?(?=(?:add|remove)\s+the\s+findings?\s+of\b|change\s+the\s+level\s+of\b)",
    re.I,
)
_TO_RE = re.compile(r"\s+to\s+", re.I)
_SIDE_TOKEN_RE = re.compile(r"(?<!\w)(left|right)(wards?|most)?(?![\w])", re.I)


def _squash(text: str) -> str:
    return " ".join(text.split()).lower()


def _norm_level(text: str) -> str:
    return re.sub(r"\s*-\s*to\s*-\s*", " to ", _squash(text))


def _norm_location(text: str) -> str:
    return re.sub(r"\s*-\s*", "-", _squash(text))


def _location_tokens(location: str) -> list[str]:
    """Location words of a phrase; "left-sided" stays one word, "mid-lung" is two."""
    tokens = []
    for word in re.split(r"\s+", _squash(location)):
        tokens.extend([word] if word in LOCATION_WORDS else [w for w in word.split("-") if w])
    return tokens


# --- parsing ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Item:
    finding: str
    severity: str | None
    location: str | None


def _parse_item(text: str) -> _Item | None:
    m = _ITEM_RE.fullmatch(text.strip())
    if m is None:
        return None
    level = _norm_level(m["level"]) if m["level"] else None
    parts = [_norm_location(p) for p in (m["pre"], m["post"]) if p]
    return _Item(_SYNONYMS[_squash(m["finding"])], level, " ".join(parts) or None)


def _split_items(text: str) -> list[str]:
    return [item.strip() for item in _LIST_SEP_RE.split(text) if item.strip()]


def _split_levels(text: str) -> list[tuple[str, str]]:
    """Every way to read "A to B" as two valid levels, leftmost split first."""
    text = text.strip()
    splits = []
    for m in _TO_RE.finditer(text):
        a, b = text[: m.start()], text[m.end():]
        if _LEVEL_RE.fullmatch(a) and _LEVEL_RE.fullmatch(b):
            splits.append((_norm_level(a), _norm_level(b)))
    return splits


def _clauses(text: str) -> Iterable[str]:
    for m in _SENTENCE_RE.finditer(text):
        sentence = m.group().strip()
        if sentence.rstrip(".!?;").strip():
            yield from (c.strip() for c in _CLAUSE_SPLIT_RE.split(sentence) if c.strip())


def _parse_clause(clause: str) -> tuple[list[Edit], list[str]] | None:
    """(edits, unknown item phrases) of one clause, or None if it fits no sentence form."""
    body = clause.rstrip(".!?; \t")
    change = _CHANGE_RE.fullmatch(body)
    if change is not None:
        levels = _split_levels(change["levels"])
        if not levels:
            return None
        level_from, level_to = levels[0]
        edits, unknown = [], []
        for phrase in _split_items(change["items"]):
            item = _parse_item(phrase)
            if item is None:
                unknown.append(phrase)
            elif item.severity is not None:
                return None
            else:
                edits.append(Edit("change", (item.finding,), None, item.location, level_from, level_to))
        return edits, unknown

    m = _ADD_REMOVE_RE.fullmatch(body) or _ADD_REMOVE_SHORT_RE.fullmatch(body)
    if m is None or not m["items"]:
        return None
    op = m["op"].lower()
    edits, unknown = [], []
    for phrase in _split_items(m["items"]):
        item = _parse_item(phrase)
        if item is None:
            unknown.append(phrase)
        elif edits and (edits[-1].severity, edits[-1].location) == (item.severity, item.location):
            edits[-1] = dataclasses.replace(edits[-1], findings=edits[-1].findings + (item.finding,))
        else:
            edits.append(Edit(op, (item.finding,), item.severity, item.location))
    return edits, unknown


def parse(text: str) -> ParsedInstruction:
    """Parse an instruction of one or more sentences. Never raises on content; see the module docstring."""
    edits: list[Edit] = []
    sentence_ids: list[int] = []
    unparsed: list[str] = []
    unknown: list[str] = []
    for index, clause in enumerate(_clauses(text)):
        result = _parse_clause(clause)
        if result is None:
            unparsed.append(clause)
            continue
        clause_edits, clause_unknown = result
        unknown.extend(clause_unknown)
        if not clause_edits:
            unparsed.append(clause)
        edits.extend(clause_edits)
        sentence_ids.extend([index] * len(clause_edits))
    return ParsedInstruction(text, tuple(edits), tuple(sentence_ids), tuple(unparsed), tuple(unknown))


# --- rendering --------------------------------------------------------------------------------------------------

def _check(edit: Edit) -> None:
    if edit.op not in OPS:
        raise ValueError(f"Edit.op must be one of {OPS}, got {edit.op!r}")
    if not edit.findings:
        raise ValueError(f"Edit has no findings: {edit!r}")
    for name in edit.findings:
        if name not in FINDINGS:
            raise ValueError(f"Edit finding {name!r} is not a canonical name of FINDINGS")
    levels = (edit.level_from, edit.level_to) if edit.op == "change" else (edit.severity,)
    for level in levels:
        if level is not None and not (_LEVEL_RE.fullmatch(level) and _norm_level(level) == level):
            raise ValueError(f"level {level!r} is not a canonical level (lower case, LEVEL_WORDS or 'A to B')")
    if edit.location is not None and not (
        _LOCATION_RE.fullmatch(edit.location) and _norm_location(edit.location) == edit.location
    ):
        raise ValueError(f"location {edit.location!r} is not a canonical phrase of LOCATION_WORDS")
    if edit.op == "change":
        if len(edit.findings) != 1 or edit.severity is not None or edit.level_from is None or edit.level_to is None:
            raise ValueError(f"a change Edit needs one finding, level_from and level_to and no severity: {edit!r}")
    elif edit.level_from is not None or edit.level_to is not None:
        raise ValueError(f"an {edit.op} Edit has no level_from / level_to: {edit!r}")


def _render_item(finding: str, severity: str | None, location: str | None) -> str:
    words = [severity] if severity else []
    if location and _location_tokens(location)[-1] in _LOCATION_NOUNS:
        words += [finding, "in the", location]
    else:
        words += [location, finding] if location else [finding]
    return " ".join(words)


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _render_change(edit: Edit) -> str:
    level_from, level_to = edit.level_from, edit.level_to
    if _split_levels(f"{level_from} to {level_to}")[0] != (level_from, level_to):
        # "from mild to moderate to severe" would read as mild -> moderate to severe; hyphenate the compound.
        level_from, level_to = (lvl.replace(" to ", "-to-") for lvl in (level_from, level_to))
    item = _render_item(edit.findings[0], None, edit.location)
    return f"Change the level of {item} from {level_from} to {level_to}."


def render_sentence(edits: Sequence[Edit]) -> str:
    """One sentence from add/remove edits of one op (several when severities / locations differ per finding)."""
    edits = list(edits)
    if not edits:
        raise ValueError("render_sentence needs at least one Edit")
    for edit in edits:
        _check(edit)
    if edits[0].op == "change":
        if len(edits) != 1:
            raise ValueError("a change sentence holds exactly one Edit")
        return _render_change(edits[0])
    if any(edit.op != edits[0].op for edit in edits):
        raise ValueError(f"one sentence holds edits of one op, got {[e.op for e in edits]}")
    items = [_render_item(f, e.severity, e.location) for e in edits for f in e.findings]
    noun = "finding" if len(items) == 1 else "findings"
    return f"{edits[0].op.capitalize()} the {noun} of {_join(items)}."


def render(edits: ParsedInstruction | Iterable[Edit]) -> str:
    """Canonical text of edits, one sentence per Edit; a ParsedInstruction keeps its sentence grouping.

    Raises ValueError for an Edit outside the grammar (unknown finding, non-canonical level / location, ...).
    Unparsed text of a ParsedInstruction is not rendered.
    """
    if isinstance(edits, ParsedInstruction):
        groups: list[list[Edit]] = []
        previous = None
        for edit, sentence in zip(edits.edits, edits.sentence_ids, strict=True):
            if groups and sentence == previous and edit.op != "change" and groups[-1][0].op == edit.op:
                groups[-1].append(edit)
            else:
                groups.append([edit])
            previous = sentence
    else:
        groups = [[edit] for edit in edits]
    return " ".join(render_sentence(group) for group in groups)


# --- queries and laterality -------------------------------------------------------------------------------------

def findings_of(parsed: ParsedInstruction | Iterable[Edit]) -> tuple[str, ...]:
    """Every canonical finding the edits name, first occurrence order, no repeats."""
    edits = parsed.edits if isinstance(parsed, ParsedInstruction) else parsed
    return tuple(dict.fromkeys(name for edit in edits for name in edit.findings))


def scan_findings(text: str) -> tuple[str, ...]:
    """Canonical findings named anywhere in free text, as whole phrases (longest first), no repeats.

    A fallback for text that is not in the grammar; "herniation" does not name hernia, "pericardial effusion" does
    not name pleural effusion.
    """
    return tuple(dict.fromkeys(_SYNONYMS[_squash(m.group())] for m in _FINDING_SCAN_RE.finditer(text)))


def location_sides(location: str | None) -> set[str]:
    """The sides a location names, a subset of {"left", "right"}; empty when it names none."""
    if not location:
        return set()
    tokens = _location_tokens(location)
    sides = set().union(*(_SIDE_WORDS.get(t, set()) for t in tokens))
    if not sides:
        if any(t in _PLURAL_NOUNS for t in tokens):
            sides = {"left", "right"}
        elif re.search(r"\b(?:middle|mid)[\s-]+lobe\b", _squash(location)):
            sides = {"right"}  # only the right lung has a middle lobe
    return sides


def location_zones(location: str | None) -> set[str]:
    """The zones a location names, a subset of {"upper", "middle", "lower", "apical", "basal", "retrocardiac",
    "perihilar"}. Zones are reported as written: "apical" does not add "upper", "basal" does not add "lower"."""
    if not location:
        return set()
    return set().union(*(_ZONE_WORDS.get(t, set()) for t in _location_tokens(location)))


def _swap_word(m: re.Match) -> str:
    word, suffix = m.group(1), m.group(2) or ""
    swapped = "right" if word.lower() == "left" else "left"
    if word.isupper():
        swapped = swapped.upper()
    elif word[0].isupper():
        swapped = swapped.capitalize()
    return swapped + suffix


def _swap_text(text: str) -> str:
    return _SIDE_TOKEN_RE.sub(_swap_word, text)


def _swap_edit(edit: Edit) -> Edit:
    return dataclasses.replace(edit, location=_swap_text(edit.location)) if edit.location else edit


def swap_laterality(
    value: str | Edit | ParsedInstruction | Iterable[Edit],
) -> str | Edit | ParsedInstruction | tuple[Edit, ...]:
    """Swap left <-> right, for a horizontally flipped image.

    str: whole words "left" / "right" (also in "left-sided", "leftward", "rightmost") are swapped, keeping their
    case ("Left" -> "Right", "LEFT" -> "RIGHT"); everything else is unchanged ("cleft", "bilateral").
    Edit / iterable of Edits (returned as a tuple) / ParsedInstruction: the same applied to locations (and to the
    text, unparsed and unknown phrases of a ParsedInstruction).
    """
    if isinstance(value, str):
        return _swap_text(value)
    if isinstance(value, Edit):
        return _swap_edit(value)
    if isinstance(value, ParsedInstruction):
        return dataclasses.replace(
            value,
            text=_swap_text(value.text),
            edits=tuple(_swap_edit(e) for e in value.edits),
            unparsed=tuple(_swap_text(s) for s in value.unparsed),
            unknown_findings=tuple(_swap_text(s) for s in value.unknown_findings),
        )
    return tuple(_swap_edit(e) for e in value)
