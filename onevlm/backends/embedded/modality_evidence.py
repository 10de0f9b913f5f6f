"""Stage 1 of the embedded backend: the modality from DICOM header evidence.

Each admissible modality gets a score (a logit) from what the header says, and a softmax with
a stated temperature turns the scores into probabilities, so Algorithm 1, Algorithm 2 and ECE
apply unchanged. The weights below are hand-set evidence units (about one unit per factor e of
odds); they are documented, not fitted.

- DICOM Modality code accepted by the modality's cards: ``+CODE_MATCH``; not accepted:
  ``CODE_MISMATCH``. Uninformative codes (OT, missing) score 0 for every modality.
- Anatomy from Body Part Examined, the anatomic region and the descriptions: an organ-level
  match ``+ORGAN_MATCH``; only a generic region matches (abdomen, chest…) ``+GENERIC_MATCH``,
  less ``ORGAN_CONFLICT`` if the text names another organ; no overlap ``ANATOMY_MISMATCH``.
- ``Other`` starts at ``OTHER_BASE`` and gains ``OTHER_BONUS`` when no admissible modality
  accepts the code, and again when the header names anatomy that none of the modalities
  accepting the code covers.
- ``None`` is ``NONE_FOR_NON_IMAGE`` for objects that are not images (SR, RT plan, ECG…),
  otherwise ``NONE_FOR_IMAGE``: a DICOM image is a medical image.

The evidence also says whether the header **corroborates** its top answer (:func:`corroboration`):
the answer is backed by two independent header statements and contradicted by none. It does not
change the probabilities; the hybrid router lets the header decide alone only when it holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from onevlm.backends.embedded.anatomy import GENERIC_REGIONS, expand, region_of_body_part, regions_in_text
from onevlm.backends.embedded.distribution import Ranked, softmax_ranking
from onevlm.cards.repository import CardRepository
from onevlm.dicom.header import DicomHeader
from onevlm.router.backend import NONE, OTHER

TEMPERATURE = 1.0
CODE_MATCH = 2.0
CODE_MISMATCH = -4.0
ORGAN_MATCH = 2.5
GENERIC_MATCH = 1.5
ORGAN_CONFLICT = 1.0
ANATOMY_MISMATCH = -2.0
PHOTOMETRIC_MATCH = 0.5
OTHER_BASE = 1.5
OTHER_BONUS = 2.0
NONE_FOR_NON_IMAGE = 8.0
NONE_FOR_IMAGE = -3.0
HINT_MATCH = 4.0

UNINFORMATIVE_CODES = frozenset({"", "OT"})
PHOTOGRAPHIC_CODES = frozenset({"XC", "OP", "ES", "SM", "GM", "IO", "PX"})
COLOUR_PHOTOMETRICS = ("RGB", "YBR", "PALETTE")


@dataclass(frozen=True)
class ModalityProfile:
    """What the cards of one modality string accept."""

    modality: str
    codes: frozenset[str]
    regions: frozenset[str]


def modality_profiles(cards: CardRepository) -> list[ModalityProfile]:
    """One profile per admissible modality: the union of its cards' DICOM codes and regions."""
    profiles = []
    for modality in cards.modalities:
        members = cards.by_modality(modality)
        codes = frozenset(code for card in members for code in card.dicom.modalities)
        regions = frozenset(
            r for card in members for bp in card.dicom.body_parts if (r := region_of_body_part(bp))
        )
        profiles.append(ModalityProfile(modality, codes, regions))
    return profiles


def header_regions(header: DicomHeader) -> tuple[list[str], list[str]]:
    """Regions named by the header, and a readable note of where each came from."""
    regions: list[str] = []
    notes: list[str] = []
    if header.body_part_examined:
        region = region_of_body_part(header.body_part_examined)
        if region:
            regions.append(region)
            notes.append(f"BodyPartExamined {header.body_part_examined} -> {region}")
        else:
            notes.append(f"BodyPartExamined {header.body_part_examined} not recognised")
    texts = [("AnatomicRegion", header.anatomic_region)] if header.anatomic_region else []
    texts += list(header.descriptions)
    if header.image_type[2:]:
        # Value 3 onward of Image Type often names the exam (US: ABDOMINAL, OBSTETRICAL…).
        texts.append(("ImageType", " ".join(header.image_type[2:])))
    for field_name, text in texts:
        for region in regions_in_text(text):
            if region not in regions:
                regions.append(region)
            notes.append(f"{field_name} '{text}' names {region}")
    return regions, notes


