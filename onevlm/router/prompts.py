"""Every router prompt, in one place and versioned.

The wording follows section 3 of the paper. Each rendered prompt carries a ``prompt_id``
(stage, version and a hash of the template text) that goes into the decision log, so a log
line always says which wording produced it. Change a template: bump ``PROMPT_VERSION``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

PROMPT_VERSION = "1"

SYSTEM_PROMPT = (
    "You are an expert in medical imaging. You answer tersely and only with what is asked."
)

STAGE1_TEMPLATE = (
    "Identify the imaging modality (scan type) of this image.\n"
    "Admissible scan types:\n"
    "{modalities}\n"
    "Rules:\n"
    "1. If the image is not a medical scan, respond only with: None\n"
    "2. If it is a medical scan, respond with the single most appropriate scan name from the list, "
    "written exactly as in the list.\n"
    "3. If it is a medical scan but none of the listed scan types fits, respond only with: Other\n"
    "Answer with the scan name only."
)

STAGE2_TEMPLATE = (
    "Identify the single most likely disease or finding apparent in this scan. "
    "If no disease is present, respond only with: Normal\n"
    "Answer with the name of the finding only."
)

STAGE3_TEMPLATE = (
    "Select the model that should analyse this patient's scan.\n"
    "Patient scan details: {modality}\n"
    "Primary abnormality: {finding}\n"
    "Candidate models:\n"
    "{candidates}\n"
    "Instructions:\n"
    "(i) Review each candidate's task description.\n"
    "(ii) Select a model only if its task explicitly matches both the scan type and the abnormality.\n"
    "(iii) If no candidate fits, respond only with: None\n"
    "(iv) Otherwise respond with the model code, a colon and a one-line justification, "
    "for example: MODEL_04: it classifies this abnormality in this scan type."
)

_TEMPLATES = {1: STAGE1_TEMPLATE, 2: STAGE2_TEMPLATE, 3: STAGE3_TEMPLATE}


@dataclass(frozen=True)
class StagePrompt:
    """A rendered stage prompt.

    Attributes
    ----------
    prompt_id:
        ``stage<k>-v<version>-<hash8>``: identifies the template, not the filled-in values.
    system, user:
        The system and user turn texts.
    uses_image:
        Whether the image is shown (stages 1–2) or masked (stage 3).
    """

    prompt_id: str
    system: str
    user: str
    uses_image: bool


def prompt_id(stage: int) -> str:
    """The identifier of a stage's current template."""
    digest = hashlib.sha256((SYSTEM_PROMPT + "\x00" + _TEMPLATES[stage]).encode()).hexdigest()[:8]
    return f"stage{stage}-v{PROMPT_VERSION}-{digest}"


def stage1_prompt(modalities: Sequence[str]) -> StagePrompt:
    """Stage 1: modality from the admissible list, ``None`` (not medical) or ``Other``."""
    listing = "\n".join(f"- {m}" for m in modalities)
    return StagePrompt(prompt_id(1), SYSTEM_PROMPT, STAGE1_TEMPLATE.format(modalities=listing), True)


def stage2_prompt() -> StagePrompt:
    """Stage 2: the single most likely finding, or ``Normal`` (independent of stage 1)."""
    return StagePrompt(prompt_id(2), SYSTEM_PROMPT, STAGE2_TEMPLATE, True)


def stage3_prompt(modality: str, finding: str, candidates: Sequence[tuple[str, str]]) -> StagePrompt:
    """Stage 3: choose among ``(card_id, caption)`` pairs with the image masked."""
    listing = "\n".join(f"- {card_id}: {caption}" for card_id, caption in candidates)
    user = STAGE3_TEMPLATE.format(modality=modality, finding=finding, candidates=listing)
    return StagePrompt(prompt_id(3), SYSTEM_PROMPT, user, False)
