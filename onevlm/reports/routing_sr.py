"""The routing result of one series as a TID 1500 Comprehensive 3D SR, built with highdicom.

Content (TID 1500 "Imaging Measurement Report"):

- observation context: the device "onevlm" (backend and model identity; the version is in the
  algorithm identification; no host paths anywhere: see :func:`without_host_paths`);
- procedure reported: the acquisition modality of the source (CID 29);
- one measurement group "onevlm routing" (TID 1501) with the algorithm identification, the
  stage answers as coded qualitative evaluations (modality, finding, model card, outcome —
  early termination is an outcome), the router's confidence and per-stage confidences as
  numeric measurements, the stage-3 justification and a research-use statement as comments;
  its first numeric measurement is INFERRED FROM the whole routed image (TID 300: a closed
  POLYLINE along the image border), because OHIF 3.13 fails to load an SR that holds a
  measurement group without any spatial coordinates — and so OHIF shows the routing group;
- in the same group, where the backend recorded which evidence each stage read (every current
  backend does), per stage shown the sources consulted as a coded evaluation (header only, image pixels only,
  header and image pixels, text only), the series' number of VLM calls as a numeric
  measurement (``{calls}``) and each consultation's reason among the algorithm parameters; when
  the header and the image disagree (hybrid router), per stage "Header and image disagree" with
  the header's and the image's answers coded as that stage's answers are, the sentence as the
  comment after the label, and the figures among the algorithm parameters. A decision without
  any consultation record (older logs) builds as before;
- with a specialty model (route -> execute), the same group also holds the execution: status
  (executed, not executable here, unparseable, failed), the task, and the answer as coded
  values (class, grade, findings present, number of regions), with the answer's summary in the
  first comment and the reason in another when the card did not run; the algorithm parameters
  name the adapter and prompt and hold the raw answer (the group keeps its one whole-image
  SCOORD: see above);
- one planar ROI group (TID 1410) per bounding box: a closed POLYLINE referencing the source
  image (and frame), with a tracking identifier and UID so viewers (OHIF) can show it.

``VerificationFlag`` is ``UNVERIFIED``; the series description says the result is not for
clinical use. UIDs are derived from the source series UID, so routing the same series twice
writes the same SR (a PACS keeps one copy).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

import highdicom as hd
import numpy as np
import pydicom
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from onevlm import __version__
from onevlm.reports import coding
from onevlm.reports.boxes import ImageBox
from onevlm.reports.source_attributes import (
    RETIRED_TO_CURRENT,
    as_current_sop_class,
    evidence_ready,
    restore_referenced_sop_classes,
)
from onevlm.router.decision import RoutingDecision, StageDecision
from onevlm.router.outcome import disagreement_text
from onevlm.specialty.execution import SpecialtyResult

SERIES_DESCRIPTION = "onevlm routing - research use only, not for clinical use"
RESEARCH_STATEMENT = (
    "Research use only: not for clinical use. Produced by onevlm (an automated model-card router and "
    "specialty model); not verified by a person."
)
SR_SERIES_NUMBER = 9901
GENERIC_IMAGING = CodedConcept("363679005", "SCT", "Imaging")
DEVICE_UID = generate_uid(entropy_srcs=["onevlm", "device"])


def sr_uids(study_uid: str, source_series_uid: str) -> tuple[str, str]:
    """Deterministic (series, instance) UIDs of the routing SR for a source series.

    The study UID takes part because sample archives reuse series UIDs across studies.
    """
    return (
        generate_uid(entropy_srcs=[study_uid, source_series_uid, "onevlm-routing-sr-series"]),
        generate_uid(entropy_srcs=[study_uid, source_series_uid, "onevlm-routing-sr-instance"]),
    )


_PATH_KEY = re.compile(r"(?:^|_)(?:dir|path|file|folder)$")
_ABSOLUTE_PATH = re.compile(r"^(?:/|~|[A-Za-z]:[\\/]|\\\\)")


def without_host_paths(value: Any, key: str = "") -> Any:
    """``value`` (JSON-like) with every file path cut to its last component.

    DICOM outputs leave the host: a folder such as ``/opt/site/.venv/...`` says nothing about the
    model (its name and fingerprint do) and everything about the machine. Path-valued fields
    (keys ending in ``dir``, ``path``, ``file``, ``folder``) and any absolute path are reduced to
    the name of the file or folder; everything else is kept.

    Parameters
    ----------
    value:
        A mapping, sequence or scalar (a backend identity, a calibration identity…).
    key:
        The key ``value`` was found under (path-valued keys are recognised by name).

    Returns
    -------
    Any
        The same structure, mappings as dicts and sequences as lists.
    """
    if isinstance(value, dict):
        return {k: without_host_paths(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_host_paths(v, key) for v in value]
    if isinstance(value, os.PathLike) or (
        isinstance(value, str) and (_PATH_KEY.search(key) or _ABSOLUTE_PATH.match(value))
    ):
        return re.split(r"[\\/]", os.fspath(value).rstrip("/\\"))[-1]
    return value


def _model_name(backend: dict) -> str:
    if backend.get("backend") == "transformers":
        name = f"transformers {backend.get('model_class', '')} {str(backend.get('model_dir', '')).rstrip('/').split('/')[-1]}"
    else:
        name = f"{backend.get('backend', 'unknown')} backend"
    return name.strip()[:64]


def _outcome(decision: RoutingDecision) -> CodedConcept:
    outcome = decision.outcome_name
    if outcome == "routed":
        return coding.OUTCOME_ROUTED
    if outcome == "routed-set":
        return coding.OUTCOME_ROUTED_SET
    if outcome == "review":
        return coding.OUTCOME_REVIEW
    if outcome == "failed":
        return coding.OUTCOME_FAILED
    first = decision.stages[0] if decision.stages else None
    if first is not None and not first.chosen_record.in_allowed_set:
        return coding.OUTCOME_OUT_OF_SET
    if decision.modality == "None":
        return coding.OUTCOME_NOT_MEDICAL
    if decision.modality == "Other":
        return coding.OUTCOME_NOT_COVERED
    if len(decision.stages) == 3 and not decision.stages[2].chosen_record.in_allowed_set:
        return coding.OUTCOME_OUT_OF_SET
    return coding.OUTCOME_NO_CARD


def _comment(text: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=codes.DCM.Comment, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def _calibration_note(decision: RoutingDecision) -> str:
    outcome = decision.outcome
    if outcome is None or not outcome.calibrated:
        return "uncalibrated"
    return f"calibrated {(outcome.calibration or {}).get('calibration_id', '')}".strip()


def route_summary(decision: RoutingDecision) -> str:
    """One line: ``onevlm route: <modality> / <finding> -> <card(s), review or stop> (route confidence p, calibration)``.

    The route confidence is never above the stage-1 probability; a review case shows no card.
    """
    parts = [decision.modality or "?"]
    if decision.stage(2) is not None:
        parts.append(decision.finding or "finding not assessed")
    outcome = decision.outcome_name
    cards = decision.cards
    if outcome == "failed":  # said, not left out: no result must never read as "nothing found"
        return f"onevlm route: not routed, no AI result for this series: {failure_text(decision.error)}"
    if outcome == "review":  # no answer first: a stage-1 tie's "modality" would be the list order's pick
        reason = decision.outcome.reasons[0] if decision.outcome and decision.outcome.reasons else "see the decision log"
        return f"onevlm route: requires human review: {reason}"
    if outcome == "routed-set":
        target = f"one of {len(cards)} cards: {', '.join(cards)}"
    elif outcome == "routed":
        target = cards[0]
    else:
        target = "no card"
    label = "route confidence" if cards else "probability"
    confidence = f" ({label} {decision.confidence:.2f}, {_calibration_note(decision)})" if decision.confidence is not None else ""
    return f"onevlm route: {' / '.join(parts)} -> {target}{confidence}"


def failure_text(error: str | None) -> str:
    """Why a series was not routed, in words, without host paths (a file is named by its name only)."""
    words = [re.split(r"[\\/]", word)[-1] if _ABSOLUTE_PATH.match(word) else word
             for word in (error or "unknown error").split(" ")]
    return " ".join(words)[:400]


def execution_summary(result: SpecialtyResult) -> str:
    """The specialty part of the group's label: the answer, or that the card did not run."""
    if result.executed:
        return f"result: {result.answer_summary()}"
    return {"not-executable": "not executable here", "unparseable": "answer not parseable",
            "failed": "specialty model failed"}[result.status]