#: Fewest independent header statements that must back an answer before the header may decide alone.
MIN_STATEMENTS = 2


def anatomy_statements(header: DicomHeader) -> list[tuple[str, tuple[str, ...]]]:
    """Each independent statement of anatomy in the header: ``(field, regions)``.

    Body Part Examined, the anatomic region, each description and Image Type's exam values; a text
    repeated in several fields (a study description copied into the series description) counts once.
    """
    statements: list[tuple[str, tuple[str, ...]]] = []
    if header.body_part_examined and (region := region_of_body_part(header.body_part_examined)):
        statements.append(("BodyPartExamined", (region,)))
    texts = [("AnatomicRegion", header.anatomic_region)] if header.anatomic_region else []
    texts += list(header.descriptions)
    if header.image_type[2:]:
        texts.append(("ImageType", " ".join(header.image_type[2:])))
    seen: set[str] = set()
    for field_name, text in texts:
        key = " ".join(text.lower().split())
        regions = tuple(regions_in_text(text))
        if regions and key not in seen:
            seen.add(key)
            statements.append((field_name, regions))
    return statements


def corroboration(header: DicomHeader, answer: str, profiles: list[ModalityProfile]) -> dict:
    """Whether the header backs ``answer`` with independent statements that nothing in it contradicts.

    A modality is corroborated when the Modality code is one its cards accept and at least
    :data:`MIN_STATEMENTS` anatomy statements name a region it accepts while none names only
    regions it does not. ``Other`` is corroborated when no card accepts the Modality code, or when
    that many statements name anatomy that none of the code's cards covers. One field alone is
    never enough: Body Part Examined alone is wrong on about 15 % of images (Güld et al., 2002).
    """
    code = header.effective_modality
    informative = code not in UNINFORMATIVE_CODES
    statements = anatomy_statements(header)

    def backs(regions: tuple[str, ...], accepted: set[str] | frozenset[str]) -> bool:
        # an organ named must be accepted; a statement naming only generic regions backs what contains them
        organs = [r for r in regions if r not in GENERIC_REGIONS]
        if organs:
            return any(r in accepted for r in organs)
        return bool(expand(regions) & expand(accepted))

    out = {"answer": answer, "supporting": [], "conflicting": [], "code_backs_answer": False, "corroborated": False}
    if answer == OTHER:
        accepting = [p for p in profiles if code in p.codes] if informative else []
        if informative and not accepting:
            out.update(code_backs_answer=True, corroborated=True, supporting=["Modality"])
            return out
        covered = set().union(*(p.regions for p in accepting)) if accepting else set()
        uncovered = [(f, set(regions)) for f, regions in statements if not backs(regions, covered)]
        out["conflicting"] = [f for f, regions in statements if backs(regions, covered)]
        # statements for Other must agree with each other: the same uncovered region
        shared = set.intersection(*(expand(r) for _, r in uncovered)) if uncovered else set()
        out["supporting"] = [f for f, _ in uncovered] if shared else [f for f, _ in uncovered[:1]]
        out["corroborated"] = len(out["supporting"]) >= MIN_STATEMENTS and not out["conflicting"]
        return out
    else:
        profile = next((p for p in profiles if p.modality == answer), None)
        if profile is None or not informative or code not in profile.codes:
            return out
        out["code_backs_answer"] = True
        for field_name, regions in statements:
            (out["supporting"] if backs(regions, profile.regions) else out["conflicting"]).append(field_name)
    out["corroborated"] = len(out["supporting"]) >= MIN_STATEMENTS and not out["conflicting"]
    return out


def anatomy_score(evidence: set[str], accepted: frozenset[str]) -> tuple[float, str]:
    """Score one modality's accepted regions against the header's regions."""
    if not evidence:
        return 0.0, "no anatomy in header"
    organs = {r for r in evidence if r not in GENERIC_REGIONS}
    organ_hits = organs & accepted
    if organ_hits:
        return ORGAN_MATCH, f"anatomy {sorted(organ_hits)} accepted"
    generic_hits = expand(evidence) & GENERIC_REGIONS & accepted
    if generic_hits:
        score = GENERIC_MATCH
        note = f"generic region {sorted(generic_hits)} accepted"
        if organs:
            score -= ORGAN_CONFLICT
            note += f", but header names {sorted(organs)}"
        return score, note
    return ANATOMY_MISMATCH, f"anatomy {sorted(evidence)} not accepted"


