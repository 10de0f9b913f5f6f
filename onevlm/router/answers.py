"""Map a backend's raw answer text onto a stage's admissible answers.

Matching is forgiving about case, surrounding punctuation, quotes and lead-ins ("Answer:"),
and accepts an admissible answer contained in a longer sentence or a close spelling. What
does not match stays outside the set: the router logs it as such and never coerces it.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Sequence

#: How close (difflib ratio) a misspelling must be to count as an admissible answer.
CLOSE_MATCH_CUTOFF = 0.88

_LEAD_IN = re.compile(r"^\s*(?:final\s+)?(?:answer|response|scan type|modality|finding|model)\s*[:\-]\s*", re.I)
_CARD_ID = re.compile(r"\bMODEL[\s_\-]?(\d{1,4})\b", re.I)


@dataclass(frozen=True)
class NormalisedAnswer:
    """A raw answer and what it maps to.

    Attributes
    ----------
    answer:
        The admissible answer it matched, or the cleaned text when ``in_allowed_set`` is False.
    raw:
        The text exactly as the backend produced it.
    in_allowed_set:
        Whether ``answer`` is one of the admissible answers.
    match:
        ``exact``, ``contained``, ``close`` or ``none`` (how the match was made).
    justification:
        Stage 3 only: the text after the card ID.
    """

    answer: str
    raw: str
    in_allowed_set: bool
    match: str
    justification: str | None = None


def clean(text: str) -> str:
    """First non-empty line, without lead-ins, quotes, markdown and trailing punctuation."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    first = _LEAD_IN.sub("", first)
    first = first.strip().strip("*`\"'“”‘’ ").strip()
    first = re.sub(r"[.!;,:]+$", "", first).strip()
    return " ".join(first.split())


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9&+()]+", " ", text.lower()).strip()


def normalise(raw: str, allowed: Sequence[str]) -> NormalisedAnswer:
    """Match ``raw`` onto ``allowed`` (stage 1 and 2 answers).

    Order of preference: exact (ignoring case and punctuation), the longest admissible answer
    contained as a phrase in the text, then a close spelling.
    """
    cleaned = clean(raw)
    key = _key(cleaned)
    keys = {_key(a): a for a in allowed}
    if key in keys:
        return NormalisedAnswer(keys[key], raw, True, "exact")
    padded = f" {key} "
    contained = [a for k, a in keys.items() if k and f" {k} " in padded]
    if contained:
        # "Other"/"None"/"Normal" inside a sentence are words, not answers, unless alone.
        specific = [a for a in contained if _key(a) not in ("none", "other", "normal")]
        if specific:
            return NormalisedAnswer(max(specific, key=len), raw, True, "contained")
    first_word = key.split(" ")[0] if key else ""
    for special in ("none", "other", "normal"):
        if first_word == special and special in keys and len(key.split()) <= 3:
            return NormalisedAnswer(keys[special], raw, True, "contained")
    close = difflib.get_close_matches(key, list(keys), n=1, cutoff=CLOSE_MATCH_CUTOFF)
    if close:
        return NormalisedAnswer(keys[close[0]], raw, True, "close")
    return NormalisedAnswer(cleaned, raw, False, "none")


def normalise_modality_hint(hint: str, modalities: Sequence[str]) -> str | None:
    """Map a user's modality hint onto one of the cards' ``modalities``, or ``None``.

    The hint is matched as the router matches a stage-1 answer (:func:`normalise`). Every card
    modality ends in a kind of image ("chest X-ray scan") that users leave out ("chest x-ray"),
    so a hint that matches nothing is tried once more as ``"<hint> scan"``; that second try takes
    only an exact or close match, never a modality merely contained in it ("left knee brain CT"
    is not "brain CT scan").

    Parameters
    ----------
    hint:
        The user's words, e.g. ``"chest x-ray"``.
    modalities:
        The admissible modalities (:attr:`CardRepository.modalities`); ``None`` and ``Other`` are
        not modalities a user can hint.

    Returns
    -------
    str or None
        The admissible modality, or ``None`` when the hint names none of them.
    """
    direct = normalise(hint, modalities)
    if direct.in_allowed_set:
        return direct.answer
    cleaned = clean(hint)
    if not cleaned:
        return None
    scanned = normalise(f"{cleaned} scan", modalities)
    if scanned.in_allowed_set and scanned.match in ("exact", "close"):
        return scanned.answer
    return None


def normalise_card_choice(raw: str, card_ids: Sequence[str], none_answer: str = "None") -> NormalisedAnswer:
    """Parse a stage-3 answer: ``MODEL_07: justification`` or ``None``.

    The ID must be one of ``card_ids`` (the candidates of the stage-1 modality); an ID outside
    them is kept as out-of-set, not mapped onto a candidate.
    """
    text = raw.strip()
    cleaned = clean(text)
    match = _CARD_ID.search(text)
    if match:
        card_id = f"MODEL_{match.group(1).zfill(2)}"
        by_number = {int(c.split("_")[1]): c for c in card_ids}
        canonical = by_number.get(int(match.group(1)))
        rest = text[match.end():].lstrip(" :-–—\t*`_").strip()
        justification = " ".join(rest.split()) or None
        if canonical is not None:
            how = "exact" if match.group(0) == canonical else "close"
            return NormalisedAnswer(canonical, raw, True, how, justification)
        return NormalisedAnswer(card_id, raw, False, "none", justification)
    if _key(cleaned).split(" ")[:1] == ["none"]:
        rest = re.sub(r"^\s*none\b[\s.:\-–—]*", "", text, flags=re.I).strip()
        return NormalisedAnswer(none_answer, raw, True, "exact", " ".join(rest.split()) or None)
    return NormalisedAnswer(cleaned, raw, False, "none")