def executions_summary(results: Sequence[SpecialtyResult]) -> str:
    """The label's specialty part: one card's result, or each card's of a routed set."""
    if len(results) == 1:
        return execution_summary(results[0])
    return "; ".join(f"{r.card_id} {execution_summary(r)}" for r in results)


def _execution_items(result: SpecialtyResult) -> tuple[list, list]:
    """Qualitative evaluations and numeric measurements of a specialty result."""
    evaluations = [hd.sr.QualitativeEvaluation(name=coding.EXECUTION_CONCEPT, value=coding.EXECUTION_STATUS[result.status])]
    measurements = []
    if result.specialty and result.task:
        evaluations.append(hd.sr.QualitativeEvaluation(name=coding.TASK_CONCEPT,
                                                       value=coding.task_code(result.specialty, result.task)))
    if not result.executed:
        return evaluations, measurements
    if result.task_kind == "detection":
        measurements.append(hd.sr.Measurement(name=coding.REGION_COUNT_CONCEPT, value=float(len(result.boxes)),
                                              unit=coding.REGION_UNIT))
    elif result.task_kind == "multilabel":
        if result.labels:
            evaluations += [hd.sr.QualitativeEvaluation(name=coding.PRESENT_FINDING_CONCEPT, value=coding.finding_code(label))
                            for label in result.labels]
        else:
            evaluations.append(hd.sr.QualitativeEvaluation(name=coding.PRESENT_FINDING_CONCEPT,
                                                           value=coding.NO_FINDING_PRESENT))
    elif result.task_kind == "grading":
        evaluations.append(hd.sr.QualitativeEvaluation(name=coding.GRADE_CONCEPT,
                                                       value=coding.grade_code(int(result.grade), result.labels[0])))
    else:
        evaluations.append(hd.sr.QualitativeEvaluation(name=coding.CLASS_CONCEPT, value=coding.finding_code(result.labels[0])))
    return evaluations, measurements


