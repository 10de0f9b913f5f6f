"""Service configuration (YAML), validated: every error names the field."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

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


@dataclass(frozen=True)
class OrthancSource:
    """Orthanc as the intake: it receives C-STORE; the service follows its changes feed."""

    url: str
    username: str | None = None
    password_env: str | None = None
    poll_seconds: float = 1.0


def is_loopback(host: str) -> bool:
    """Whether only this machine reaches ``host`` (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class DashboardConfig:
    """The operator's page on ``status_port``.

    ``host`` is where the page (and ``GET /status``) binds: loopback by default; any other
    address needs ``token_env``, the environment variable holding the access token, which every
    request must then present. With a token set, review answers need it on loopback too.
    ``viewer_url`` links a study to a viewer (``{study}`` is replaced by its Study Instance UID);
    ``show_patient_ids`` adds patient ID and accession number to the pages (off: UIDs, modality
    and times only).
    """

    host: str = "127.0.0.1"
    token_env: str | None = None
    viewer_url: str | None = None
    show_patient_ids: bool = False

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def token(self) -> str | None:
        """The access token, read from the environment now (never stored in the file)."""
        return os.environ.get(self.token_env) or None if self.token_env else None


@dataclass(frozen=True)
class DiskConfig:
    """Free space the spool's disk must keep: below either bound the service is not ready (``/readyz``)."""

    min_free_bytes: int = 2 * 1024**3
    min_free_percent: float = 5.0


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

    @property
    def journal_path(self) -> Path:
        return self.spool_dir / "journal.sqlite"


def _err(source: str, where: str, problem: str) -> ConfigError:
    return ConfigError(f"{source}: {where}: {problem}")


def _mapping(value: Any, source: str, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _err(source, where, "must be a mapping")
    return value


def _check_keys(data: Mapping[str, Any], allowed: set[str], source: str, where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise _err(source, f"{where}.{unknown[0]}" if where else unknown[0], "is not a known setting")


def _ae(value: Any, source: str, where: str) -> str:
    if not isinstance(value, str) or not AE_TITLE.match(value) or not value.strip():
        raise _err(source, where, f"{value!r} is not an AE title (1-16 printable characters, no backslash)")
    return value.strip()


def _port(value: Any, source: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise _err(source, where, f"{value!r} is not a TCP port (1-65535)")
    return value


def _positive(value: Any, source: str, where: str, integer: bool = False) -> float | int:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        raise _err(source, where, f"{value!r} must be a positive {'integer' if integer else 'number'}")
    return value


def _path(value: Any, source: str, where: str, base: Path, must_exist: bool = False) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _err(source, where, "must be a path")
    path = Path(value)
    path = path if path.is_absolute() else base / path
    if must_exist and not path.exists():
        raise _err(source, where, f"{path} does not exist")
    return path


def _tls(data: Any, source: str, where: str, base: Path) -> TlsConfig:
    data = _mapping(data, source, where)
    _check_keys(data, {"certificate", "private_key", "ca_certificates", "require"}, source, where)
    tls = TlsConfig(
        certificate=_path(data.get("certificate"), source, f"{where}.certificate", base, True),
        private_key=_path(data.get("private_key"), source, f"{where}.private_key", base, True),
        ca_certificates=_path(data.get("ca_certificates"), source, f"{where}.ca_certificates", base, True),
        require=bool(data.get("require", False)),
    )
    if (tls.certificate is None) != (tls.private_key is None):
        raise _err(source, where, "certificate and private_key go together")
    return tls


def _specialty(data: Any, source: str, base: Path) -> SpecialtyConfig | None:
    if data is None:
        return None
    where = "pipeline.specialty"
    data = _mapping(data, source, where)
    _check_keys(data, {"base_model_dir", "adapters", "quantize", "device"}, source, where)
    if "base_model_dir" not in data:
        raise _err(source, f"{where}.base_model_dir", "is required")
    model = _path(data["base_model_dir"], source, f"{where}.base_model_dir", base, True)
    if not (model / "config.json").is_file():
        raise _err(source, f"{where}.base_model_dir", f"{model} is not a model folder (no config.json)")
    adapters = data.get("adapters")
    if not isinstance(adapters, list) or not adapters:
        raise _err(source, f"{where}.adapters", "must list adapter folders (each an adapter or a folder of adapters)")
    folders = tuple(_path(a, source, f"{where}.adapters[{i}]", base, True) for i, a in enumerate(adapters))
    quantize = data.get("quantize")
    if quantize is not None and quantize not in ("nf4", "none"):
        raise _err(source, f"{where}.quantize", f"{quantize!r} must be 'nf4' or 'none'")
    device = str(data.get("device", "auto"))
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
        raise _err(source, f"{where}.device", f"{device!r} must be auto, cpu, cuda or cuda:N")
    return SpecialtyConfig(base_model_dir=model, adapters=folders, quantize=quantize, device=device)


def parse_config(data: Any, source: str = "<memory>", base: Path | None = None) -> ServiceConfig:
    """Validate a parsed YAML document into a :class:`ServiceConfig`.

    Relative paths are resolved against ``base`` (the config file's folder).
    """
    base = base or Path.cwd()
    data = _mapping(data, source, "<document>")
    _check_keys(data, {"spool_dir", "listener", "grouping", "destinations", "retry", "workers", "status_port",
                       "pipeline", "intake", "dashboard", "disk"}, source, "")
    if "spool_dir" not in data:
        raise _err(source, "spool_dir", "is required")
    spool = _path(data["spool_dir"], source, "spool_dir", base)

    lst = _mapping(data.get("listener"), source, "listener")
    _check_keys(lst, {"ae_title", "host", "port", "allowed_calling_ae_titles", "allowed_addresses",
                      "max_associations", "max_pdu_bytes", "max_instance_bytes", "network_timeout_seconds", "processes",
                      "tls"},
                source, "listener")
    allowed = lst.get("allowed_calling_ae_titles", [])
    if not isinstance(allowed, list):
        raise _err(source, "listener.allowed_calling_ae_titles", "must be a list of AE titles")
    addresses = lst.get("allowed_addresses", [])
    if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
        raise _err(source, "listener.allowed_addresses", "must be a list of IP addresses")
    defaults = ListenerConfig()
    listener = ListenerConfig(
        ae_title=_ae(lst.get("ae_title", defaults.ae_title), source, "listener.ae_title"),
        host=str(lst.get("host", defaults.host)),
        port=_port(lst.get("port", defaults.port), source, "listener.port"),
        allowed_calling_ae_titles=tuple(_ae(a, source, "listener.allowed_calling_ae_titles") for a in allowed),
        allowed_addresses=tuple(addresses),
        max_associations=int(_positive(lst.get("max_associations", defaults.max_associations), source,
                                       "listener.max_associations", integer=True)),
        max_pdu_bytes=int(_positive(lst.get("max_pdu_bytes", defaults.max_pdu_bytes), source,
                                    "listener.max_pdu_bytes", integer=True)),
        max_instance_bytes=int(_positive(lst.get("max_instance_bytes", defaults.max_instance_bytes), source,
                                         "listener.max_instance_bytes", integer=True)),
        network_timeout_seconds=float(_positive(lst.get("network_timeout_seconds", defaults.network_timeout_seconds),
                                                source, "listener.network_timeout_seconds")),
        processes=int(_positive(lst.get("processes", 1), source, "listener.processes", integer=True)),
        tls=_tls(lst.get("tls"), source, "listener.tls", base),
    )
    if listener.processes > 1 and lst.get("port", defaults.port) == 0:
        raise _err(source, "listener.port", "several listener processes need a fixed port (not 0)")
    if listener.tls.require and listener.tls.certificate is None:
        raise _err(source, "listener.tls", "require: true needs a certificate and private_key")

    grouping = _mapping(data.get("grouping"), source, "grouping")
    _check_keys(grouping, {"by", "idle_seconds"}, source, "grouping")
    group_by = grouping.get("by", "study")
    if group_by not in ("study", "series"):
        raise _err(source, "grouping.by", f"{group_by!r} must be 'study' or 'series'")
    idle = float(_positive(grouping.get("idle_seconds", 5.0), source, "grouping.idle_seconds"))

    destinations = []
    raw_destinations = data.get("destinations", [])
    if not isinstance(raw_destinations, list):
        raise _err(source, "destinations", "must be a list")
    for i, d in enumerate(raw_destinations):
        where = f"destinations[{i}]"
        d = _mapping(d, source, where)
        _check_keys(d, {"name", "ae_title", "host", "port", "tls", "role", "dicomweb", "auth", "username",
                        "password_env", "token_env", "timeout_seconds"}, source, where)
        if "name" not in d:
            raise _err(source, f"{where}.name", "is required")
        role = d.get("role", "results")
        if role not in DESTINATION_ROLES:
            raise _err(source, f"{where}.role", f"{role!r} must be one of {', '.join(DESTINATION_ROLES)}")
        timeout = float(_positive(d.get("timeout_seconds", Destination.timeout_seconds), source,
                                  f"{where}.timeout_seconds"))
        if "dicomweb" in d:
            destinations.append(_dicomweb_destination(d, source, where, role, timeout))
            continue
        for key in ("ae_title", "host", "port"):
            if key not in d:
                raise _err(source, f"{where}.{key}", "is required (or dicomweb: URL for a STOW-RS destination)")
        destinations.append(Destination(
            name=str(d["name"]), ae_title=_ae(d["ae_title"], source, f"{where}.ae_title"), host=str(d["host"]),
            port=_port(d["port"], source, f"{where}.port"), tls=_tls(d.get("tls"), source, f"{where}.tls", base),
            role=role, timeout_seconds=timeout,
        ))
    if len({d.name for d in destinations}) != len(destinations):
        raise _err(source, "destinations", "names must be unique")

    retry = _mapping(data.get("retry"), source, "retry")
    _check_keys(retry, {"base_seconds", "max_seconds", "max_attempts"}, source, "retry")
    pipe = _mapping(data.get("pipeline"), source, "pipeline")
    _check_keys(pipe, {"backend", "model_dir", "cards_dir", "cutoffs", "calibration", "specialty"}, source, "pipeline")
    vlm_configured = pipe.get("model_dir") is not None or pipe.get("specialty") is not None
    backend = pipe.get("backend", "hybrid" if vlm_configured else "embedded")
    if backend not in ("embedded", "transformers", "hybrid"):
        raise _err(source, "pipeline.backend", f"{backend!r} must be 'embedded', 'transformers' or 'hybrid'")
    pipeline = PipelineConfig(
        backend=backend,
        model_dir=_path(pipe.get("model_dir"), source, "pipeline.model_dir", base, True),
        cards_dir=_path(pipe.get("cards_dir"), source, "pipeline.cards_dir", base, True),
        cutoffs=_path(pipe.get("cutoffs"), source, "pipeline.cutoffs", base, True),
        calibration=_path(pipe.get("calibration"), source, "pipeline.calibration", base, True),
        specialty=_specialty(pipe.get("specialty"), source, base),
    )
    if backend in ("transformers", "hybrid") and pipeline.model_dir is None and pipeline.specialty is None:
        raise _err(source, "pipeline.model_dir", f"is required for the {backend} backend (without it the router "
                                                 "shares the base model of pipeline.specialty)")
    status_port = data.get("status_port")
    intake = _intake(data.get("intake"), source)
    dashboard = _dashboard(data.get("dashboard"), source)
    return ServiceConfig(
        spool_dir=spool,
        listener=listener,
        group_by=group_by,
        idle_seconds=idle,
        destinations=tuple(destinations),
        retry_base_seconds=float(_positive(retry.get("base_seconds", 2.0), source, "retry.base_seconds")),
        retry_max_seconds=float(_positive(retry.get("max_seconds", 300.0), source, "retry.max_seconds")),
        max_export_attempts=int(_positive(retry.get("max_attempts", 20), source, "retry.max_attempts", integer=True)),
        workers=int(_positive(data.get("workers", 1), source, "workers", integer=True)),
        status_port=None if status_port is None else _port(status_port, source, "status_port"),
        pipeline=pipeline,
        source=source,
        intake=intake,
        dashboard=dashboard,
        disk=_disk(data.get("disk"), source),
    )


def _disk(data: Any, source: str) -> DiskConfig:
    """``disk: {min_free_bytes, min_free_percent}`` (either may be 0: no bound)."""
    data = _mapping(data, source, "disk")
    _check_keys(data, {"min_free_bytes", "min_free_percent"}, source, "disk")
    free_bytes = data.get("min_free_bytes", DiskConfig.min_free_bytes)
    if isinstance(free_bytes, bool) or not isinstance(free_bytes, int) or free_bytes < 0:
        raise _err(source, "disk.min_free_bytes", f"{free_bytes!r} must be a whole number of bytes >= 0")
    percent = data.get("min_free_percent", DiskConfig.min_free_percent)
    if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 <= percent < 100:
        raise _err(source, "disk.min_free_percent", f"{percent!r} must be a number in [0, 100)")
    return DiskConfig(int(free_bytes), float(percent))


def _dashboard(data: Any, source: str) -> DashboardConfig:
    """``dashboard: {host, token_env, viewer_url, show_patient_ids}``: off loopback, a token is required."""
    data = _mapping(data, source, "dashboard")
    _check_keys(data, {"host", "token_env", "viewer_url", "show_patient_ids"}, source, "dashboard")
    host = str(data.get("host", "127.0.0.1")).strip()
    token_env = data.get("token_env")
    if token_env is not None and (not isinstance(token_env, str) or not token_env.strip()):
        raise _err(source, "dashboard.token_env", "must name an environment variable")
    if token_env and not os.environ.get(token_env):
        raise _err(source, "dashboard.token_env", f"the environment variable {token_env} is not set")
    if not is_loopback(host) and not token_env:
        raise _err(source, "dashboard.host", f"{host!r} is not loopback: set dashboard.token_env (the environment "
                                             "variable holding the page's access token) to bind there")
    viewer = data.get("viewer_url")
    if viewer is not None:
        viewer = str(viewer)
        if not viewer.startswith(("http://", "https://", "/")) or "{study}" not in viewer:
            raise _err(source, "dashboard.viewer_url", f"{viewer!r} must be an http(s) URL holding {{study}}")
        try:
            viewer.format(study="1.2.3")
        except (KeyError, IndexError, ValueError) as exc:
            raise _err(source, "dashboard.viewer_url", f"only {{study}} may be a placeholder ({exc})") from exc
    show = data.get("show_patient_ids", False)
    if not isinstance(show, bool):
        raise _err(source, "dashboard.show_patient_ids", f"{show!r} must be true or false")
    return DashboardConfig(host=host, token_env=token_env, viewer_url=viewer, show_patient_ids=show)


def _intake(data: Any, source: str) -> OrthancSource | None:
    """``intake: {orthanc: URL, username, password_env, poll_seconds}``; absent: the embedded listener."""
    if data is None:
        return None
    data = _mapping(data, source, "intake")
    _check_keys(data, {"orthanc", "username", "password_env", "poll_seconds"}, source, "intake")
    url = str(data.get("orthanc", "")).rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise _err(source, "intake.orthanc", f"{url!r} must be Orthanc's http:// or https:// REST URL")
    if data.get("password_env") and not os.environ.get(str(data["password_env"])):
        raise _err(source, "intake.password_env", f"the environment variable {data['password_env']} is not set")
    poll = float(_positive(data.get("poll_seconds", 1.0), source, "intake.poll_seconds"))
    return OrthancSource(url, data.get("username"), data.get("password_env"), poll)


def _dicomweb_destination(d: Mapping[str, Any], source: str, where: str, role: str, timeout: float) -> Destination:
    """A STOW-RS destination: ``dicomweb: http(s)://host/path`` (the DICOMweb root), optional ``auth``."""
    url = str(d["dicomweb"]).rstrip("/")
    if not url.startswith(("http://", "https://")) or len(url) < 10:
        raise _err(source, f"{where}.dicomweb", f"{url!r} must be an http:// or https:// DICOMweb root URL")
    for key in ("ae_title", "host", "port", "tls"):
        if key in d:
            raise _err(source, f"{where}.{key}", "does not apply to a dicomweb destination (its URL says where)")
    kind = d.get("auth", "none")
    if kind not in DICOMWEB_AUTH:
        raise _err(source, f"{where}.auth", f"{kind!r} must be one of {', '.join(DICOMWEB_AUTH)}")
    needs = {"none": (), "basic": ("username", "password_env"), "bearer": ("token_env",)}[kind]
    for key in needs:
        if not d.get(key):
            raise _err(source, f"{where}.{key}", f"is required with auth: {kind}")
    for key in ("password_env", "token_env"):
        if d.get(key) and not os.environ.get(str(d[key])):
            raise _err(source, f"{where}.{key}", f"the environment variable {d[key]} is not set")
    auth = DicomWebAuth(kind, d.get("username"), d.get("password_env"), d.get("token_env"))
    return Destination(name=str(d["name"]), role=role, dicomweb=url, auth=auth, timeout_seconds=timeout)


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
