"""Codes for the router's answers: standard ones where DICOM/SNOMED CT has them, else ``99ONEVLM``.

Private codes are stable: the code value is derived from the text (a short hash), so the same
modality string, finding or card gets the same code in every report. The scheme is declared in
each object's Coding Scheme Identification Sequence.
"""

from __future__ import annotations

import hashlib
import re
from typing import Iterable

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

SCHEME = "99ONEVLM"
SCHEME_NAME = "onevlm router and specialty model concepts (private, research use only)"


def _per_stage(value: str, meaning: str, stages: tuple[int, ...] = (1, 2, 3)) -> dict[int, CodedConcept]:
    """One concept per router stage: code value ``<value>-S<n>``, meaning ``<meaning>, stage <n>``."""
    return {stage: CodedConcept(f"{value}-S{stage}", SCHEME, f"{meaning}, stage {stage}") for stage in stages}


#: Concept names of the routing report's content items.
MODALITY_CONCEPT = CodedConcept("RTR-MODALITY", SCHEME, "Imaging modality (router stage 1)")
FINDING_CONCEPT = CodedConcept("RTR-FINDING", SCHEME, "Primary finding (router stage 2)")
CARD_CONCEPT = CodedConcept("RTR-CARD", SCHEME, "Selected model card (router stage 3)")
OUTCOME_CONCEPT = CodedConcept("RTR-OUTCOME", SCHEME, "Routing outcome")
CONFIDENCE_CONCEPT = CodedConcept("RTR-CONF", SCHEME, "Route confidence")
CARD_SET_CONCEPT = CodedConcept("RTR-CARDSET", SCHEME, "Model card in the routed set")
CALIBRATION_CONCEPT = CodedConcept("RTR-CALIB", SCHEME, "Router calibration")
CALIBRATED = CodedConcept("RTR-CALIBRATED", SCHEME, "Calibrated on the site's labelled studies")
UNCALIBRATED = CodedConcept("RTR-UNCALIBRATED", SCHEME, "Uncalibrated (no site calibration)")
FINDING_NOT_ASSESSED = CodedConcept("RTR-NOEVIDENCE", SCHEME, "Not assessed: no finding evidence")
STAGE_CONFIDENCE_CONCEPTS = _per_stage("RTR-CONF", "Router confidence")
BOX_FINDING_CONCEPT = CodedConcept("RTR-BOX", SCHEME, "Detected region (specialty model)")
UNITLESS = CodedConcept("1", "UCUM", "no units")

OUTCOME_ROUTED = CodedConcept("RTR-ROUTED", SCHEME, "Routed to a model card")
OUTCOME_ROUTED_SET = CodedConcept("RTR-ROUTEDSET", SCHEME, "Routed to a set of model cards")
OUTCOME_REVIEW = CodedConcept("RTR-REVIEW", SCHEME, "Requires human review")
OUTCOME_NOT_MEDICAL = CodedConcept("RTR-STOP-NONE", SCHEME, "Stopped early: not a medical image")
OUTCOME_NOT_COVERED = CodedConcept("RTR-STOP-OTHER", SCHEME, "Stopped early: no card covers the modality")
OUTCOME_OUT_OF_SET = CodedConcept("RTR-STOP-OOS", SCHEME, "Stopped: answer outside the admissible set")
OUTCOME_NO_CARD = CodedConcept("RTR-NO-CARD", SCHEME, "No candidate model card fits")
OUTCOME_FAILED = CodedConcept("RTR-FAILED", SCHEME, "Not routed: the image could not be processed")

#: The specialty model's part (route -> execute): whether the card ran, and its answer.
EXECUTION_CONCEPT = CodedConcept("SPC-STATUS", SCHEME, "Specialty model execution")
EXECUTION_STATUS = {
    "executed": CodedConcept("SPC-EXECUTED", SCHEME, "Executed by the specialty model"),
    "unparseable": CodedConcept("SPC-UNPARSEABLE", SCHEME, "Specialty model answer not parseable"),
    "not-executable": CodedConcept("SPC-NOT-EXEC", SCHEME, "Model card not executable here"),
    "failed": CodedConcept("SPC-FAILED", SCHEME, "Specialty model failed"),
}
TASK_CONCEPT = CodedConcept("SPC-TASK", SCHEME, "Specialty task")
CLASS_CONCEPT = CodedConcept("SPC-CLASS", SCHEME, "Class (specialty model)")
GRADE_CONCEPT = CodedConcept("SPC-GRADE", SCHEME, "Grade (specialty model)")
PRESENT_FINDING_CONCEPT = CodedConcept("SPC-FINDING", SCHEME, "Finding present (specialty model)")
NO_FINDING_PRESENT = CodedConcept("SPC-NONE", SCHEME, "None of the task's findings present")
REGION_COUNT_CONCEPT = CodedConcept("SPC-NREGIONS", SCHEME, "Regions found (specialty model)")
REGION_UNIT = CodedConcept("{regions}", "UCUM", "regions")