def _stage_value(decision: RoutingDecision, stage, card_captions: dict[str, str]) -> CodedConcept:
    if not stage.chosen_record.in_allowed_set and stage.stage != 2:
        return coding.private_code("OOS", f"outside the admissible set: {stage.chosen}")
    if stage.stage == 1:
        return coding.modality_answer_code(stage.chosen)
    if stage.stage == 2:
        return coding.finding_code(stage.chosen) if stage.informative else coding.FINDING_NOT_ASSESSED
    return coding.card_code(stage.chosen, card_captions.get(stage.chosen))


def _consultation_items(decision: RoutingDecision, shown_stages: Sequence[StageDecision]):
    """What the stages read (hybrid router): coded evaluations, the VLM-call count, parameters.

    Nothing for a decision whose stages carry no consultation record (older logs): its SR is
    built exactly as before.
    """
    evaluations: list[hd.sr.QualitativeEvaluation] = []
    measurements: list[hd.sr.Measurement] = []
    parameters: list[str] = []
    recorded = [s for s in decision.stages if s.consultation is not None]
    if not recorded:
        return evaluations, measurements, parameters
    for stage in shown_stages:
        if stage.consultation is not None:
            evaluations.append(hd.sr.QualitativeEvaluation(name=coding.STAGE_SOURCES_CONCEPTS[stage.stage],
                                                           value=coding.sources_code(stage.consultation.consulted)))
    for stage in recorded:
        consultation = stage.consultation
        read = " and ".join(consultation.consulted) or "text only"
        parameters.append(f"consultation (stage {stage.stage}): {read}; {consultation.vlm_calls} VLM call(s); "
                          f"{consultation.reason}")
        disagreement = consultation.disagreement
        # the stage whose answers disagree (stage 2's finding may contradict stage 1's modality)
        about = disagreement.stage if disagreement is not None else stage.stage
        if disagreement is None or about not in coding.HEADER_IMAGE_CONCEPTS:
            continue
        evaluations += [
            hd.sr.QualitativeEvaluation(name=coding.HEADER_IMAGE_CONCEPTS[about],
                                        value=coding.HEADER_IMAGE_DISAGREE),
            hd.sr.QualitativeEvaluation(name=coding.HEADER_ANSWER_CONCEPTS[about],
                                        value=coding.stage_answer_code(about, disagreement.header_answer)),
            hd.sr.QualitativeEvaluation(name=coding.PIXELS_ANSWER_CONCEPTS[about],
                                        value=coding.stage_answer_code(about, disagreement.pixels_answer)),
        ]
        parameters.append(f"disagreement (stage {about}): {json.dumps(disagreement.as_dict(), sort_keys=True)}")
    measurements.append(hd.sr.Measurement(name=coding.VLM_CALLS_CONCEPT, value=float(decision.vlm_calls),
                                          unit=coding.CALLS_UNIT))
    return evaluations, measurements, parameters


