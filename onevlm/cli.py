"""The ``onevlm`` command line.

Research use only: nothing this tool prints or writes is for clinical use.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

logger = logging.getLogger("onevlm")


def _setup(verbose: int, command: str = "") -> None:
    from onevlm.runtime import configure_runtime

    # The service reports what it does (stored, processed, exported) at INFO.
    level = (logging.INFO if command == "serve" else logging.WARNING) - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)
    configure_runtime(level)


def _cards(args: argparse.Namespace):
    from onevlm.cards import CardRepository, default_cards_dir

    return CardRepository.load(args.cards or default_cards_dir())


# -- cards ------------------------------------------------------------------------------------


def cmd_cards_validate(args: argparse.Namespace) -> int:
    from onevlm.cards import default_cards_dir, validate_directory

    directory = Path(args.directory or args.cards or default_cards_dir())
    try:
        cards, errors = validate_directory(directory)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    modalities = dict.fromkeys(card.modality for card in cards)
    status = "OK" if not errors else "FAILED"
    print(f"{status}: {len(cards)} valid card(s), {len(errors)} error(s), {len(modalities)} modalities in {directory}")
    return 1 if errors else 0


def cmd_cards_list(args: argparse.Namespace) -> int:
    repo = _cards(args)
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


def _backend_options(args: argparse.Namespace) -> dict:
    options = {"text_model_dir": getattr(args, "text_model", None)}
    if args.backend == "transformers":
        if not args.model:
            raise SystemExit("error: --backend transformers needs --model DIR (a local model folder)")
        options.update(model_dir=args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                       attn_implementation=args.attn, engine=args.engine, answer_mode=args.answer_mode)
    return options


def _router(args: argparse.Namespace):
    from onevlm.backends import create_backend
    from onevlm.calibration.cutoffs import Cutoffs
    from onevlm.router import Router

    cards = _cards(args)
    cutoffs = Cutoffs.load(args.cutoffs) if args.cutoffs else Cutoffs()
    backend = create_backend(args.backend, cards, **_backend_options(args))
    return Router(cards, backend, cutoffs)


def _print_decision(decision, stream=None) -> None:
    stream = stream or sys.stdout
    ref = decision.reference
    uid = ref.get("sop_instance_uid")
    print(f"{decision.input}" + (f"  [SOP {uid}]" if uid else ""), file=stream)
    if decision.error:
        print(f"  ERROR: {decision.error}", file=stream)
        return
    for stage in decision.stages:
        tau = "none" if stage.tau is None else f"{stage.tau:.6g}"
        print(f"  stage {stage.stage} ({stage.as_dict()['name']}, {stage.prompt_id}, tau={tau})", file=stream)
        for i, cand in enumerate(stage.candidates):
            mark = "<-" if (i == 0) == (stage.index.value == "FIRST") else "  "
            flag = "" if cand.in_allowed_set else "  [outside admissible set]"
            label = "FIRST " if i == 0 else "SECOND"
            print(f"    {mark} {label} p={cand.p:.4f}  {cand.answer}{flag}", file=stream)
        just = stage.chosen_record.justification
        if just:
            print(f"       justification: {just}", file=stream)
    outcome = decision.model_card_id or "None"
    conf = decision.confidence
    extra = f"  ({decision.stop_reason})" if decision.stop_reason else ""
    print(f"  => model card: {outcome}" + (f"  confidence {conf:.4f}" if conf is not None else "") + extra, file=stream)


def cmd_summary(args: argparse.Namespace) -> int:
    from onevlm.reports.routing_metadata import METADATA_FILE

    path = Path(args.output_dir) / METADATA_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        print(f"error: {path}: {exc}", file=sys.stderr)
        return 1
    print(f"{meta['series']} series: {meta['routed']} routed to a card, {meta['skipped']} skipped (not images), "
          f"{meta['errors']} error(s)  [research use only, not for clinical use]")
    for e in meta["entries"]:
        label = e["input"] or e["series_instance_uid"]
        if e["skipped"]:
            outcome = f"skipped: {e['skipped']}"
        elif e["error"]:
            outcome = f"ERROR: {e['error']}"
        elif e["model_card_id"]:
            outcome = f"{e['modality']} / {e['finding']} -> {e['model_card_id']} (confidence {e['confidence']:.3f})"
        else:
            outcome = f"{e['modality']} -> no card ({e['stop_reason']})"
        print(f"  {e['dicom_modality']:6s} {label:34s} {outcome}")
        if e.get("sr_file"):
            print(f"         SR: {e['sr_file']}")
    for problem in meta.get("problems", []):
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
    print(f"onevlm listening as {config.listener.ae_title} on {config.listener.host}:{service.listener.port} "
          f"(spool {config.spool_dir}); research use only, not for clinical use", flush=True)
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
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=None if args.json else 2))
    return 0


def cmd_synth_model(args: argparse.Namespace) -> int:
    from onevlm.vlm.synthetic import SIZES, build_synthetic_model

    if args.size not in SIZES:
        print(f"error: unknown size {args.size!r}; choose one of {', '.join(SIZES)}", file=sys.stderr)
        return 2
    cards = _cards(args) if args.cards else None
    out = build_synthetic_model(args.size, args.out_dir, cards=cards, seed=args.seed)
    print(f"synthetic {args.size} model written to {out} (random weights: tests and benchmarks only)")
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    from onevlm.router import DecisionLog
    from onevlm.router.runner import route_files

    try:
        router = _router(args)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = 0
    log_path = Path(args.log) if args.log else None
    if log_path is None and not args.json:
        log_path = Path("out") / "decisions.jsonl"
    log = DecisionLog(log_path) if log_path else None
    if log:
        log.__enter__()
    try:
        for decision in route_files(router, args.paths, hint=args.hint, batch_size=args.batch_size,
                                    progress=False if args.json else None):
            if log:
                log.write(decision)
            if decision.error:
                failed += 1
                print(f"error: {decision.error}", file=sys.stderr)
            if args.json:
                print(json.dumps(decision.as_dict(), ensure_ascii=False), flush=True)
            else:
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
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    payload = {str(stage): fit.as_dict() for stage, fit in fits.items()}
    if args.output:
        Path(args.output).write_text(json.dumps(payload, indent=2) + "\n")
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
        backend = create_backend(args.backend, cards, **_backend_options(args))
        cutoffs = Cutoffs.load(args.cutoffs) if args.cutoffs else None
        summary = evaluate(args.labels, cards, backend, args.output, cutoffs=cutoffs, fit=args.fit,
                           batch_size=args.batch_size)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(Path(args.output, "summary.md").read_text())
    print(f"report written to {args.output}/ (summary.json, decision logs, reliability.png)")
    return 0 if not summary["baseline"]["failed"] else 1


# -- parser -----------------------------------------------------------------------------------


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("embedded", "transformers"), default="embedded",
                   help="embedded: DICOM header + MiniLM (offline default); transformers: a local VLM folder")
    p.add_argument("--model", help="local model folder for --backend transformers (e.g. medgemma-4b-it)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (transformers)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    p.add_argument("--quantize", choices=("none", "nf4"), default="none", help="load the VLM in 4-bit NF4")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="attention implementation (transformers)")
    p.add_argument("--engine", choices=("fast", "naive"), default="fast",
                   help="fast: image encoded once, batched prefill, both branches decoded together; naive: reference")
    p.add_argument("--answer-mode", choices=("free", "options"), default="free",
                   help="free: paper's top-2 first tokens; options: score every admissible answer")
    p.add_argument("--text-model", help="sentence-transformers folder for the embedded backend")
    p.add_argument("--cards", help="model-card folder (default: the project's model_cards/)")
    p.add_argument("--cutoffs", help="cutoffs JSON (from 'onevlm cutoffs fit'); default: no cutoff")
    p.add_argument("--batch-size", type=int, default=8, help="inputs per backend call")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onevlm",
        description="One medical VLM as a calibrated model-card router. Research use only: not for clinical use.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    from onevlm import __version__

    parser.add_argument("--version", action="version", version=f"onevlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("route", help="route DICOM files or images to model cards")
    p.add_argument("paths", nargs="+", help="files or folders")
    _add_backend_args(p)
    p.add_argument("--log", help="decision log (JSON Lines); default out/decisions.jsonl")
    p.add_argument("--json", action="store_true", help="print one JSON record per input")
    p.add_argument("--hint", help="modality hint for PNG/JPEG inputs (e.g. 'chest X-ray scan')")
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

    p = sub.add_parser("summary", help="print the per-series routing outcome of an app output folder")
    p.add_argument("output_dir", help="folder holding metadata.json (written by the MONAI Deploy app)")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("synth-model", help="write a synthetic Gemma 3 (MedGemma-architecture) model folder")
    p.add_argument("size", help="tiny (tests), small (CPU benchmark) or medgemma-4b-shape (GPU benchmark)")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cards", help="cards whose texts the tokenizer covers (default: model_cards/)")
    p.set_defaults(func=cmd_synth_model)

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
    p.add_argument("-o", "--output", default="out/evaluation", help="report folder")
    p.set_defaults(func=cmd_router_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup(args.verbose, args.command)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
