"""Service configuration (YAML), validated by pydantic: every error is one line naming the file and the key."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from onevlm.schema_errors import KeyProblem, first_error

AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # 1-16 printable characters, no backslash


class ConfigError(ValueError):
    """The configuration is invalid; the message names the file and the field."""


@dataclass(frozen=True)
class TlsConfig:
    """TLS for the listener or a destination: our certificate/key, the CA to verify peers with."""

    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    require: bool = False


@dataclass(frozen=True)
class ListenerConfig:
    """The Storage SCP."""

    ae_title: str = "ONEVLM"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_ae_titles: tuple[str, ...] = ()
    allowed_addresses: tuple[str, ...] = ()
    max_associations: int = 16
    max_pdu_bytes: int = 1_048_576
    max_instance_bytes: int = 2_147_483_647
    network_timeout_seconds: float = 60.0
    processes: int = 1
    tls: TlsConfig = field(default_factory=TlsConfig)


#: ``results``: every result object; ``review``: only the SRs of series the router sent to review.
DESTINATION_ROLES = ("results", "review")


#: How a DICOMweb destination authenticates; secrets come from environment variables, never the file.
DICOMWEB_AUTH = ("none", "basic", "bearer")


@dataclass(frozen=True)
class DicomWebAuth:
    """Credentials of a DICOMweb destination: the names of the environment variables holding them."""

    kind: str = "none"
    username: str | None = None
    password_env: str | None = None
    token_env: str | None = None


@dataclass(frozen=True)
class Destination:
    """Where results go: a DICOM node by C-STORE, or a DICOMweb service by STOW-RS (``dicomweb`` set).

    ``role: review`` gets the review cases' SRs only.
    """

    name: str
    ae_title: str = ""
    host: str = ""
    port: int = 0
    tls: TlsConfig = field(default_factory=TlsConfig)
    role: str = "results"
    dicomweb: str | None = None
    auth: DicomWebAuth = field(default_factory=DicomWebAuth)
    #: One send's limit (C-STORE association or STOW-RS request), seconds; then the outbox retries later.
    timeout_seconds: float = 30.0

    def wants(self, sop_class_uid: str, needs_review: bool) -> bool:
        """Whether this destination receives a result object (a review destination: review SRs only)."""
        if self.role == "review":
            return needs_review and sop_class_uid.startswith("1.2.840.10008.5.1.4.1.1.88.")
        return True


@dataclass(frozen=True)
class SpecialtyConfig:
    """The specialty model (route -> execute): the base VLM and its adapters, loaded once."""

    base_model_dir: Path
    adapters: tuple[Path, ...]
    quantize: str | None = None
    device: str = "auto"


@dataclass(frozen=True)
class PipelineConfig:
    """What runs on a complete study: the router, and the specialty model when configured.

    ``backend`` defaults to ``hybrid`` when a VLM is configured (``model_dir``, or the specialty
    model's base), else ``embedded``.
    """

    backend: str = "embedded"
    model_dir: Path | None = None
    cards_dir: Path | None = None
    cutoffs: Path | None = None
    calibration: Path | None = None
    specialty: SpecialtyConfig | None = None


INTAKE_FETCH = ("needed", "all")


@dataclass(frozen=True)
class OrthancSource:
    """Orthanc as the intake: it receives C-STORE; the service follows its changes feed."""

    url: str
    username: str | None = None
    password_env: str | None = None
    poll_seconds: float = 1.0
    #: ``needed``: header-only copies, whole only the instances the pipeline reads; ``all``: every instance whole.
    fetch: str = "needed"

    def __post_init__(self) -> None:
        if self.fetch not in INTAKE_FETCH:
            raise ValueError(f"fetch must be one of {', '.join(INTAKE_FETCH)}, got {self.fetch!r}")


def is_loopback(host: str) -> bool:
    """Whether only this machine reaches ``host`` (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class PageTls:
    """HTTPS for the operator's page: its certificate (chain) and private key, PEM files."""

    certificate: Path
    private_key: Path


@dataclass(frozen=True)
class DashboardConfig:
    """The operator's page on ``status_port``.

    ``host`` is where the page (and ``GET /status``) binds: loopback by default; any other
    address needs ``token_env``, the environment variable holding the access token, which every
    request must then present. With a token set, review answers need it on loopback too.
    ``viewer_url`` links a study to a viewer (``{study}`` is replaced by its Study Instance UID);
    ``show_patient_ids`` adds patient ID and accession number to the pages (off: UIDs, modality
    and times only). ``tls`` serves the page over HTTPS (certificate and private key, PEM); off
    loopback the page needs it (the token would cross the network in clear text) unless the
    operator says ``insecure_http`` (e.g. TLS ends at a reverse proxy on the same host).
    """

    host: str = "127.0.0.1"
    token_env: str | None = None
    viewer_url: str | None = None
    show_patient_ids: bool = False
    tls: PageTls | None = None
    insecure_http: bool = False

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def token(self) -> str | None:
        """The access token, read from the environment now (never stored in the file)."""
        return os.environ.get(self.token_env) or None if self.token_env else None


@dataclass(frozen=True)
class DiskConfig:
    """Free space the spool's disk must keep: below either bound the service is not ready (``/readyz``) and
    writes nothing new (C-STORE answered 0xA700, Orthanc intake and result writing wait) until space returns."""

    min_free_bytes: int = 2 * 1024**3
    min_free_percent: float = 5.0


#: What stays of a group's received instances once its results reached every destination.
INSTANCES_AFTER_SENT = ("headers", "keep")


@dataclass(frozen=True)
class RetentionConfig:
    """How long the spool keeps what (:mod:`onevlm.net.retention`); a ``*_days`` of ``None`` keeps forever.

    ``instances_after_sent``: ``headers`` keeps, once every destination acknowledged a group's
    results, each series' routed instance whole and a header-only copy of every other instance (what
    an amendment re-reads); ``keep`` keeps every instance whole until ``results_days``.
    ``results_days`` after the last acknowledgement the instances and result objects go (the
    decision records and a reviewed series' routed instance stay); ``journal_days`` after it the
    journal's per-instance rows go; ``records_days`` after it the decision records and the group's
    journal rows go. ``quarantine_days``: quarantined files by age. ``max_spool_bytes``: over it the
    oldest finished groups expire early (never unfinished or unsent ones).
    """

    enabled: bool = True
    interval_seconds: float = 300.0
    instances_after_sent: str = "headers"
    results_days: float | None = 30.0
    quarantine_days: float | None = 30.0
    journal_days: float | None = 90.0
    records_days: float | None = 365.0
    max_spool_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.instances_after_sent not in INSTANCES_AFTER_SENT:
            raise ValueError(f"instances_after_sent must be one of {', '.join(INSTANCES_AFTER_SENT)}")
        for name in ("results_days", "quarantine_days", "journal_days", "records_days"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None")
        if self.interval_seconds <= 0:
            raise ValueError("interval_seconds must be positive")
        if self.max_spool_bytes is not None and self.max_spool_bytes <= 0:
            raise ValueError("max_spool_bytes must be positive or None")


@dataclass(frozen=True)
class ServiceConfig:
    """Everything ``onevlm serve`` needs."""

    spool_dir: Path
    listener: ListenerConfig = field(default_factory=ListenerConfig)
    group_by: str = "study"
    idle_seconds: float = 5.0
    destinations: tuple[Destination, ...] = ()
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 300.0
    max_export_attempts: int = 20
    workers: int = 1
    status_port: int | None = None
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    source: str = "<memory>"
    intake: OrthancSource | None = None
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    disk: DiskConfig = field(default_factory=DiskConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)

    @property
    def journal_path(self) -> Path:
        return self.spool_dir / "journal.sqlite"


# --------------------------------------------------------------------------- the file's schema (pydantic)
#
# The models below describe the YAML file: their JSON Schema is ``onevlm config schema``. Each value is checked by a
# before-validator that keeps the type strict (no ``bool("false")``, no ``str(None)``) and words the problem the way
# the service's errors always have; the models then build the frozen dataclasses above, which the service reads.


def _base(info: ValidationInfo) -> Path:
    return (info.context or {}).get("base") or Path.cwd()


def _ae(value: Any) -> str:
    if not isinstance(value, str) or not AE_TITLE.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not an AE title (1-16 printable characters, no backslash)")
    return value.strip()


def _ae_list(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise ValueError("must be a list of AE titles")
    titles = []
    for i, title in enumerate(value):
        try:
            titles.append(_ae(title))
        except ValueError as exc:
            raise ValueError(f"entry {i}: {exc}") from None
    return titles


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"{value!r} is not a TCP port (1-65535)")
    return value


def _optional_port(value: Any) -> int | None:
    return None if value is None else _port(value)


def _positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{value!r} must be a positive number")
    return float(value)


def _positive_integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{value!r} must be a positive integer")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} must be true or false")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{value!r} must be a non-empty string")
    return value.strip()


def _optional_text(value: Any) -> str | None:
    return None if value is None else _text(value)


def _address(value: Any) -> str:
    try:
        if not isinstance(value, str):
            raise TypeError(value)
        ipaddress.ip_network(value, strict=False)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not an IP address or network (like 10.0.0.5 or 10.0.0.0/24)") from None
    return value


def _one_of(*choices: str):
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} must be one of {', '.join(choices)}")
        return value
    return check


def _resolve(value: Any, info: ValidationInfo) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a path")
    path = Path(value)
    return path if path.is_absolute() else _base(info) / path


def _existing(value: Any, info: ValidationInfo) -> Path | None:
    if value is None:
        return None
    path = _resolve(value, info)
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    return path


def _http_url(what: str, shortest: int = 0):
    def check(value: Any) -> str:
        url = value.rstrip("/") if isinstance(value, str) else value
        if not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url) < shortest:
            raise ValueError(f"{url!r} must be {what}")
        return url
    return check