def routing_group(decision: RoutingDecision, source_series_uid: str, card_captions: dict[str, str] | None = None,
                  executions: Sequence[SpecialtyResult] = ()):
    """The TID 1501 measurement group holding the routing decision (and the cards' executions).

    The outcome (routed, routed to a set, requires human review, stopped) is a coded value; the
    routed set's cards follow it; the route confidence is the group's first number. Stage 3's own
    pick is reported only when the router routed it alone (or stopped on it): a set or a review
    case shows no single card. Stage probabilities are calibrated where the site fitted a
    calibration; stage 2's is left out when it had no evidence. Which evidence each stage read,
    the VLM calls and a header/image disagreement follow (:func:`_consultation_items`).
    """
    card_captions = card_captions or {}
    outcome = decision.outcome_name
    assessed = {a.stage: a for a in (decision.outcome.stages if decision.outcome else ())}
    shown_stages = [s for s in decision.stages if not (s.stage == 3 and outcome in ("routed-set", "review"))]
    evaluations = []
    for stage in shown_stages:
        concept = {1: coding.MODALITY_CONCEPT, 2: coding.FINDING_CONCEPT, 3: coding.CARD_CONCEPT}[stage.stage]
        evaluations.append(hd.sr.QualitativeEvaluation(name=concept, value=_stage_value(decision, stage, card_captions)))
    evaluations.append(hd.sr.QualitativeEvaluation(name=coding.OUTCOME_CONCEPT, value=_outcome(decision)))
    if outcome == "routed-set":
        evaluations += [hd.sr.QualitativeEvaluation(name=coding.CARD_SET_CONCEPT,
                                                    value=coding.card_code(card, card_captions.get(card)))
                        for card in decision.cards]
    calibrated = bool(decision.outcome and decision.outcome.calibrated)
    evaluations.append(hd.sr.QualitativeEvaluation(name=coding.CALIBRATION_CONCEPT,
                                                   value=coding.CALIBRATED if calibrated else coding.UNCALIBRATED))
    measurements = []
    if decision.confidence is not None:
        measurements.append(hd.sr.Measurement(name=coding.CONFIDENCE_CONCEPT, value=float(decision.confidence), unit=coding.UNITLESS))
    for stage in shown_stages:
        if stage.stage == 2 and not stage.informative:
            continue
        p = assessed[stage.stage].p if stage.stage in assessed else stage.confidence
        measurements.append(
            hd.sr.Measurement(name=coding.STAGE_CONFIDENCE_CONCEPTS[stage.stage], value=float(p), unit=coding.UNITLESS)
        )
    consulted_evaluations, calls, consultation_parameters = _consultation_items(decision, shown_stages)
    evaluations += consulted_evaluations
    measurements += calls
    # No host paths in a DICOM output (model folders…): the model's name and fingerprint stay.
    backend = without_host_paths(decision.backend)
    parameters = [
        f"backend: {json.dumps(backend, sort_keys=True, default=str)}",
        f"cutoffs: {json.dumps(decision.cutoffs)}",
        f"prompts: {', '.join(s.prompt_id for s in decision.stages)}",
    ]
    if decision.outcome is not None:
        calibration = without_host_paths(decision.outcome.calibration)
        parameters.append(f"calibration: {json.dumps(calibration, sort_keys=True, default=str)}")
        parameters += [f"outcome note: {failure_text(reason) if outcome == 'failed' else reason}"
                       for reason in decision.outcome.reasons[1 if outcome == 'review' else 0:]]
    parameters += consultation_parameters
    name = "onevlm model-card router"
    for execution in executions:
        more_evaluations, more_measurements = _execution_items(execution)
        evaluations += more_evaluations
        measurements += more_measurements
        name = "onevlm model-card router and specialty model"
        if execution.specialty:
            adapter = without_host_paths(execution.adapter)
            parameters += [f"specialty adapter ({execution.card_id}): {json.dumps(adapter, sort_keys=True, default=str)}",
                           f"specialty prompt ({execution.card_id}): {execution.prompt_id}"]
        if execution.answer is not None:
            parameters.append(f"specialty answer ({execution.card_id}): {execution.answer}")
        if len(executions) > 1:  # the label names each card's status; the reasons go here
            parameters.append(f"specialty result ({execution.card_id}): {execution.summary()}")
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=[source_series_uid, "onevlm-routing-group"]),
            identifier="onevlm routing",
        ),
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=name, version=__version__, parameters=parameters, manufacturer="onevlm"
        ),
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )
    container = group[0]
    # Viewers (OHIF) show a group's comments as its label: the first one says it all.
    label = route_summary(decision)
    if executions:
        label = f"{label}; {executions_summary(executions)}"
    container.ContentSequence.append(_comment(label))
    disagreement = decision.disagreement or disagreement_text(decision.stages)
    if disagreement:
        container.ContentSequence.append(_comment(f"Header and image disagree: {disagreement}"))
    for execution in executions:
        if not execution.executed and len(executions) == 1:
            # The label carries an executed result; more comments push the confidence line out of OHIF 3.13's view.
            container.ContentSequence.append(_comment(f"Specialty model: {execution.summary()}"))
    if decision.stop_reason and outcome == "stopped":
        container.ContentSequence.append(_comment(f"Routing stopped: {decision.stop_reason}."))
    if outcome == "routed" and len(decision.stages) == 3 and decision.stages[2].chosen_record.justification:
        container.ContentSequence.append(_comment(f"Justification: {decision.stages[2].chosen_record.justification}"))
    container.ContentSequence.append(_comment(RESEARCH_STATEMENT))
    return group