def rank_modalities(header: DicomHeader, profiles: list[ModalityProfile]) -> tuple[list[Ranked], dict]:
    """Stage-1 distribution over the modalities, ``None`` and ``Other`` for a DICOM header."""
    non_image = header.non_image_kind
    code = header.effective_modality
    regions, region_notes = header_regions(header)
    evidence_regions = set(regions)
    informative = code not in UNINFORMATIVE_CODES
    colour = header.photometric_interpretation.startswith(COLOUR_PHOTOMETRICS)
    answers, logits, reasons = [], [], {}
    for profile in profiles:
        score = 0.0
        why = []
        if informative:
            if code in profile.codes:
                score += CODE_MATCH
                why.append(f"Modality {code} accepted")
            else:
                score += CODE_MISMATCH
                why.append(f"Modality {code} not accepted")
        elif header.photometric_interpretation:
            photographic = bool(profile.codes & PHOTOGRAPHIC_CODES)
            if photographic == colour:
                score += PHOTOMETRIC_MATCH
                why.append(f"{header.photometric_interpretation} suits {'photographic' if colour else 'grey-scale'} modalities")
        part, note = anatomy_score(evidence_regions, profile.regions)
        score += part
        why.append(note)
        answers.append(profile.modality)
        logits.append(score)
        reasons[profile.modality] = "; ".join(why)

    accepting = [p for p in profiles if code in p.codes] if informative else list(profiles)
    other = OTHER_BASE
    other_why = ["base"]
    if informative and not accepting:
        other += OTHER_BONUS
        other_why.append(f"no card accepts Modality {code}")
    organs = {r for r in evidence_regions if r not in GENERIC_REGIONS}
    covered = set().union(*(p.regions for p in accepting)) if accepting else set()
    if organs:
        uncovered = not organs & covered
    else:
        uncovered = bool(evidence_regions) and not evidence_regions & expand(covered)
    if uncovered:
        other += OTHER_BONUS
        other_why.append(f"no card for this Modality covers {sorted(organs or evidence_regions)}")
    answers.append(OTHER)
    logits.append(other)
    reasons[OTHER] = "; ".join(other_why)

    answers.append(NONE)
    logits.append(NONE_FOR_NON_IMAGE if non_image else NONE_FOR_IMAGE)
    reasons[NONE] = f"not an image: {non_image}" if non_image else "a DICOM image is a medical image"

    ranking = softmax_ranking(answers, logits, TEMPERATURE)
    evidence = {
        "method": "dicom-header-rules-v1",
        "pixels_read": False,
        "temperature": TEMPERATURE,
        "header": header.evidence(),
        "anatomy": region_notes,
        "non_image": non_image,
        "reasons": {r.answer: reasons[r.answer] for r in ranking[:2]},
        "corroboration": corroboration(header, ranking[0].answer, profiles),
    }
    return ranking, evidence


def rank_for_image_file(hint: str | None, profiles: list[ModalityProfile], matched_hint: str | None) -> tuple[list[Ranked], dict]:
    """Stage-1 distribution for a PNG/JPEG: the user's hint, else ``Other`` with low confidence.

    ``matched_hint`` is the admissible modality the hint was normalised onto (or ``None``).
    """
    answers = [p.modality for p in profiles] + [OTHER, NONE]
    logits = [0.0] * len(profiles) + [1.0, 0.5]
    if matched_hint is not None:
        logits[answers.index(matched_hint)] = HINT_MATCH
    ranking = softmax_ranking(answers, logits, TEMPERATURE)
    if matched_hint is not None:
        source = f"user hint '{hint}' -> {matched_hint}"
    elif hint:
        source = f"user hint '{hint}' matches no admissible modality"
    else:
        source = "no DICOM header and no hint: the modality is unknown"
    evidence = {
        "method": "image-file-hint-v1",
        "pixels_read": False,
        "temperature": TEMPERATURE,
        "hint": hint,
        "source": source,
        "informative": matched_hint is not None,
    }
    return ranking, evidence
