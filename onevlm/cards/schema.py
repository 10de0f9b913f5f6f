"""Model-card schema: a typed, validated :class:`ModelCard` built from one YAML file.

A card is what the router's stage 3 chooses between. Only ``id``, ``modality`` and
``task_caption`` reach the router prompts (as in the paper); the other fields document the
model for the people who deploy it and let the embedded backend match DICOM headers.

The file is validated by pydantic (:class:`ModelCardFile`, whose JSON Schema is
``onevlm cards schema``), as the service configuration is; every error becomes one
:class:`CardError` naming the file, the field path and the problem, and the rest of the code
receives the frozen dataclasses below.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Mapping, Optional, Union

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from onevlm.schema_errors import KeyProblem, first_error

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

        Raises
        ------
        CardError
            For the first problem found: ``source: field 'path': problem``.
        """
        try:
            document = ModelCardFile.model_validate(data)
        except ValidationError as exc:
            raise _card_error(exc, source) from None
        return document.build(source)


# --------------------------------------------------------------------------- the file's schema (pydantic)
#
# The models below describe the YAML file: their JSON Schema is ``onevlm cards schema``. Each value is checked by a
# before-validator that keeps the type strict (no ``"false"`` for a bool, no number where text is expected) and words
# the problem the way card errors always have; the models then build the frozen dataclasses above.


def _got(value: Any) -> str:
    """What a wrong value is, in YAML's words (the usual mistake is an unquoted or unlisted value)."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}" if value.strip() else "an empty string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return f"a {type(value).__name__}"  # a date, for an unquoted 2020-01-01


def _text(value: Any) -> str:
    # Whitespace is collapsed: folded YAML (>-) and hand-wrapped text read as one line.
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty string (got {_got(value)})")
    return " ".join(value.split())


def _stripped(why: str = ""):
    def check(value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"must be a non-empty {why or 'string'} (got {_got(value)})")
        return value.strip()
    return check


def _card_id(value: Any) -> str:
    card_id = _text(value)
    if not CARD_ID_PATTERN.match(card_id):
        raise ValueError(f"'{card_id}' does not look like MODEL_01")
    return card_id


def _modality(value: Any) -> str:
    modality = _text(value)
    if not MODALITY_PATTERN.match(modality):
        raise ValueError(
            f"'{modality}' must read like the paper's strings: lower-case anatomy + technique "
            "ending in 'scan' (e.g. 'brain CT scan') or a 'panel (...)'"
        )
    return modality


def _caption(value: Any) -> str:
    caption = _text(value)
    if not caption.endswith("."):
        raise ValueError("must be one sentence ending with '.'")
    if ". " in caption:
        raise ValueError("must be a single sentence")
    return caption


def _one_of(choices: tuple[str, ...], normalize: bool = True):
    def check(value: Any) -> str:
        if not normalize and not isinstance(value, str):
            raise ValueError(f"must be one of {', '.join(choices)} (got {_got(value)})")
        text = _text(value) if normalize else value
        if text not in choices:
            raise ValueError(f"'{text}' is not one of {', '.join(choices)}")
        return text
    return check


def _code(codes: frozenset[str], what: str):
    def check(value: Any) -> str:
        if not isinstance(value, str):  # also keeps a nested list (unhashable) out of the set lookup
            raise ValueError(f"must be {what} (got {_got(value)})")
        if value not in codes:
            raise ValueError(f"'{value}' is not {what}")
        return value
    return check


def _list(not_a_list: str, empty: str | None = None, none_is_empty: bool = False):
    """A list (``empty``: the problem when it may not be empty); its entries are checked one by one, so an
    entry's error names its index."""
    def check(value: Any) -> list[Any]:
        if value is None and none_is_empty:
            return []
        if not isinstance(value, list):
            raise ValueError(f"{not_a_list} (got {_got(value)})")
        if not value and empty:
            raise ValueError(empty)
        return value
    return check


def _distinct(values: list[str]) -> list[str]:
    seen: set[str] = set()
    for value in values:
        if value.lower() in seen:
            raise ValueError(f"lists '{value}' twice (case does not count)")
        seen.add(value.lower())
    return values


def _http_url(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.startswith(("http://", "https://"))):
        raise ValueError(f"must be an http(s) URL (got {_got(value)})")
    return value


def _metric_value(value: Any) -> int | float | str:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"must be a number or a string (got {_got(value)})")
    return value


def _optional_string(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"must be a string (got {_got(value)})")
    return value