def _infer_from_whole_image(group, image: pydicom.Dataset) -> None:
    """Let the group's first numeric measurement refer to the whole of ``image`` (TID 300 INFERRED FROM).

    OHIF 3.13 reads every measurement group of the SR as an annotation and stops with a
    TypeError on a group without any SCOORD (``coords[0]`` is undefined), which leaves the SR
    viewport empty. The router answers about the whole routed image, so its region is the image
    border: (0, 0) to (Columns, Rows), all frames of a multi-frame image. Nothing is added for an
    instance without pixel extents (it is no image; OHIF shows no image for it either).
    """
    rows, columns = image.get("Rows"), image.get("Columns")
    if not rows or not columns:
        return
    num = next((item for item in group[0].ContentSequence if item.ValueType == "NUM"), None)
    if num is None:
        return
    region = hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.array(
            [[0, 0], [columns, 0], [columns, rows], [0, rows], [0, 0]], dtype=np.float32
        ),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=image.SOPClassUID, referenced_sop_instance_uid=image.SOPInstanceUID
        ),
    )
    if "ContentSequence" in num:
        num.ContentSequence.append(region)
    else:
        num.ContentSequence = hd.sr.ContentSequence([region])


def box_group(box: ImageBox, index: int, source: pydicom.Dataset, source_series_uid: str):
    """A TID 1410 planar ROI group: the box as a closed POLYLINE on its source image."""
    frames = [box.frame] if box.frame is not None else None
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=box.polyline(),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID,
            referenced_frame_numbers=frames,
        ),
    )
    measurements = []
    if box.confidence is not None:
        measurements.append(hd.sr.Measurement(name=codes.DCM.CertaintyOfFinding, value=float(box.confidence), unit=coding.UNITLESS))
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=[source_series_uid, source.SOPInstanceUID, "box", str(index)]),
            identifier=f"{box.label} ({index + 1})"[:64],
        ),
        referenced_region=region,
        finding_type=coding.finding_code(box.label),
        measurements=measurements or None,
    )
    group[0].ContentSequence.append(_comment(f"Finding: {box.label}"))  # the label viewers show
    return group


