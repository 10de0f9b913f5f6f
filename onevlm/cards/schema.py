"""Model-card schema: a typed, validated :class:`ModelCard` built from one YAML file.

A card is what the router's stage 3 chooses between. Only ``id``, ``modality`` and
``task_caption`` reach the router prompts (as in the paper); the other fields document the
model for the people who deploy it and let the embedded backend match DICOM headers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

#: Card identifiers look like the paper's ``MODEL_04``.
CARD_ID_PATTERN = re.compile(r"^MODEL_\d{2,4}$")

#: Modality strings follow the paper's style: anatomy (lower case) + technique, ending in "scan",
#: or the paper's one panel, "skin multimodal panel (dermoscopy+RCM+H&E)".
MODALITY_PATTERN = re.compile(r"^[a-z][A-Za-z0-9 ()&+\-/]* scan$|^[a-z][A-Za-z0-9 &+\-/]* panel \([A-Za-z0-9&+\-/ ]+\)$")

TASK_TYPES = (
    "classification",
    "multilabel-classification",
    "grading",
    "detection",
    "segmentation",
    "regression",
)

SPECIALTIES = (
    "radiology",
    "pathology",
    "ophthalmology",
    "dermatology",
    "gastroenterology",
    "hematology",
)

#: DICOM Modality defined terms (PS3.3 C.7.3.1.1.1) a card may accept.
DICOM_MODALITY_CODES = frozenset(
    {
        "CT", "MR", "US", "MG", "CR", "DX", "RG", "XA", "RF", "PT", "NM", "OP", "OPT", "OPM",
        "OCT", "SM", "GM", "XC", "ES", "IO", "PX", "OT", "IVOCT", "BMD", "DG",
    }
)

#: Body Part Examined values (PS3.16 CID 4031 style) a card may accept, plus a few widely sent ones.
BODY_PART_CODES = frozenset(
    {
        "HEAD", "BRAIN", "SKULL", "NECK", "CHEST", "THORAX", "LUNG", "BREAST", "ABDOMEN",
        "PELVIS", "ABDOMENPELVIS", "CHESTABDOMEN", "CHESTABDPELVIS", "WHOLEBODY", "KIDNEY",
        "LIVER", "GALLBLADDER", "PANCREAS", "SPLEEN", "BLADDER", "PROSTATE", "CERVIX", "UTERUS",
        "COLON", "RECTUM", "ESOPHAGUS", "STOMACH", "DUODENUM", "SKIN", "EYE", "RETINA", "BLOOD",
        "BONEMARROW", "HEART", "EXTREMITY", "SPINE", "TSPINE", "LSPINE", "CSPINE", "ADRENAL",
        "LYMPHNODE", "THYROID", "ENTIRE BODY",
    }
)

REQUIRED_FIELDS = (
    "id",
    "modality",
    "task_caption",
    "task_type",
    "findings",
    "specialty",
    "intended_use",
    "out_of_scope",
    "training_data",
    "metrics",
    "dicom",
)
OPTIONAL_FIELDS = ("execute",)


class CardError(ValueError):
    """A model card is invalid. The message names the file and the field."""

    def __init__(self, source: str, field_name: str, problem: str) -> None:
        self.source = source
        self.field_name = field_name
        self.problem = problem
        super().__init__(f"{source}: field '{field_name}': {problem}")


@dataclass(frozen=True)
class Dataset:
    """A public dataset a card's model was trained on."""

    name: str
    citation: str
    url: str | None = None


@dataclass(frozen=True)
class Metric:
    """A performance figure as reported by its source (never invented here)."""

    name: str
    value: float | str
    source: str
    split: str | None = None


@dataclass(frozen=True)
class DicomMatch:
    """The DICOM attributes a card accepts: Modality codes and Body Part Examined values."""

    modalities: tuple[str, ...]
    body_parts: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExecuteSpec:
    """How a specialty adapter runs this card: the specialty adapter and its task id."""

    specialty: str
    task: str