def _set_variable(key: str, name: str | None) -> None:
    if name and not os.environ.get(name):
        raise KeyProblem(key, f"the environment variable {name} is not set")


AeTitle = Annotated[str, BeforeValidator(_ae)]
Port = Annotated[int, Field(ge=1, le=65535), BeforeValidator(_port)]
PositiveNumber = Annotated[float, Field(gt=0), BeforeValidator(_positive_number)]
PositiveInteger = Annotated[int, Field(gt=0), BeforeValidator(_positive_integer)]
Flag = Annotated[bool, BeforeValidator(_flag)]
Text = Annotated[str, Field(min_length=1), BeforeValidator(_text)]
OptionalText = Annotated[Optional[str], BeforeValidator(_optional_text)]
ExistingPath = Annotated[Optional[Path], BeforeValidator(_existing)]


class _Section(BaseModel):
    """A mapping of the file: unknown keys refused, an empty section (``listener:``) means its defaults."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_default(cls, data: Any) -> Any:
        return {} if data is None else data


class _Tls(_Section):
    """TLS: our certificate and key (together), the CA certificates that verify the peer."""

    certificate: ExistingPath = None
    private_key: ExistingPath = None
    ca_certificates: ExistingPath = None
    require: Flag = TlsConfig.require

    @model_validator(mode="after")
    def _pair(self) -> "_Tls":
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        return self

    def build(self) -> TlsConfig:
        return TlsConfig(self.certificate, self.private_key, self.ca_certificates, self.require)


_LISTENER = ListenerConfig()


class _Listener(_Section):
    """The Storage SCP: who may connect, where it binds, its limits."""

    ae_title: AeTitle = _LISTENER.ae_title
    host: Text = _LISTENER.host
    port: Port = _LISTENER.port
    allowed_calling_ae_titles: Annotated[list[str], BeforeValidator(_ae_list)] = []
    allowed_addresses: list[Annotated[str, BeforeValidator(_address)]] = []
    max_associations: PositiveInteger = _LISTENER.max_associations
    max_pdu_bytes: PositiveInteger = _LISTENER.max_pdu_bytes
    max_instance_bytes: PositiveInteger = _LISTENER.max_instance_bytes
    network_timeout_seconds: PositiveNumber = _LISTENER.network_timeout_seconds
    processes: PositiveInteger = _LISTENER.processes
    tls: _Tls = _Tls()

    @model_validator(mode="after")
    def _tls_required(self) -> "_Listener":
        if self.tls.require and self.tls.certificate is None:
            raise KeyProblem("tls", "require: true needs a certificate and private_key")
        return self

    def build(self) -> ListenerConfig:
        return ListenerConfig(
            ae_title=self.ae_title, host=self.host, port=self.port,
            allowed_calling_ae_titles=tuple(self.allowed_calling_ae_titles),
            allowed_addresses=tuple(self.allowed_addresses), max_associations=self.max_associations,
            max_pdu_bytes=self.max_pdu_bytes, max_instance_bytes=self.max_instance_bytes,
            network_timeout_seconds=self.network_timeout_seconds, processes=self.processes, tls=self.tls.build(),
        )


class _Grouping(_Section):
    """When a study (or series) is complete: ``idle_seconds`` without a new instance."""

    by: Annotated[Literal["study", "series"], BeforeValidator(_one_of("study", "series"))] = "study"
    idle_seconds: PositiveNumber = 5.0


class _Destination(_Section):
    """A DICOM node (``ae_title``, ``host``, ``port``, ``tls``) or a DICOMweb root (``dicomweb``, ``auth``)."""

    name: Text
    ae_title: Optional[AeTitle] = None
    host: Optional[Text] = None
    port: Optional[Port] = None
    tls: _Tls = _Tls()
    role: Annotated[Literal[DESTINATION_ROLES], BeforeValidator(_one_of(*DESTINATION_ROLES))] = "results"
    dicomweb: Annotated[Optional[str], BeforeValidator(_http_url("an http:// or https:// DICOMweb root URL", 10))] = None
    auth: Annotated[Literal[DICOMWEB_AUTH], BeforeValidator(_one_of(*DICOMWEB_AUTH))] = "none"
    username: OptionalText = None
    password_env: OptionalText = None
    token_env: OptionalText = None
    timeout_seconds: PositiveNumber = Destination.timeout_seconds

    @model_validator(mode="after")
    def _kind(self) -> "_Destination":
        given = self.model_fields_set
        if self.dicomweb is None:
            for key in ("ae_title", "host", "port"):
                if getattr(self, key) is None:
                    raise KeyProblem(key, "is required (or dicomweb: URL for a STOW-RS destination)")
            return self
        for key in ("ae_title", "host", "port", "tls"):
            if key in given:
                raise KeyProblem(key, "does not apply to a dicomweb destination (its URL says where)")
        needs = {"none": (), "basic": ("username", "password_env"), "bearer": ("token_env",)}[self.auth]
        for key in needs:
            if not getattr(self, key):
                raise KeyProblem(key, f"is required with auth: {self.auth}")
        _set_variable("password_env", self.password_env)
        _set_variable("token_env", self.token_env)
        return self

    def build(self) -> Destination:
        if self.dicomweb is None:
            return Destination(name=self.name, ae_title=self.ae_title, host=self.host, port=self.port,
                               tls=self.tls.build(), role=self.role, timeout_seconds=self.timeout_seconds)
        auth = DicomWebAuth(self.auth, self.username, self.password_env, self.token_env)
        return Destination(name=self.name, role=self.role, dicomweb=self.dicomweb, auth=auth,
                           timeout_seconds=self.timeout_seconds)


class _Retry(_Section):
    """The outbox's retries: exponential from ``base_seconds`` up to ``max_seconds``, ``max_attempts`` in all."""

    base_seconds: PositiveNumber = 2.0
    max_seconds: PositiveNumber = 300.0
    max_attempts: PositiveInteger = 20


