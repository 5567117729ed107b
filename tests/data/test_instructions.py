import dataclasses
import random

import pytest

from x2x_jax.data.instructions import (
    FINDINGS,
    LEVEL_WORDS,
    LOCATION_WORDS,
    OPS,
    Edit,
    ParsedInstruction,
    findings_of,
    location_sides,
    location_zones,
    parse,
    render,
    render_sentence,
    scan_findings,
    swap_laterality,
)


def _maker(op):
    return lambda *findings, **kw: Edit(op, findings, **kw)


add, remove, change = (_maker(op) for op in OPS)

# Canonical sentences: parse gives the edits, and render(parse(s)) gives s back.
CANONICAL = [
    ("Add the finding of edema.", [add("edema")]),
    ("Remove the finding of pleural effusion.", [remove("pleural effusion")]),
    ("Add the findings of atelectasis and pneumonia.", [add("atelectasis", "pneumonia")]),
    ("Remove the findings of lung opacity, hernia and pneumothorax.",
     [remove("lung opacity", "hernia", "pneumothorax")]),
    ("Change the level of pleural effusion from small to moderate.",
     [change("pleural effusion", level_from="small", level_to="moderate")]),
    ("Add the finding of edema. Remove the finding of pleural effusion.", [add("edema"), remove("pleural effusion")]),
    ("Add the finding of tortuosity of the descending aorta. Change the level of edema from mild to severe.",
     [add("tortuosity of the descending aorta"), change("edema", level_from="mild", level_to="severe")]),
    ("Add the findings of enlargement of the cardiac silhouette and blunting of the costophrenic angle.",
     [add("enlargement of the cardiac silhouette", "blunting of the costophrenic angle")]),
    # v2: severity, location, both, compound levels, per-finding attributes.
    ("Add the finding of moderate pleural effusion in the left lower lung.",
     [add("pleural effusion", severity="moderate", location="left lower lung")]),
    ("Remove the finding of small right pneumothorax.", [remove("pneumothorax", severity="small", location="right")]),
    ("Add the finding of mild to moderate edema.", [add("edema", severity="mild to moderate")]),
    ("Add the finding of bibasilar atelectasis.", [add("atelectasis", location="bibasilar")]),
    ("Add the finding of consolidation in the right upper lobe.", [add("consolidation", location="right upper lobe")]),
    ("Remove the finding of moderate to severe pneumonia in the lung bases.",
     [remove("pneumonia", severity="moderate to severe", location="lung bases")]),
    ("Add the findings of mild edema and bilateral atelectasis.",
     [add("edema", severity="mild"), add("atelectasis", location="bilateral")]),
    ("Add the findings of mild edema, mild atelectasis and small left pleural effusion.",
     [add("edema", "atelectasis", severity="mild"), add("pleural effusion", severity="small", location="left")]),
    ("Add the findings of edema and moderate pleural effusion in the right base.",
     [add("edema"), add("pleural effusion", severity="moderate", location="right base")]),
    ("Add the finding of trace retrocardiac lung opacity.",
     [add("lung opacity", severity="trace", location="retrocardiac")]),
    ("Change the level of pleural effusion in the left lung from small to moderate to large.",
     [change("pleural effusion", location="left lung", level_from="small", level_to="moderate to large")]),
    ("Change the level of edema from mild-to-moderate to severe.",
     [change("edema", level_from="mild to moderate", level_to="severe")]),
    ("Change the level of left pleural effusion from moderate to small.",
     [change("pleural effusion", location="left", level_from="moderate", level_to="small")]),
    ("Remove the finding of pneumothorax in the right apex. Add the finding of hilar congestion.",
     [remove("pneumothorax", location="right apex"), add("hilar congestion")]),
]


@pytest.mark.parametrize(("text", "edits"), CANONICAL, ids=[t for t, _ in CANONICAL])
def test_canonical_sentences_round_trip(text, edits):
    parsed = parse(text)
    assert parsed.edits == tuple(edits)
    assert parsed.complete
    assert render(parsed) == text
    assert parse(render(parsed.edits)).edits == parsed.edits