def build_routing_sr(
    decision: RoutingDecision,
    evidence: Sequence[pydicom.Dataset],
    routed_image: pydicom.Dataset,
    boxes: Sequence[ImageBox] = (),
    card_captions: dict[str, str] | None = None,
    executions: Sequence[SpecialtyResult] = (),
    sop_instance_uid: str | None = None,
    previous_versions: Sequence[pydicom.Dataset] = (),
) -> hd.sr.Comprehensive3DSR:
    """Build the routing SR of one series.

    Parameters
    ----------
    decision:
        The router's decision for the series (for its representative image).
    evidence:
        The series' instances (headers suffice): the SR references them as evidence and copies
        the patient and study attributes from them.
    routed_image:
        The instance that was routed (referenced by the boxes; listed in the image library).
    boxes:
        Bounding boxes on ``routed_image`` (from a specialty model), if any.
    card_captions:
        Card ID to caption, to spell out the chosen card in the code meaning.
    executions:
        The specialty model's results for the routed card(s) (route -> execute), if it was
        asked: executed, or why not; one per card of a routed set.
    sop_instance_uid:
        The SR's instance UID (default: derived from the source study and series, the first version's).
    previous_versions:
        Earlier SRs of the same series this one amends (their study, series, class and instance UIDs
        suffice): referenced in the Predecessor Documents Sequence.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        A validated SR; write it with ``sr.save_as(path)``.
    """
    if not evidence:
        raise ValueError("an SR needs at least one source instance as evidence")
    series_uid = str(routed_image.SeriesInstanceUID)
    if any(str(ds.StudyInstanceUID) != str(routed_image.StudyInstanceUID) for ds in evidence):
        raise ValueError("all evidence must belong to the routed image's study")
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=DEVICE_UID,
            name="onevlm",
            manufacturer_name="onevlm",
            model_name=_model_name(decision.backend),
            # No serial number (optional in TID 1004): a version is not one, and it is in the
            # algorithm identification already; the device UID identifies the software.
        ),
    )
    procedure = coding.acquisition_modality_code(str(routed_image.get("Modality", ""))) or GENERIC_IMAGING
    groups = [routing_group(decision, series_uid, card_captions, executions)]
    _infer_from_whole_image(groups[0], routed_image)
    groups += [box_group(box, i, routed_image, series_uid) for i, box in enumerate(boxes)]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure,
        imaging_measurements=groups,
    )
    sr_series_uid, sr_instance_uid = sr_uids(str(routed_image.StudyInstanceUID), series_uid)
    sr_instance_uid = sop_instance_uid or sr_instance_uid
    try:
        return _comprehensive_sr(evidence, report, sr_series_uid, sr_instance_uid, previous_versions)
    except KeyError as exc:
        # highdicom copies patient/study modules by the source's IOD; retired SOP classes have none.
        name = pydicom.uid.UID(str(routed_image.SOPClassUID)).name
        raise ValueError(f"highdicom cannot use a '{name}' instance as SR evidence (SOP class {exc})") from exc


def _comprehensive_sr(evidence: Sequence[pydicom.Dataset], report, series_uid: str, instance_uid: str,
                      previous_versions: Sequence[pydicom.Dataset] = ()) -> hd.sr.Comprehensive3DSR:
    retired = {str(ds.SOPInstanceUID): str(ds.SOPClassUID) for ds in evidence
               if str(ds.get("SOPClassUID", "")) in RETIRED_TO_CURRENT}
    sr = hd.sr.Comprehensive3DSR(
        evidence=[as_current_sop_class(evidence_ready(ds)) for ds in evidence],
        content=report[0],
        series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer="onevlm",
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=SERIES_DESCRIPTION,
        coding_schemes=[coding.scheme_item()],
        previous_versions=list(previous_versions) or None,
        # UTF-8, whatever the source's character set: a VLM's free text (quoted when it is outside the
        # admissible set) can hold any character, and the copied patient fields are re-encoded exactly.
        specific_character_set="ISO_IR 192",
    )
    if retired:  # the evidence references must name the classes the instances really have
        restore_referenced_sop_classes(sr.get("CurrentRequestedProcedureEvidenceSequence"), retired)
    return sr