@dataclass(frozen=True)
class ModelCard:
    """One model card.

    Use :meth:`from_mapping` or :func:`load_card` to build one: both validate every field and
    raise :class:`CardError` naming the file and the field.
    """

    id: str
    modality: str
    task_caption: str
    task_type: str
    findings: tuple[str, ...]
    specialty: str
    intended_use: str
    out_of_scope: str
    training_data: tuple[Dataset, ...]
    metrics: tuple[Metric, ...]
    dicom: DicomMatch
    execute: ExecuteSpec | None = None
    source: str = field(default="<memory>", compare=False)

    @classmethod
    def from_mapping(cls, data: Any, source: str = "<memory>") -> "ModelCard":
        """Validate a parsed YAML mapping and build the card.

        Parameters
        ----------
        data:
            The parsed YAML document.
        source:
            Where it came from (a file name), used in error messages.
        """
        if not isinstance(data, Mapping):
            raise CardError(source, "<document>", "a card must be a YAML mapping")
        for name in REQUIRED_FIELDS:
            if name not in data:
                raise CardError(source, name, "is required but missing")
        unknown = sorted(set(data) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
        if unknown:
            raise CardError(source, unknown[0], "is not a card field")

        card_id = _text(data, "id", source)
        if not CARD_ID_PATTERN.match(card_id):
            raise CardError(source, "id", f"'{card_id}' does not look like MODEL_01")
        modality = _text(data, "modality", source)
        if not MODALITY_PATTERN.match(modality):
            raise CardError(
                source, "modality",
                f"'{modality}' must read like the paper's strings: lower-case anatomy + technique "
                "ending in 'scan' (e.g. 'brain CT scan') or a 'panel (...)'",
            )
        caption = _text(data, "task_caption", source)
        if not caption.endswith("."):
            raise CardError(source, "task_caption", "must be one sentence ending with '.'")
        if caption.count(". ") > 0:
            raise CardError(source, "task_caption", "must be a single sentence")
        task_type = _text(data, "task_type", source)
        if task_type not in TASK_TYPES:
            raise CardError(source, "task_type", f"'{task_type}' is not one of {', '.join(TASK_TYPES)}")
        findings = _text_list(data, "findings", source)
        if not findings:
            raise CardError(source, "findings", "must list at least one finding or label")
        specialty = _text(data, "specialty", source)
        if specialty not in SPECIALTIES:
            raise CardError(source, "specialty", f"'{specialty}' is not one of {', '.join(SPECIALTIES)}")
        return cls(
            id=card_id,
            modality=modality,
            task_caption=caption,
            task_type=task_type,
            findings=tuple(findings),
            specialty=specialty,
            intended_use=_text(data, "intended_use", source),
            out_of_scope=_text(data, "out_of_scope", source),
            training_data=_datasets(data["training_data"], source),
            metrics=_metrics(data["metrics"], source),
            dicom=_dicom(data["dicom"], source),
            execute=_execute(data.get("execute"), source),
            source=source,
        )


def _text(data: Mapping[str, Any], name: str, source: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value.strip():
        raise CardError(source, name, "must be a non-empty string")
    return " ".join(value.split())


def _text_list(data: Mapping[str, Any], name: str, source: str) -> list[str]:
    value = data.get(name)
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise CardError(source, name, "must be a list of non-empty strings")
    cleaned = [" ".join(v.split()) for v in value]
    lowered = [v.lower() for v in cleaned]
    if len(set(lowered)) != len(lowered):
        raise CardError(source, name, "lists the same entry twice")
    return cleaned


def _datasets(value: Any, source: str) -> tuple[Dataset, ...]:
    if not isinstance(value, list) or not value:
        raise CardError(source, "training_data", "must be a non-empty list of {name, citation, url}")
    out = []
    for i, item in enumerate(value):
        where = f"training_data[{i}]"
        if not isinstance(item, Mapping):
            raise CardError(source, where, "must be a mapping with name and citation")
        unknown = sorted(set(item) - {"name", "citation", "url"})
        if unknown:
            raise CardError(source, f"{where}.{unknown[0]}", "is not a dataset field")
        name = _text(item, "name", source) if isinstance(item.get("name"), str) else None
        citation = item.get("citation")
        if not name:
            raise CardError(source, f"{where}.name", "must be a non-empty string")
        if not isinstance(citation, str) or not citation.strip():
            raise CardError(source, f"{where}.citation", "must be a non-empty string")
        url = item.get("url")
        if url is not None and (not isinstance(url, str) or not url.startswith(("http://", "https://"))):
            raise CardError(source, f"{where}.url", "must be an http(s) URL")
        out.append(Dataset(name=name, citation=" ".join(citation.split()), url=url))
    return tuple(out)


def _metrics(value: Any, source: str) -> tuple[Metric, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise CardError(source, "metrics", "must be a list (empty when no figure is reported)")
    out = []
    for i, item in enumerate(value):
        where = f"metrics[{i}]"
        if not isinstance(item, Mapping):
            raise CardError(source, where, "must be a mapping with name, value and source")
        unknown = sorted(set(item) - {"name", "value", "source", "split"})
        if unknown:
            raise CardError(source, f"{where}.{unknown[0]}", "is not a metric field")
        for key in ("name", "source"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise CardError(source, f"{where}.{key}", "must be a non-empty string (a figure needs its source)")
        metric_value = item.get("value")
        if isinstance(metric_value, bool) or not isinstance(metric_value, (int, float, str)):
            raise CardError(source, f"{where}.value", "must be a number or a string")
        split = item.get("split")
        if split is not None and not isinstance(split, str):
            raise CardError(source, f"{where}.split", "must be a string")
        out.append(Metric(name=item["name"].strip(), value=metric_value, source=item["source"].strip(), split=split))
    return tuple(out)


def _dicom(value: Any, source: str) -> DicomMatch:
    if not isinstance(value, Mapping):
        raise CardError(source, "dicom", "must be a mapping with modalities (and body_parts)")
    unknown = sorted(set(value) - {"modalities", "body_parts"})
    if unknown:
        raise CardError(source, f"dicom.{unknown[0]}", "is not a dicom field")
    modalities = value.get("modalities")
    if not isinstance(modalities, list) or not modalities:
        raise CardError(source, "dicom.modalities", "must list at least one DICOM Modality code")
    for code in modalities:
        if code not in DICOM_MODALITY_CODES:
            raise CardError(source, "dicom.modalities", f"'{code}' is not a DICOM Modality defined term")
    body_parts = value.get("body_parts") or []
    if not isinstance(body_parts, list):
        raise CardError(source, "dicom.body_parts", "must be a list of Body Part Examined values")
    for code in body_parts:
        if code not in BODY_PART_CODES:
            raise CardError(source, "dicom.body_parts", f"'{code}' is not a known Body Part Examined value")
    return DicomMatch(modalities=tuple(modalities), body_parts=tuple(body_parts))


def _execute(value: Any, source: str) -> ExecuteSpec | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) != {"specialty", "task"}:
        raise CardError(source, "execute", "must be a mapping with exactly specialty and task")
    if value["specialty"] not in SPECIALTIES:
        raise CardError(source, "execute.specialty", f"'{value['specialty']}' is not one of {', '.join(SPECIALTIES)}")
    if not isinstance(value["task"], str) or not value["task"].strip():
        raise CardError(source, "execute.task", "must be a non-empty task id")
    return ExecuteSpec(specialty=value["specialty"], task=value["task"].strip())


def _yaml_problem(exc: yaml.YAMLError) -> str:
    # One line with the position, not PyYAML's multi-line dump of "<unicode string>" and carets.
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}" + (f" ({context})" if context else "")


def load_card(path: str | Path) -> ModelCard:
    """Read and validate one card file.

    Raises
    ------
    CardError
        If the file is not valid YAML or a field is missing or wrong.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise CardError(path.name, "<document>", f"is not valid YAML: {_yaml_problem(exc)}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise CardError(path.name, "<document>", f"cannot be read: {exc}") from exc
    card = ModelCard.from_mapping(data, source=path.name)
    if card.id != path.stem:
        raise CardError(path.name, "id", f"'{card.id}' must equal the file name ({path.stem})")
    return card