# Other spellings of the same grammar: parse gives the edits and render gives the canonical sentence.
VARIANTS = [
    ("add the finding of EDEMA", [add("edema")], "Add the finding of edema."),
    ("Add  the findings\tof atelectasis, edema, and pneumonia.",  # Oxford comma, odd whitespace
     [add("atelectasis", "edema", "pneumonia")], "Add the findings of atelectasis, edema and pneumonia."),
    ("Add the findings of atelectasis, and edema.",  # MIMIC-Diff-VQA's two-item comma
     [add("atelectasis", "edema")], "Add the findings of atelectasis and edema."),
    ("Add the finding of edema and pneumonia.", [add("edema", "pneumonia")],
     "Add the findings of edema and pneumonia."),
    ("Add the finding of edema\nRemove the finding of pneumonia", [add("edema"), remove("pneumonia")],
     "Add the finding of edema. Remove the finding of pneumonia."),
    ("Add the finding of edema and remove the finding of effusions.", [add("edema"), remove("pleural effusion")],
     "Add the finding of edema. Remove the finding of pleural effusion."),
    ("Change the level of edema from mild to moderate and add the finding of effusion, then remove the finding of "
     "pneumonia.", [change("edema", level_from="mild", level_to="moderate"), add("pleural effusion"),
                    remove("pneumonia")],
     "Change the level of edema from mild to moderate. Add the finding of pleural effusion. "
     "Remove the finding of pneumonia."),
    ("Add mild cardiomegaly", [add("cardiomegaly", severity="mild")], "Add the finding of mild cardiomegaly."),
    ("Remove the pneumothorax.", [remove("pneumothorax")], "Remove the finding of pneumothorax."),
    ("Add the finding of left lower lobe pneumonia.", [add("pneumonia", location="left lower lobe")],
     "Add the finding of pneumonia in the left lower lobe."),
    ("Add the finding of pleural effusion at the Lung Bases.", [add("pleural effusion", location="lung bases")],
     "Add the finding of pleural effusion in the lung bases."),
    ("Add the finding of small right pneumothorax at the apex.",
     [add("pneumothorax", severity="small", location="right apex")],
     "Add the finding of small pneumothorax in the right apex."),
    ("Remove the finding of right pneumothorax in the apex.", [remove("pneumothorax", location="right apex")],
     "Remove the finding of pneumothorax in the right apex."),
    ("Add the finding of Mild-To-Moderate edema.", [add("edema", severity="mild to moderate")],
     "Add the finding of mild to moderate edema."),
    ("Add the finding of atelectasis in the mid-to-lower lung.", [add("atelectasis", location="mid-to-lower lung")],
     "Add the finding of atelectasis in the mid-to-lower lung."),
    ("Change the severity of edema and effusion from mild to moderate.",
     [change("edema", level_from="mild", level_to="moderate"),
      change("pleural effusion", level_from="mild", level_to="moderate")],
     "Change the level of edema from mild to moderate. Change the level of pleural effusion from mild to moderate."),
    ("Change the level of edema from mild to moderate to severe.",  # ambiguous: the leftmost split wins
     [change("edema", level_from="mild", level_to="moderate to severe")],
     "Change the level of edema from mild to moderate to severe."),
]


@pytest.mark.parametrize(("text", "edits", "canonical"), VARIANTS, ids=[t for t, _, _ in VARIANTS])
def test_variant_spellings(text, edits, canonical):
    parsed = parse(text)
    assert parsed.edits == tuple(edits)
    assert parsed.complete
    assert render(parsed) == canonical


def test_render_hyphenates_a_compound_level_only_where_the_plain_form_is_misread():
    edit = change("edema", level_from="mild to moderate", level_to="severe")
    assert render([edit]) == "Change the level of edema from mild-to-moderate to severe."
    assert parse(render([edit])).edits == (edit,)
    edit = change("edema", level_from="mild to moderate", level_to="moderate to severe")
    assert render([edit]) == "Change the level of edema from mild to moderate to moderate to severe."
    assert parse(render([edit])).edits == (edit,)


def test_render_joins_a_sentence_only_for_a_parsed_instruction():
    edits = [add("edema", severity="mild"), add("atelectasis", location="bilateral")]
    assert render(edits) == "Add the finding of mild edema. Add the finding of bilateral atelectasis."
    assert render_sentence(edits) == "Add the findings of mild edema and bilateral atelectasis."
    assert parse(render(edits)).sentence_ids == (0, 1)
    assert parse(render_sentence(edits)).sentence_ids == (0, 0)


