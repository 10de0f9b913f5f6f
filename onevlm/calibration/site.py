"""A site's calibration: one file, ``calibration.json``, fitted on the site's own labelled studies.

It holds, per router stage, Algorithm 2's cutoff, a temperature (temperature scaling), the
split-conformal quantile of the prediction sets and a selective threshold; for the whole route,
the selective threshold on route confidence; the routing settings (policy, largest set routed,
tie margin); what it was fitted for (backend, model and prompt versions) and on what (sizes,
date), and the held-out figures measured when it was fitted.

A calibration applies only to the backend, model and prompts it was fitted with:
:meth:`SiteCalibration.check_compatible` refuses any other. A plain ``cutoffs.json`` (from
``onevlm cutoffs fit``) still loads: it gives the cutoffs and nothing else, so every output
says ``calibrated: false``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from onevlm.calibration.conformal import ConformalFit, prediction_set
from onevlm.calibration.cutoffs import Cutoffs
from onevlm.calibration.fusion import Fusion
from onevlm.calibration.scores import DECODED_ANSWER_SCORE, StageScores
from onevlm.calibration.selective import SelectiveFit
from onevlm.calibration.temperature import scale

FORMAT = "onevlm-calibration/1"
#: ``sets``: route to a set of cards with a coverage guarantee; ``selective``: one card or review.
POLICIES = ("sets", "selective")
#: Top-2 margin (in probability) under which a stage's answer is a tie, never a choice.
DEFAULT_TIE_EPSILON = 0.02
#: The most cards a ``routed-set`` may hold (the largest modality ships 6 cards).
DEFAULT_MAX_SET_SIZE = 5


class CalibrationError(ValueError):
    """A calibration file that cannot be read, or that does not fit the router using it."""


@dataclass(frozen=True)
class RoutingSettings:
    """How the router turns stage probabilities into an outcome (used calibrated or not)."""

    policy: str = "sets"
    max_set_size: int = DEFAULT_MAX_SET_SIZE
    tie_epsilon: float = DEFAULT_TIE_EPSILON

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if isinstance(self.max_set_size, bool) or not isinstance(self.max_set_size, int) or self.max_set_size < 1:
            raise ValueError(f"max_set_size must be a positive integer, got {self.max_set_size!r}")
        if math.isnan(self.tie_epsilon) or not 0.0 <= self.tie_epsilon < 0.5:
            raise ValueError(f"tie_epsilon must lie in [0, 0.5), got {self.tie_epsilon!r}")

    def as_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "max_set_size": self.max_set_size, "tie_epsilon": self.tie_epsilon}


@dataclass(frozen=True)
class StageCalibration:
    """What was fitted for one stage."""

    stage: int
    temperature: float = 1.0
    tau: float | None = None
    conformal: ConformalFit | None = None
    selective: SelectiveFit | None = None
    n: int = 0

    def __post_init__(self) -> None:
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage!r}")
        if math.isnan(self.temperature) or self.temperature <= 0:
            raise ValueError(f"stage {self.stage}: temperature must be positive, got {self.temperature!r}")
        if self.tau is not None and not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"stage {self.stage}: cutoff must lie in [0, 1], got {self.tau!r}")

    def calibrate(self, scores: StageScores) -> StageScores:
        """The stage's probabilities after temperature scaling."""
        return scale(scores, self.temperature)

    def prediction_set(self, calibrated: StageScores) -> tuple[str, ...] | None:
        """The conformal set of already calibrated probabilities (``None``: no set was fitted)."""
        return None if self.conformal is None else prediction_set(calibrated, self.conformal.qhat)

    def as_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "tau": self.tau,
            "conformal": self.conformal.as_dict() if self.conformal else None,
            "selective": self.selective.as_dict() if self.selective else None,
            "n": self.n,
        }

    @classmethod
    def from_dict(cls, stage: int, data: Mapping[str, Any]) -> "StageCalibration":
        return cls(
            stage=stage,
            temperature=float(data.get("temperature", 1.0)),
            tau=None if data.get("tau") is None else float(data["tau"]),
            conformal=ConformalFit.from_dict(data["conformal"]) if data.get("conformal") else None,
            selective=SelectiveFit.from_dict(data["selective"]) if data.get("selective") else None,
            n=int(data.get("n", 0)),
        )