def _with_schema(**schema: Any) -> Any:
    """JSON Schema keywords the before-validators enforce (shown to editors, not checked twice)."""
    return Field(json_schema_extra=schema)


Text = Annotated[str, Field(min_length=1), BeforeValidator(_text)]
DicomModality = Annotated[Literal[tuple(sorted(DICOM_MODALITY_CODES))],
                          BeforeValidator(_code(DICOM_MODALITY_CODES, "a DICOM Modality defined term"))]
BodyPart = Annotated[Literal[tuple(sorted(BODY_PART_CODES))],
                     BeforeValidator(_code(BODY_PART_CODES, "a known Body Part Examined value"))]


class _Part(BaseModel):
    """A mapping of the card file: strict types, unknown keys refused (``noun`` words that error)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    noun: ClassVar[str] = "card"
    not_a_mapping: ClassVar[str] = "must be a mapping"

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            raise ValueError(f"{cls.not_a_mapping} (got {_got(data)})")
        for key in data:
            if not isinstance(key, str):  # pydantic would only say "Keys should be strings"
                raise KeyProblem(str(key), f"{cls._not_a_field()} (got {_got(key)} as a key)")
        return data

    @classmethod
    def _not_a_field(cls) -> str:
        return f"is not {'an' if cls.noun[0] in 'aeiou' else 'a'} {cls.noun} field"


class _Dataset(_Part):
    """A public dataset the card's model was trained on."""

    model_config = ConfigDict(title="dataset")
    noun: ClassVar[str] = "dataset"
    not_a_mapping: ClassVar[str] = "must be a mapping with name and citation"

    name: Annotated[Text, Field(description="The dataset's name.")]
    citation: Annotated[Text, Field(description="The reference to cite (authors, title, venue, year).")]
    url: Annotated[Optional[str], BeforeValidator(_http_url), _with_schema(pattern="^https?://"),
                   Field(description="Where the dataset is published (http or https).")] = None

    def build(self) -> Dataset:
        return Dataset(name=self.name, citation=self.citation, url=self.url)


class _Metric(_Part):
    """A performance figure as reported by its source."""

    model_config = ConfigDict(title="metric")
    noun: ClassVar[str] = "metric"
    not_a_mapping: ClassVar[str] = "must be a mapping with name, value and source"

    name: Annotated[str, Field(min_length=1, description="The metric, e.g. AUC."),
                    BeforeValidator(_stripped("string (a figure needs its source)"))]
    value: Annotated[Union[int, float, str], BeforeValidator(_metric_value),
                     Field(description="The figure, a number or a string such as '0.91 (0.89-0.93)'.")]
    source: Annotated[str, Field(min_length=1, description="Where the figure is reported (never invented)."),
                      BeforeValidator(_stripped("string (a figure needs its source)"))]
    split: Annotated[Optional[str], BeforeValidator(_optional_string),
                     Field(description="The evaluation split, e.g. test.")] = None

    def build(self) -> Metric:
        return Metric(name=self.name, value=self.value, source=self.source, split=self.split)


class _Dicom(_Part):
    """The DICOM attributes a card accepts."""

    model_config = ConfigDict(title="dicom")
    noun: ClassVar[str] = "dicom"
    not_a_mapping: ClassVar[str] = "must be a mapping with modalities (and body_parts)"

    modalities: Annotated[
        list[DicomModality], Field(min_length=1, description="DICOM Modality codes (0008,0060) accepted."),
        BeforeValidator(_list("must be a list of DICOM Modality codes", "must list at least one DICOM Modality code")),
    ]
    body_parts: Annotated[
        list[BodyPart], Field(description="Body Part Examined values (0018,0015) accepted; empty: any."),
        BeforeValidator(_list("must be a list of Body Part Examined values", none_is_empty=True)),
    ] = []

    def build(self) -> DicomMatch:
        return DicomMatch(modalities=tuple(self.modalities), body_parts=tuple(self.body_parts))