# --- randomized round trip --------------------------------------------------------------------------------------

SCALE = ("trace", "small", "mild", "moderate", "severe", "large", "massive", "minimal")


def _random_level(rng):
    if rng.random() < 0.2:
        return f"{rng.choice(SCALE)} to {rng.choice(SCALE)}"
    return rng.choice(LEVEL_WORDS)


def _random_location(rng):
    words = [rng.choice(LOCATION_WORDS) for _ in range(rng.randint(1, 3))]
    location = words[0]
    for word in words[1:]:
        location += rng.choice([" ", " ", "-", " to ", "-to-"]) + word
    return location


def _random_edit(rng, op=None):
    op = op or rng.choice(OPS)
    location = _random_location(rng) if rng.random() < 0.5 else None
    if op == "change":
        return change(rng.choice(FINDINGS), location=location, level_from=_random_level(rng),
                      level_to=_random_level(rng))
    findings = rng.sample(FINDINGS, rng.randint(1, 3))
    severity = _random_level(rng) if rng.random() < 0.5 else None
    return Edit(op, tuple(findings), severity=severity, location=location)


def test_random_edits_round_trip():
    rng = random.Random(20250101)
    for _ in range(3000):
        edits = tuple(_random_edit(rng) for _ in range(rng.randint(1, 4)))
        text = render(edits)
        parsed = parse(text)
        assert parsed.edits == edits, text
        assert parsed.complete, text
        assert render(parsed) == text


def _merge_runs(edits):
    """What parse makes of one sentence: adjacent edits with the same severity and location merge."""
    merged = []
    for e in edits:
        if merged and (merged[-1].severity, merged[-1].location) == (e.severity, e.location):
            merged[-1] = dataclasses.replace(merged[-1], findings=merged[-1].findings + e.findings)
        else:
            merged.append(e)
    return tuple(merged)


def test_random_multi_finding_sentences_round_trip():
    rng = random.Random(7)
    for _ in range(1000):
        op = rng.choice(["add", "remove"])
        edits = [_random_edit(rng, op) for _ in range(rng.randint(2, 4))]
        text = render_sentence(edits)
        parsed = parse(text)
        assert parsed.edits == _merge_runs(edits), text
        assert render(parsed) == text


@pytest.mark.parametrize("edit", [
    Edit("grow", ("edema",)),
    Edit("add", ()),
    Edit("add", ("Edema",)),
    Edit("add", ("pulmonary edema",)),  # a synonym, not a canonical name
    Edit("add", ("edema",), severity="Mild"),
    Edit("add", ("edema",), severity="huge"),
    Edit("add", ("edema",), location="the left lung"),
    Edit("add", ("edema",), location="left pleural space"),
    Edit("add", ("edema",), level_from="mild", level_to="severe"),
    Edit("change", ("edema",), level_from="mild"),
    Edit("change", ("edema", "pneumonia"), level_from="mild", level_to="severe"),
    Edit("change", ("edema",), severity="mild", level_from="mild", level_to="severe"),
])
def test_render_rejects_edits_outside_the_grammar(edit):
    with pytest.raises(ValueError):
        render([edit])


# --- whole-phrase matching and synonyms -------------------------------------------------------------------------

@pytest.mark.parametrize("phrase", [
    "herniation", "hernias of the disc", "pneumothoraxx", "pneumo", "edematous", "xedema", "cardiomegalyish",
    "pericardial effusion", "effusion-like", "fracture line", "opacity of the mediastinum", "lung",
])
def test_no_substring_matches(phrase):
    parsed = parse(f"Add the finding of {phrase}.")
    assert parsed.edits == ()
    assert parsed.unknown_findings == (phrase,)
    assert parsed.unparsed == (f"Add the finding of {phrase}.",)