#: Which evidence about the image a stage read (the hybrid router reads the header first and the
#: pixels only when the header cannot decide; stage 3 reads neither): one evaluation per stage shown.
STAGE_SOURCES_CONCEPTS = _per_stage("RTR-SRC", "Evidence consulted")
SOURCES_HEADER = CodedConcept("RTR-SRC-HDR", SCHEME, "Header only")
SOURCES_PIXELS = CodedConcept("RTR-SRC-PIX", SCHEME, "Image pixels only")
SOURCES_HEADER_AND_PIXELS = CodedConcept("RTR-SRC-HDRPIX", SCHEME, "Header and image pixels")
SOURCES_TEXT_ONLY = CodedConcept("RTR-SRC-TEXT", SCHEME, "Text only (neither header nor pixels)")
#: The series' calls to the vision-language model, all stages together (0: routed without the VLM).
VLM_CALLS_CONCEPT = CodedConcept("RTR-VLMCALLS", SCHEME, "VLM calls (router, this series)")
CALLS_UNIT = CodedConcept("{calls}", "UCUM", "calls")
#: A stage whose header and image contradict each other: the evaluation, then each side's answer.
HEADER_IMAGE_CONCEPTS = _per_stage("RTR-HDRIMG", "Header and image", (1, 2))
HEADER_IMAGE_DISAGREE = CodedConcept("RTR-DISAGREE", SCHEME, "Header and image disagree")
HEADER_ANSWER_CONCEPTS = _per_stage("RTR-HDRANS", "Header's answer", (1, 2))
PIXELS_ANSWER_CONCEPTS = _per_stage("RTR-PIXANS", "Image's answer", (1, 2))

ANSWER_NONE = CodedConcept("RTR-NONE", SCHEME, "None")
ANSWER_OTHER = CodedConcept("RTR-OTHER", SCHEME, "Other")


def scheme_item() -> CodingSchemeIdentificationItem:
    """The Coding Scheme Identification item declaring ``99ONEVLM``."""
    return CodingSchemeIdentificationItem(designator=SCHEME, name=SCHEME_NAME, responsible_organization="onevlm")


def _meaning(text: str) -> str:
    # Code Meaning is LO: at most 64 characters.
    text = " ".join(text.split())
    return text if len(text) <= 64 else text[:61] + "..."


def private_code(kind: str, text: str) -> CodedConcept:
    """A stable private code: value ``<KIND>-<hash>`` (at most 16 characters), meaning ``text``."""
    digest = hashlib.sha1(text.strip().lower().encode("utf-8")).hexdigest()[:10].upper()
    return CodedConcept(f"{kind[:4]}-{digest}", SCHEME, _meaning(text))


def _keyword(text: str) -> str:
    return "".join(word.capitalize() for word in re.findall(r"[A-Za-z0-9]+", text))


def standard_sct(text: str) -> CodedConcept | None:
    """The SNOMED CT code DICOM's code tables give this text's name, if any (``Normal``, ``Mass``…)."""
    keyword = _keyword(text)
    if not keyword:
        return None
    try:
        code = getattr(codes.SCT, keyword)
    except AttributeError:
        return None
    return CodedConcept(code.value, code.scheme_designator, code.meaning)


def modality_answer_code(answer: str) -> CodedConcept:
    """Stage 1's answer: a modality string (private code), ``None`` or ``Other``."""
    if answer == "None":
        return ANSWER_NONE
    if answer == "Other":
        return ANSWER_OTHER
    return private_code("MOD", answer)


def finding_code(answer: str) -> CodedConcept:
    """Stage 2's answer: SNOMED CT where DICOM's tables name it (e.g. Normal 17621005), else private."""
    return standard_sct(answer) or private_code("FND", answer)


def stage_answer_code(stage: int, answer: str) -> CodedConcept:
    """A stage-1 (modality) or stage-2 (finding) answer, coded as that stage's answers are."""
    return modality_answer_code(answer) if stage == 1 else finding_code(answer)


def sources_code(consulted: Iterable[str]) -> CodedConcept:
    """What a stage read: ``("header",)``, ``("pixels",)``, both, or nothing (text only)."""
    read = set(consulted)
    unknown = read - {"header", "pixels"}
    if unknown:
        raise ValueError(f"unknown evidence sources: {', '.join(sorted(unknown))}")
    if read == {"header", "pixels"}:
        return SOURCES_HEADER_AND_PIXELS
    if read == {"header"}:
        return SOURCES_HEADER
    if read == {"pixels"}:
        return SOURCES_PIXELS
    return SOURCES_TEXT_ONLY


def card_code(card_id: str, caption: str | None = None) -> CodedConcept:
    """Stage 3's answer: the card ID is the code value; the meaning adds the caption."""
    if card_id == "None":
        return ANSWER_NONE
    meaning = f"{card_id}: {caption}" if caption else card_id
    return CodedConcept(card_id, SCHEME, _meaning(meaning))


def task_code(specialty: str, task: str) -> CodedConcept:
    """The specialty task that ran (``<specialty>/<task>``), a stable private code."""
    return private_code("TSK", f"{specialty}/{task}")


def grade_code(grade: int, name: str) -> CodedConcept:
    """A grading answer: ``grade <n>: <name>``, a stable private code."""
    return private_code("GRD", f"grade {grade}: {name}")


def acquisition_modality_code(dicom_modality: str) -> CodedConcept | None:
    """CID 29 (Acquisition Modality) code for a DICOM Modality value such as ``CT``."""
    for keyword in dir(codes.cid29):
        if keyword.startswith("_"):
            continue
        try:
            code = getattr(codes.cid29, keyword)
        except AttributeError:
            continue
        if getattr(code, "value", None) == dicom_modality:
            return CodedConcept(code.value, code.scheme_designator, code.meaning)
    return None