class _Execute(_Part):
    """How a specialty adapter runs the card."""

    model_config = ConfigDict(title="execute")
    noun: ClassVar[str] = "execute"
    not_a_mapping: ClassVar[str] = "must be a mapping with exactly specialty and task"

    specialty: Annotated[Literal[SPECIALTIES], BeforeValidator(_one_of(SPECIALTIES, normalize=False)),
                         Field(description="The specialty adapter that runs this card.")]
    task: Annotated[str, Field(min_length=1, description="The adapter's task id."),
                    BeforeValidator(_stripped("task id"))]

    @model_validator(mode="before")
    @classmethod
    def _both(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and not {"specialty", "task"} <= set(data):
            missing = " and ".join(sorted({"specialty", "task"} - set(data)))
            raise ValueError(f"{cls.not_a_mapping} ({missing} missing)")
        return data

    def build(self) -> ExecuteSpec:
        return ExecuteSpec(specialty=self.specialty, task=self.task)


class ModelCardFile(_Part):
    """A model-card file (``model_cards/MODEL_NN.yaml``): one card the router can choose.

    Only ``id``, ``modality`` and ``task_caption`` reach the router prompts; the file must be named after ``id``.
    """

    model_config = ConfigDict(title="onevlm model card")
    not_a_mapping: ClassVar[str] = "a card must be a YAML mapping"

    id: Annotated[str, BeforeValidator(_card_id), _with_schema(pattern=CARD_ID_PATTERN.pattern),
                  Field(description="MODEL_ followed by 2-4 digits; equals the file name.")]
    modality: Annotated[str, BeforeValidator(_modality), _with_schema(pattern=MODALITY_PATTERN.pattern),
                        Field(description="Stage 1's modality string, e.g. 'brain CT scan'.")]
    task_caption: Annotated[str, BeforeValidator(_caption),
                            Field(description="One sentence ending with '.', shown to the router.")]
    task_type: Annotated[Literal[TASK_TYPES], BeforeValidator(_one_of(TASK_TYPES))]
    findings: Annotated[
        list[Text], Field(min_length=1, description="The findings or labels the model reports (distinct)."),
        BeforeValidator(_list("must be a list of findings or labels", "must list at least one finding or label")),
        AfterValidator(_distinct),
    ]
    specialty: Annotated[Literal[SPECIALTIES], BeforeValidator(_one_of(SPECIALTIES))]
    intended_use: Annotated[Text, Field(description="Who uses the model, for what.")]
    out_of_scope: Annotated[Text, Field(description="What the model must not be used for.")]
    training_data: Annotated[
        list[_Dataset], Field(min_length=1),
        BeforeValidator(_list("must be a list of {name, citation, url}", "must be a non-empty list of {name, citation, url}")),
    ]
    metrics: Annotated[
        Optional[list[_Metric]], Field(description="Published figures with their source (empty: none reported)."),
        BeforeValidator(_list("must be a list (empty when no figure is reported)", none_is_empty=True)),
    ]
    dicom: _Dicom
    execute: Annotated[Optional[_Execute], Field(description="The specialty adapter and task that run the card.")] \
        = None

    def build(self, source: str) -> ModelCard:
        """The frozen :class:`ModelCard` the rest of the code reads."""
        return ModelCard(
            id=self.id, modality=self.modality, task_caption=self.task_caption, task_type=self.task_type,
            findings=tuple(self.findings), specialty=self.specialty, intended_use=self.intended_use,
            out_of_scope=self.out_of_scope, training_data=tuple(d.build() for d in self.training_data),
            metrics=tuple(m.build() for m in self.metrics or ()), dicom=self.dicom.build(),
            execute=self.execute.build() if self.execute else None, source=source,
        )


#: The mapping an error's path points into: the card itself, or one of its sections.
_PARTS: dict[str, type[_Part]] = {"training_data": _Dataset, "metrics": _Metric, "dicom": _Dicom, "execute": _Execute}

#: pydantic's error types that need other words than pydantic's own.
_WORDING = {
    "missing": "is required but missing",
    "list_type": "must be a list",
    "string_type": "must be a string",
}


def _unknown(loc: tuple[Any, ...]) -> str:
    part = _PARTS.get(loc[0], ModelCardFile) if len(loc) > 1 else ModelCardFile
    close = difflib.get_close_matches(str(loc[-1]), part.model_fields, n=1)
    return part._not_a_field() + (f" (did you mean {close[0]}?)" if close else "")


def _card_error(exc: ValidationError, source: str) -> CardError:
    """pydantic's first error as a :class:`CardError` (and how many more there are)."""
    path, problem = first_error(exc, _WORDING, _unknown)
    return CardError(source, path, problem)


def card_schema() -> dict[str, Any]:
    """The JSON Schema of a model-card file (for an editor to complete and check the YAML).

    Returns:
        The schema as a dict (``additionalProperties: false`` everywhere: unknown keys are errors).
    """
    return ModelCardFile.model_json_schema()


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