@pytest.mark.parametrize(("phrase", "canonical"), [
    ("pneumothorax", "pneumothorax"),
    ("pneumomediastinum", "pneumomediastinum"),
    ("tortuosity of the thoracic aorta", "tortuosity of the thoracic aorta"),
    ("tortuosity of the descending aorta", "tortuosity of the descending aorta"),
    ("enlargement of the cardiac silhouette", "enlargement of the cardiac silhouette"),
    ("enlarged cardiac silhouette", "enlargement of the cardiac silhouette"),
    ("enlarged heart", "cardiomegaly"),
    ("cardiac enlargement", "cardiomegaly"),
    ("effusion", "pleural effusion"),
    ("Effusions", "pleural effusion"),
    ("pleural effusions", "pleural effusion"),
    ("pulmonary edema", "edema"),
    ("opacity", "lung opacity"),
    ("opacities", "lung opacity"),
    ("lung opacities", "lung opacity"),
    ("infiltrates", "lung opacity"),
    ("pneumonias", "pneumonia"),
    ("consolidations", "consolidation"),
    ("atelectases", "atelectasis"),
    ("atelectatic changes", "atelectasis"),
    ("fractures", "fracture"),
    ("granulomas", "granuloma"),
    ("calcifications", "calcification"),
    ("hematomas", "hematoma"),
    ("blunting of the costophrenic angles", "blunting of the costophrenic angle"),
    ("hiatal hernia", "hernia"),
    ("pulmonary vascular congestion", "vascular congestion"),
    ("hilar congestion", "hilar congestion"),
    ("congestive heart failure", "heart failure"),
    ("emphysematous changes", "emphysema"),
    ("HIATAL  HERNIA", "hernia"),
])
def test_synonyms(phrase, canonical):
    parsed = parse(f"Remove the finding of {phrase}.")
    assert parsed.edits == (remove(canonical),)
    assert parsed.complete


def test_every_canonical_finding_parses_to_itself():
    for name in FINDINGS:
        assert parse(f"Add the finding of {name}.").edits == (add(name),)
    assert len(set(FINDINGS)) == len(FINDINGS) == 31


def test_located_finding_keeps_the_longest_finding():
    assert parse("Add the finding of left lung opacity.").edits == (add("lung opacity", location="left"),)
    assert parse("Add the finding of left hilar congestion.").edits == (add("hilar congestion", location="left"),)


def test_scan_findings_in_free_text():
    text = "Herniation and a pericardial effusion; hiatal hernia, Effusions, pneumothorax and PNEUMOMEDIASTINUM."
    assert scan_findings(text) == ("hernia", "pleural effusion", "pneumothorax", "pneumomediastinum")
    assert scan_findings("tortuosity of the thoracic aorta") == ("tortuosity of the thoracic aorta",)
    assert scan_findings("nothing to see") == ()


# --- unknown text is kept ---------------------------------------------------------------------------------------

def test_unknown_finding_is_reported_and_known_ones_kept():
    parsed = parse("Add the findings of edema, Foo  Bar and pneumonia. Remove the finding of effusion.")
    assert parsed.edits == (add("edema", "pneumonia"), remove("pleural effusion"))
    assert parsed.unknown_findings == ("Foo  Bar",)
    assert parsed.unparsed == ()
    assert not parsed.complete
    assert findings_of(parsed) == ("edema", "pneumonia", "pleural effusion")


def test_unknown_level_or_location_word_keeps_the_whole_item():
    parsed = parse("Add the findings of humongous edema and pneumonia in the left pleural space.")
    assert parsed.edits == ()
    assert parsed.unknown_findings == ("humongous edema", "pneumonia in the left pleural space")
    assert parsed.unparsed == ("Add the findings of humongous edema and pneumonia in the left pleural space.",)


def test_unparseable_sentences_are_kept_verbatim():
    text = "Make the heart  BIGGER. Add the finding of edema; Change the level of edema from bad to worse.\nthanks!"
    parsed = parse(text)
    assert parsed.text == text
    assert parsed.edits == (add("edema"),)
    assert parsed.sentence_ids == (1,)
    assert parsed.unparsed == ("Make the heart  BIGGER.", "Change the level of edema from bad to worse.", "thanks!")
    assert render(parsed) == "Add the finding of edema."


@pytest.mark.parametrize("text", [
    "Add the finding of.",
    "Add the findings of",
    "Change the level of edema.",
    "Change the level of mild edema from mild to severe.",  # a change item has no severity
    "Change the level of foo from mild to severe.",
])
def test_incomplete_sentences_are_unparsed(text):
    parsed = parse(text)
    assert parsed.edits == ()
    assert parsed.unparsed == (text,)