def _device(value: Any) -> str:
    if not isinstance(value, str) or not (value in ("auto", "cpu", "cuda") or value.startswith("cuda:")):
        raise ValueError(f"{value!r} must be auto, cpu, cuda or cuda:N")
    return value


def _model_folder(value: Any, info: ValidationInfo) -> Path:
    model = _existing(value, info)
    if model is None:
        raise ValueError("must be a path")
    if not (model / "config.json").is_file():
        raise ValueError(f"{model} is not a model folder (no config.json)")
    return model


def _adapter_list(value: Any) -> Any:
    if not isinstance(value, list) or not value:
        raise ValueError("must list adapter folders (each an adapter or a folder of adapters)")
    return value


class _Specialty(_Section):
    """The specialty model: the base VLM folder and its adapters, loaded once."""

    base_model_dir: Annotated[Path, BeforeValidator(_model_folder)]
    adapters: Annotated[list[Annotated[Path, BeforeValidator(_existing)]], BeforeValidator(_adapter_list)]
    quantize: Annotated[Optional[Literal["nf4", "none"]], BeforeValidator(
        lambda v: v if v is None else _one_of("nf4", "none")(v))] = None
    device: Annotated[str, BeforeValidator(_device)] = "auto"

    def build(self) -> SpecialtyConfig:
        return SpecialtyConfig(self.base_model_dir, tuple(self.adapters), self.quantize, self.device)