def calibration_identity(backend_identity: Mapping[str, Any], prompt_ids: Sequence[str]) -> dict[str, Any]:
    """What a calibration depends on: backend, model (not its path), answer mode, prompt versions.

    Device, dtype and paths are left out: the same model on another machine keeps its calibration.
    """
    backend = backend_identity.get("backend")
    if backend == "hybrid":
        # Both sources' identities: a new header rule set or another VLM needs a new fit.
        identity = {"backend": backend,
                    "header": _source_identity(backend_identity.get("header") or {}),
                    "pixels": _source_identity(backend_identity.get("pixels") or {}),
                    "prompts": list(prompt_ids)}
        return identity
    identity = {"backend": backend, **_source_identity(backend_identity)}
    identity["prompts"] = list(prompt_ids)
    return identity


def _source_identity(backend_identity: Mapping[str, Any]) -> dict[str, Any]:
    backend = backend_identity.get("backend")
    identity: dict[str, Any] = {"backend": backend}
    if backend == "transformers":
        for key in ("fingerprint", "quantize", "answer_mode"):
            identity[key] = backend_identity.get(key)
        if identity["answer_mode"] != "options":
            identity["answer_score"] = DECODED_ANSWER_SCORE
    else:
        for key in ("model", "methods"):
            identity[key] = backend_identity.get(key)
    return identity