def test_decimal_point_does_not_split_a_sentence():
    assert parse("Add a 1.5 cm nodule.").unparsed == ("Add a 1.5 cm nodule.",)


@pytest.mark.parametrize("text", ["", " ", "\n\t ", " . ;"])
def test_empty_text_has_no_edits(text):
    assert parse(text) == ParsedInstruction(text)
    assert parse(text).complete
    assert render(parse(text)) == ""


# --- locations --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("location", "sides", "zones"), [
    ("left", {"left"}, set()),
    ("Right", {"right"}, set()),
    ("left-sided", {"left"}, set()),
    ("bilateral", {"left", "right"}, set()),
    ("bibasilar", {"left", "right"}, {"basal"}),
    ("bibasal", {"left", "right"}, {"basal"}),
    ("left lower lobe", {"left"}, {"lower"}),
    ("right upper lung", {"right"}, {"upper"}),
    ("left mid lung", {"left"}, {"middle"}),
    ("mid-to-lower lung", set(), {"middle", "lower"}),
    ("lung bases", {"left", "right"}, {"basal"}),
    ("upper lobes", {"left", "right"}, {"upper"}),
    ("left base", {"left"}, {"basal"}),
    ("right apex", {"right"}, {"apical"}),
    ("apical", set(), {"apical"}),
    ("basilar", set(), {"basal"}),
    ("retrocardiac", set(), {"retrocardiac"}),
    ("perihilar", set(), {"perihilar"}),
    ("right middle lobe", {"right"}, {"middle"}),
    ("middle lobe", {"right"}, {"middle"}),
    ("lingula", {"left"}, {"middle"}),
    ("lung", set(), set()),
    (None, set(), set()),
])
def test_location_sides_and_zones(location, sides, zones):
    assert location_sides(location) == sides
    assert location_zones(location) == zones


def test_every_location_word_parses():
    for word in LOCATION_WORDS:
        edits = parse(f"Add the finding of edema in the {word}.").edits
        assert edits == (add("edema", location=word),)
        assert location_sides(word) <= {"left", "right"}
        assert location_zones(word) <= {"upper", "middle", "lower", "apical", "basal", "retrocardiac", "perihilar"}


def test_every_level_word_parses():
    for level in LEVEL_WORDS:
        assert parse(f"Add the finding of {level} edema.").edits == (add("edema", severity=level),)


# --- laterality -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "swapped"), [
    ("Add the finding of left pleural effusion.", "Add the finding of right pleural effusion."),
    ("Left and RIGHT and right", "Right and LEFT and left"),
    ("left-sided effusion, right-sided tube", "right-sided effusion, left-sided tube"),
    ("upper-left, rightward shift, leftmost", "upper-right, leftward shift, rightmost"),
    ("bilateral cleft, leftover bright, Rightly", "bilateral cleft, leftover bright, Rightly"),
    ("in the left lower lobe.\n(right)", "in the right lower lobe.\n(left)"),
    ("no sides here", "no sides here"),
])
def test_swap_laterality_text(text, swapped):
    assert swap_laterality(text) == swapped
    assert swap_laterality(swapped) == text


def test_swap_laterality_edits_and_parsed():
    edits = (add("pneumothorax", severity="small", location="right"), remove("edema"),
             change("pleural effusion", location="left lower lobe", level_from="small", level_to="large"),
             add("atelectasis", location="bibasilar"))
    assert swap_laterality(edits) == (add("pneumothorax", severity="small", location="left"), remove("edema"),
                                      change("pleural effusion", location="right lower lobe", level_from="small",
                                             level_to="large"),
                                      add("atelectasis", location="bibasilar"))
    assert swap_laterality(edits[0]) == add("pneumothorax", severity="small", location="left")

    parsed = parse(render(edits) + " Make the left side darker.")
    flipped = swap_laterality(parsed)
    assert flipped.edits == swap_laterality(edits)
    assert flipped.unparsed == ("Make the right side darker.",)
    assert flipped == parse(swap_laterality(parsed.text))
    assert swap_laterality(flipped) == parsed