_BACKENDS = ("embedded", "transformers", "hybrid")


class _Pipeline(_Section):
    """What runs on a complete study; ``backend`` defaults to ``hybrid`` with a VLM, else ``embedded``."""

    backend: Annotated[Optional[Literal[_BACKENDS]], BeforeValidator(
        lambda v: v if v is None else _one_of(*_BACKENDS)(v))] = None
    model_dir: ExistingPath = None
    cards_dir: ExistingPath = None
    cutoffs: ExistingPath = None
    calibration: ExistingPath = None
    specialty: Optional[_Specialty] = None

    @model_validator(mode="after")
    def _vlm(self) -> "_Pipeline":
        if self.backend in ("transformers", "hybrid") and self.model_dir is None and self.specialty is None:
            raise KeyProblem("model_dir", f"is required for the {self.backend} backend (without it the router "
                                           "shares the base model of pipeline.specialty)")
        return self

    def build(self) -> PipelineConfig:
        vlm = self.model_dir is not None or self.specialty is not None
        return PipelineConfig(
            backend=self.backend or ("hybrid" if vlm else "embedded"), model_dir=self.model_dir,
            cards_dir=self.cards_dir, cutoffs=self.cutoffs, calibration=self.calibration,
            specialty=self.specialty.build() if self.specialty else None,
        )