@dataclass(frozen=True)
class SiteCalibration:
    """A fitted calibration (see the module docstring).

    Attributes
    ----------
    settings:
        Policy, largest routed set, tie margin.
    stages:
        Stage number to its :class:`StageCalibration`.
    risk, delta:
        The site's α (miscoverage of the routed card set, or error rate among routed cases in the
        selective policy) and δ (the selective bound's failure probability).
    route_selective:
        The threshold on route confidence of the selective policy.
    identity:
        :func:`calibration_identity` of what it was fitted with (``{}`` for a scores-only fit).
    fitted, heldout:
        How it was fitted (date, sizes, source) and the held-out figures.
    calibrated:
        ``False`` for a cutoffs-only file: probabilities stay the backend's.
    fusion:
        The hybrid router's fusion of header and pixels (:mod:`onevlm.calibration.fusion`);
        ``None`` for a single-source backend.
    """

    settings: RoutingSettings = field(default_factory=RoutingSettings)
    stages: Mapping[int, StageCalibration] = field(default_factory=dict)
    risk: float | None = None
    delta: float | None = None
    route_selective: SelectiveFit | None = None
    identity: Mapping[str, Any] = field(default_factory=dict)
    fitted: Mapping[str, Any] = field(default_factory=dict)
    heldout: Mapping[str, Any] | None = None
    calibrated: bool = True
    fusion: Fusion | None = None
    #: Where it was read from (for messages); not part of the content.
    path: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for key, value in self.stages.items():
            if key != value.stage:
                raise ValueError(f"stage key {key!r} holds the calibration of stage {value.stage}")
        for name in ("risk", "delta"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise ValueError(f"{name} must lie in (0, 1), got {value!r}")

    @property
    def calibration_id(self) -> str:
        """``cal-<12 hex>``: a digest of the fitted content, quoted in every output that used it."""
        content = {k: v for k, v in self.as_dict().items() if k not in ("heldout", "calibration_id")}
        digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]
        return f"cal-{digest}"

    def stage(self, stage: int) -> StageCalibration | None:
        return self.stages.get(stage)

    def cutoffs(self) -> Cutoffs:
        """Algorithm 1's cutoffs (``None`` where none was fitted)."""
        return Cutoffs(*(self.stages[s].tau if s in self.stages else None for s in (1, 2, 3)))

    def summary(self) -> dict[str, Any]:
        """What outputs quote: identity of the calibration, date, α, whether calibrated."""
        return {
            "calibration_id": self.calibration_id,
            "calibrated": self.calibrated,
            "fitted_at": self.fitted.get("date"),
            "risk": self.risk,
            "policy": self.settings.policy,
        }

    def check_compatible(self, identity: Mapping[str, Any]) -> None:
        """Refuse a calibration fitted for another backend, model, answer mode or prompt version.

        Raises
        ------
        CalibrationError
            Naming every field that differs.
        """
        if not self.calibrated:
            return
        source = self.path or "calibration"
        if not self.identity:
            raise CalibrationError(
                f"{source}: fitted from scores alone (no backend identity); fit it with "
                "'onevlm calibrate fit LABELS.csv' on this backend to route with it"
            )
        differences = [
            f"{key}: fitted for {self.identity.get(key)!r}, this router has {identity.get(key)!r}"
            for key in sorted(set(self.identity) | set(identity))
            if self.identity.get(key) != identity.get(key)
        ]
        if differences:
            raise CalibrationError(f"{source}: calibration {self.calibration_id} does not fit this router: "
                                   + "; ".join(differences))

    def as_dict(self) -> dict[str, Any]:
        out = {
            "format": FORMAT,
            "calibrated": self.calibrated,
            "settings": self.settings.as_dict(),
            "risk": self.risk,
            "delta": self.delta,
            "stages": {str(s): c.as_dict() for s, c in sorted(self.stages.items())},
            "route_selective": self.route_selective.as_dict() if self.route_selective else None,
            "identity": dict(self.identity),
            "fitted": dict(self.fitted),
            "heldout": dict(self.heldout) if self.heldout is not None else None,
        }
        if self.fusion is not None:  # absent for single-source backends (their ids stay as they were)
            out["fusion"] = self.fusion.as_dict()
        return out

    def save(self, path: str | Path) -> Path:
        """Write the calibration as JSON (with its ``calibration_id``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {**self.as_dict(), "calibration_id": self.calibration_id}
        path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SiteCalibration":
        if data.get("format") != FORMAT:
            raise ValueError(f"unknown format {data.get('format')!r} (expected {FORMAT})")
        stages = {int(k): StageCalibration.from_dict(int(k), v) for k, v in (data.get("stages") or {}).items()}
        return cls(
            settings=RoutingSettings(**(data.get("settings") or {})),
            stages=stages,
            risk=data.get("risk"),
            delta=data.get("delta"),
            route_selective=SelectiveFit.from_dict(data["route_selective"]) if data.get("route_selective") else None,
            identity=data.get("identity") or {},
            fitted=data.get("fitted") or {},
            heldout=data.get("heldout"),
            calibrated=bool(data.get("calibrated", True)),
            fusion=Fusion.from_dict(data["fusion"]) if data.get("fusion") else None,
        )

    @classmethod
    def load(cls, path: str | Path) -> "SiteCalibration":
        """Read ``calibration.json``, or a ``cutoffs.json`` (cutoffs only, ``calibrated: false``).

        Raises
        ------
        CalibrationError
            Naming the file and the problem.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise CalibrationError(f"{path}: calibration file not found") from exc
        except (OSError, json.JSONDecodeError) as exc:
            raise CalibrationError(f"{path}: cannot read the calibration: {exc}") from exc
        if isinstance(data, dict) and "format" not in data:
            try:
                cutoffs = Cutoffs.load(path)
            except ValueError as exc:
                raise CalibrationError(f"{path}: neither a calibration ({FORMAT}) nor a cutoffs file: {exc}") from exc
            return replace(cls.from_cutoffs(cutoffs, source=str(path)), path=str(path))
        try:
            calibration = cls.from_dict(data)
        except (TypeError, ValueError, KeyError) as exc:
            raise CalibrationError(f"{path}: invalid calibration: {exc}") from exc
        stored = data.get("calibration_id")
        if stored and stored != calibration.calibration_id:
            raise CalibrationError(f"{path}: content changed after fitting (id {stored} vs {calibration.calibration_id})")
        return replace(calibration, path=str(path))

    @classmethod
    def from_cutoffs(cls, cutoffs: Cutoffs, source: str | None = None) -> "SiteCalibration":
        """A calibration that only carries Algorithm 2's cutoffs (probabilities stay uncalibrated)."""
        stages = {s: StageCalibration(stage=s, tau=cutoffs.for_stage(s)) for s in (1, 2, 3)}
        return cls(stages=stages, fitted={"source": source or "cutoffs"}, calibrated=False)
