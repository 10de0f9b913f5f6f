"""Answer normalisation onto the admissible set, and the versioned prompt templates."""

import pytest

from onevlm.router import prompts
from onevlm.router.answers import normalise, normalise_card_choice

ALLOWED = ["brain CT scan", "brain MRI scan", "breast histopathology (H&E) scan", "chest X-ray scan", "None", "Other"]


@pytest.mark.parametrize(
    "raw,answer,match",
    [
        ("brain CT scan", "brain CT scan", "exact"),
        ("Brain CT Scan.", "brain CT scan", "exact"),
        ("**brain ct scan**", "brain CT scan", "exact"),
        ("Answer: chest x-ray scan", "chest X-ray scan", "exact"),
        ("This image is a brain MRI scan.", "brain MRI scan", "contained"),
        ("None", "None", "exact"),
        ("none.", "None", "exact"),
        ("Other", "Other", "exact"),
        ("brian CT scan", "brain CT scan", "close"),
        ("breast histopathology (H&E) scan\nbecause of the stain", "breast histopathology (H&E) scan", "exact"),
    ],
)
def test_normalise_maps_onto_the_allowed_set(raw, answer, match):
    result = normalise(raw, ALLOWED)
    assert result.in_allowed_set
    assert (result.answer, result.match) == (answer, match)
    assert result.raw == raw  # the raw text is always kept


@pytest.mark.parametrize("raw", ["a cat on a sofa", "knee MRI scan", "", "Other things I could say about it"])
def test_outside_the_set_is_never_coerced(raw):
    result = normalise(raw, ALLOWED)
    assert not result.in_allowed_set
    assert result.match == "none"


def test_card_choice_parsing():
    ids = ["MODEL_07", "MODEL_12"]
    r = normalise_card_choice("MODEL_07: classifies hemorrhage subtypes in head CT", ids)
    assert (r.answer, r.in_allowed_set, r.justification) == ("MODEL_07", True, "classifies hemorrhage subtypes in head CT")
    assert normalise_card_choice("model 12 - fits best", ids).answer == "MODEL_12"
    none = normalise_card_choice("None. No candidate fits.", ids)
    assert (none.answer, none.in_allowed_set, none.justification) == ("None", True, "No candidate fits.")
    outside = normalise_card_choice("MODEL_99: a card of another modality", ids)
    assert (outside.answer, outside.in_allowed_set) == ("MODEL_99", False)
    assert not normalise_card_choice("I am not sure", ids).in_allowed_set


def test_prompts_follow_the_paper():
    s1 = prompts.stage1_prompt(["brain CT scan", "chest X-ray scan"])
    assert "- brain CT scan\n- chest X-ray scan" in s1.user
    assert "None" in s1.user and "Other" in s1.user and s1.uses_image
    s2 = prompts.stage2_prompt()
    assert "Normal" in s2.user and s2.uses_image
    s3 = prompts.stage3_prompt("brain CT scan", "Normal", [("MODEL_01", "Detects hemorrhage.")])
    assert not s3.uses_image  # stage 3 masks the image
    assert "Patient scan details: brain CT scan" in s3.user
    assert "Primary abnormality: Normal" in s3.user
    assert "- MODEL_01: Detects hemorrhage." in s3.user


def test_prompt_ids_identify_the_template(monkeypatch):
    ids = {prompts.prompt_id(s) for s in (1, 2, 3)}
    assert len(ids) == 3 and all(i.startswith("stage") and f"-v{prompts.PROMPT_VERSION}-" in i for i in ids)
    # Same template, other values: same id. Other wording: another id.
    assert prompts.stage1_prompt(["a scan"]).prompt_id == prompts.stage1_prompt(["b scan"]).prompt_id
    before = prompts.prompt_id(2)
    monkeypatch.setitem(prompts._TEMPLATES, 2, prompts.STAGE2_TEMPLATE + " Be brief.")
    assert prompts.prompt_id(2) != before


@pytest.mark.parametrize(
    "hint,modality",
    [
        ("chest X-ray scan", "chest X-ray scan"),
        ("Chest x-ray", "chest X-ray scan"),  # "<hint> scan" matches exactly
        ("chest xray", "chest X-ray scan"),  # ... or by a close spelling
        ("brain ct", "brain CT scan"),
        ("a brain MRI scan of an adult", "brain MRI scan"),  # contained, as the router matches answers
        ("banana", None),
        ("x-ray", None),  # names no anatomy: several modalities would fit
        ("left knee brain CT", None),  # the "<hint> scan" try never takes a merely contained modality
        ("Other", None),  # not a modality a user can hint
        ("None", None),
        ("", None),
    ],
)
def test_modality_hint(hint, modality):
    from onevlm.router.answers import normalise_modality_hint

    modalities = [a for a in ALLOWED if a not in ("None", "Other")]
    assert normalise_modality_hint(hint, modalities) == modality