class _Intake(_Section):
    """Orthanc as the intake: its REST URL; the password comes from the environment variable named."""

    orthanc: Annotated[str, BeforeValidator(_http_url("Orthanc's http:// or https:// REST URL"))]
    username: OptionalText = None
    password_env: OptionalText = None
    poll_seconds: PositiveNumber = 1.0
    fetch: Annotated[Literal[INTAKE_FETCH], BeforeValidator(_one_of(*INTAKE_FETCH))] = "needed"

    @model_validator(mode="after")
    def _password(self) -> "_Intake":
        _set_variable("password_env", self.password_env)
        return self

    def build(self) -> OrthancSource:
        return OrthancSource(self.orthanc, self.username, self.password_env, self.poll_seconds, self.fetch)


def _viewer_url(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith(("http://", "https://", "/")) or "{study}" not in value:
        raise ValueError(f"{value!r} must be an http(s) URL holding {{study}}")
    try:
        value.format(study="1.2.3")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"only {{study}} may be a placeholder ({exc})") from None
    return value


def _variable_name(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ValueError("must name an environment variable")
    return value


class _PageTls(_Section):
    """HTTPS for the page: certificate and private key, both required."""

    certificate: Annotated[Path, BeforeValidator(_existing)]
    private_key: Annotated[Path, BeforeValidator(_existing)]

    def build(self) -> PageTls:
        return PageTls(self.certificate, self.private_key)


class _Dashboard(_Section):
    """The operator's page: loopback by default; another ``host`` needs ``token_env``."""

    host: Text = DashboardConfig.host
    token_env: Annotated[Optional[str], BeforeValidator(_variable_name)] = None
    viewer_url: Annotated[Optional[str], BeforeValidator(_viewer_url)] = None
    show_patient_ids: Flag = DashboardConfig.show_patient_ids
    tls: Optional[_PageTls] = None
    insecure_http: Flag = DashboardConfig.insecure_http

    @model_validator(mode="after")
    def _token(self) -> "_Dashboard":
        _set_variable("token_env", self.token_env)
        if not is_loopback(self.host) and not self.token_env:
            raise KeyProblem("host", f"{self.host!r} is not loopback: set dashboard.token_env (the environment "
                                      "variable holding the page's access token) to bind there")
        if not is_loopback(self.host) and self.tls is None and not self.insecure_http:
            raise KeyProblem("host", f"{self.host!r} is not loopback: set dashboard.tls (certificate, private_key) "
                                      "so that the access token does not cross the network in clear text, or "
                                      "dashboard.insecure_http: true if TLS ends before this host (a reverse proxy)")
        return self

    def build(self) -> DashboardConfig:
        return DashboardConfig(self.host, self.token_env, self.viewer_url, self.show_patient_ids,
                               self.tls.build() if self.tls else None, self.insecure_http)


def _free_bytes(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} must be a whole number of bytes >= 0")
    return value


def _free_percent(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 100:
        raise ValueError(f"{value!r} must be a number in [0, 100)")
    return float(value)


class _Disk(_Section):
    """Free space the spool's disk must keep (0: no bound)."""

    min_free_bytes: Annotated[int, Field(ge=0), BeforeValidator(_free_bytes)] = DiskConfig.min_free_bytes
    min_free_percent: Annotated[float, Field(ge=0, lt=100), BeforeValidator(_free_percent)] = \
        DiskConfig.min_free_percent


def _days(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{value!r} must be a number of days >= 0 (or null: keep forever)")
    return float(value)


def _optional_bytes(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{value!r} must be a whole number of bytes > 0 (or null: no cap)")
    return value


Days = Annotated[Optional[float], BeforeValidator(_days)]
_RETENTION = RetentionConfig()


class _Retention(_Section):
    """What the spool keeps and for how long (days after the results were acknowledged; null: forever)."""

    enabled: Flag = _RETENTION.enabled
    interval_seconds: PositiveNumber = _RETENTION.interval_seconds
    instances_after_sent: Annotated[Literal[INSTANCES_AFTER_SENT], BeforeValidator(
        _one_of(*INSTANCES_AFTER_SENT))] = _RETENTION.instances_after_sent
    results_days: Days = _RETENTION.results_days
    quarantine_days: Days = _RETENTION.quarantine_days
    journal_days: Days = _RETENTION.journal_days
    records_days: Days = _RETENTION.records_days
    max_spool_bytes: Annotated[Optional[int], BeforeValidator(_optional_bytes)] = _RETENTION.max_spool_bytes

    @model_validator(mode="after")
    def _order(self) -> "_Retention":
        if self.records_days is not None and (self.results_days is None or self.records_days < self.results_days):
            raise KeyProblem("records_days", "must be at least results_days (the decision records outlive the "
                                              "results they describe) or null")
        return self

    def build(self) -> RetentionConfig:
        return RetentionConfig(**self.model_dump())


class ServiceConfigFile(_Section):
    """The listener service's configuration file (``onevlm serve --config FILE``).

    Relative paths are resolved against the file's folder.
    """

    model_config = ConfigDict(title="onevlm service configuration")

    spool_dir: Annotated[Path, BeforeValidator(_resolve)]
    listener: _Listener = _Listener()
    grouping: _Grouping = _Grouping()
    destinations: list[_Destination] = []
    retry: _Retry = _Retry()
    workers: PositiveInteger = 1
    status_port: Annotated[Optional[int], Field(ge=1, le=65535), BeforeValidator(_optional_port)] = None
    pipeline: _Pipeline = _Pipeline()
    intake: Optional[_Intake] = None
    dashboard: _Dashboard = _Dashboard()
    disk: _Disk = _Disk()
    retention: _Retention = _Retention()

    @model_validator(mode="after")
    def _unique_names(self) -> "ServiceConfigFile":
        if len({d.name for d in self.destinations}) != len(self.destinations):
            raise KeyProblem("destinations", "names must be unique")
        return self

    def build(self, source: str) -> ServiceConfig:
        """The frozen :class:`ServiceConfig` the service reads."""
        return ServiceConfig(
            spool_dir=self.spool_dir, listener=self.listener.build(), group_by=self.grouping.by,
            idle_seconds=self.grouping.idle_seconds, destinations=tuple(d.build() for d in self.destinations),
            retry_base_seconds=self.retry.base_seconds, retry_max_seconds=self.retry.max_seconds,
            max_export_attempts=self.retry.max_attempts, workers=self.workers, status_port=self.status_port,
            pipeline=self.pipeline.build(), source=source, intake=self.intake.build() if self.intake else None,
            dashboard=self.dashboard.build(), disk=DiskConfig(**self.disk.model_dump()),
            retention=self.retention.build(),
        )


#: pydantic's error types that need other words than pydantic's own.
_WORDING = {
    "missing": "is required",
    "extra_forbidden": "is not a known setting",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "dict_type": "must be a mapping",
    "list_type": "must be a list",
}


def _one_line(exc: ValidationError, source: str) -> ConfigError:
    """pydantic's first error as ``source: key.path: problem`` (and how many more there are)."""
    path, problem = first_error(exc, _WORDING)
    return ConfigError(f"{source}: {path}: {problem}")


def config_schema() -> dict[str, Any]:
    """The JSON Schema of the configuration file (for an editor to complete and check the YAML)."""
    return ServiceConfigFile.model_json_schema()


def parse_config(data: Any, source: str = "<memory>", base: Path | None = None) -> ServiceConfig:
    """Validate a parsed YAML document into a :class:`ServiceConfig`.

    Args:
        data: The document (a mapping; ``None``, an empty file, is one without ``spool_dir``).
        source: The file's name, for the error message.
        base: The folder relative paths are resolved against (the config file's folder; default: the current one).

    Returns:
        The frozen configuration.

    Raises:
        ConfigError: One line, ``source: key.path: problem``, for the first problem found.
    """
    try:
        document = ServiceConfigFile.model_validate(data, context={"base": base or Path.cwd()})
    except ValidationError as exc:
        raise _one_line(exc, source) from None
    return document.build(source)


def load_config(path: str | Path) -> ServiceConfig:
    """Read and validate a YAML configuration file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_config(data, source=str(path), base=path.parent)
