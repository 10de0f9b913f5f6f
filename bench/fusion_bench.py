"""Header only, pixels only and the hybrid router on one labelled set of series, at the site's risk α.

Not a speed benchmark: what each router claims on held-out series, measured as a site would.

**The series.** Each row is a real DICOM file that the project ships (``dicom_samples/``) or installs
(pydicom's test files), chosen to fit the row's scanner type, whose header fields the router reads
(Modality, Body Part Examined, Study/Series Description) are set as a site's protocol would set them
for the row's true modality (a *header variant*), then corrupted at published rates: Body Part
Examined wrong on 15 % of the series that carry it (Güld et al., SPIE 2002), descriptions wrong on
10 % (MR-Class, Cancers 2023), Body Part absent on 20 % and descriptions absent on 30 %. A
description names the finding on 10 % of the series. One row in ten is an object without pixels (SR,
RT plan, ECG, SEG: the right answer is None), about one in six an image no card covers (nuclear
medicine, shoulder MR, knee radiograph, echocardiogram, liver MR: Other). The rest have a card: the
true finding is one that a single card of the modality lists, and that card is the right answer.

**The pixel model** is scripted (``tests/scripted_pixels.ConfusedPixels``): right at stage 1 85 % of
the time on average, its errors among neighbouring modalities, a finding signal at stage 2 (right
70 % of the time), top-2 answers only (the paper's free-text mode), its confidence rising with a
per-image clarity.

**Per repeat**: a random 60/40 split and a fresh draw of the pixel model; each router's calibration is
fitted on the 60 % with onevlm's own ``calibrate fit`` code (Algorithm 2, temperatures or the fusion,
conformal sets at α/2 per set stage), the other 40 % are routed with it. The three routers share stage 3
(the cards' captions against the answers above, text only), so they differ by the evidence of stages
1-2; ``pixels`` is the ``transformers`` router, which also calls the VLM (image masked) at stage 3.

Reported per router and α, averaged over repeats: share routed to **one** card, mean routed-set size,
share sent to review, held-out risk (routed card set missing the right card, or a wrong stop; a review
covers) against α and the share of repeats above α, VLM calls and pixel reads per series, and the
corrupted headers whose pixels were confident (the pixel model's answer right with p >= 0.8) that the
router corrected (right modality) or flagged (header/image disagreement). Goals (from issue 20):
hybrid risk <= α; hybrid one-card share >= 2x the better single source's; hybrid VLM calls <= half of
pixels-only; every corrupted header with confident pixels corrected or flagged.

    python bench/fusion_bench.py [--series 900] [--repeats 10] [--alphas 0.1 0.2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import pydicom
from pydicom.data import get_testdata_file
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from onevlm.backends.embedded import EmbeddedBackend  # noqa: E402
from onevlm.backends.hybrid import HybridBackend  # noqa: E402
from onevlm.cards import CardRepository, default_cards_dir  # noqa: E402
from onevlm.router.backend import NONE, OTHER, Consultation  # noqa: E402
from onevlm.router.labels import LabelledInput  # noqa: E402
from onevlm.router.pipeline import Router  # noqa: E402
from onevlm.router.runner import route_files  # noqa: E402
from onevlm.router.site_calibration import calibrate_rows  # noqa: E402
from scripted_pixels import ConfusedPixels, Truth  # noqa: E402

SAMPLES = ROOT / "dicom_samples"
ROUTERS = ("header", "pixels", "hybrid")
#: Published rates (module docstring).
BODY_PART_WRONG, DESCRIPTION_WRONG = 0.15, 0.10
BODY_PART_MISSING, DESCRIPTION_MISSING = 0.20, 0.30
FINDING_NAMED = 0.10
CONFIDENT_PIXELS = 0.8


@dataclass(frozen=True)
class Protocol:
    """How a site's scanner labels one kind of exam: Modality code, body parts, descriptions."""

    truth: str
    code: str
    body_parts: tuple[str, ...]
    descriptions: tuple[str, ...]
    base: str


def _testdata(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        raise SystemExit(f"pydicom test file {name} is missing (pip install pydicom)")
    return Path(path)


BASES = {"CT": [SAMPLES / "ct_head_routine_brain.dcm", _testdata("CT_small.dcm")],
         "MR": [SAMPLES / "mr_brain_pilot.dcm", _testdata("MR_small.dcm")],
         "CR": [SAMPLES / "cr_chest_j2k.dcm"], "DX": [SAMPLES / "cr_chest_j2k.dcm"], "MG": [SAMPLES / "cr_chest_j2k.dcm"],
         "US": [SAMPLES / "us_small_parts_j2k.dcm"], "NM": [SAMPLES / "nm_whole_body_j2k.dcm"],
         "OP": [_testdata("SC_rgb.dcm")], "OPT": [_testdata("SC_rgb.dcm")], "ES": [_testdata("SC_rgb.dcm")],
         "XC": [_testdata("SC_rgb.dcm")]}
NON_IMAGES = [SAMPLES / "sr_simple_image_report.dcm", SAMPLES / "rt_plan.dcm", SAMPLES / "ecg_waveform.dcm",
              SAMPLES / "seg_liver.dcm"]

P = Protocol
PROTOCOLS = [
    P("brain CT scan", "CT", ("HEAD", "BRAIN"), ("CT HEAD WO CONTRAST", "CT BRAIN ROUTINE", "HEAD CT NON-CONTRAST"), "CT"),
    P("chest CT scan", "CT", ("CHEST", "LUNG"), ("CT CHEST W CONTRAST", "CT THORAX LOW DOSE", "HRCT CHEST"), "CT"),
    P("abdominal CT scan", "CT", ("ABDOMEN", "ABDOMENPELVIS", "PANCREAS"),
      ("CT ABDOMEN PELVIS W CONTRAST", "CT ABD/PEL", "CT PANCREAS PROTOCOL"), "CT"),
    P("kidney CT scan", "CT", ("KIDNEY",), ("CT KIDNEYS STONE PROTOCOL", "CT UROGRAM", "RENAL CT"), "CT"),
    P("liver CT scan", "CT", ("LIVER",), ("CT LIVER TRIPHASIC", "LIVER CT MULTIPHASE"), "CT"),
    P("brain MRI scan", "MR", ("HEAD", "BRAIN"), ("MRI BRAIN W/WO", "MR HEAD ROUTINE", "BRAIN MRI FLAIR"), "MR"),
    P("kidney MRI scan", "MR", ("KIDNEY",), ("MRI KIDNEYS", "MR RENAL MASS PROTOCOL"), "MR"),
    P("chest X-ray scan", "CR", ("CHEST",), ("CHEST PA AND LATERAL", "XR CHEST 1 VIEW", "CHEST AP PORTABLE"), "CR"),
    P("chest X-ray scan", "DX", ("CHEST",), ("CHEST PA", "XR CHEST 2 VIEWS"), "DX"),
    P("breast mammography scan", "MG", ("BREAST",), ("SCREENING MAMMOGRAM BILATERAL", "MAMMO DIAGNOSTIC"), "MG"),
    P("breast ultrasound scan", "US", ("BREAST",), ("US BREAST LEFT", "BREAST ULTRASOUND TARGETED"), "US"),
    P("gallbladder ultrasound scan", "US", ("GALLBLADDER",), ("US GALLBLADDER", "RUQ ULTRASOUND"), "US"),
    P("kidney ultrasound scan", "US", ("KIDNEY",), ("US RENAL", "KIDNEY ULTRASOUND"), "US"),
    P("liver ultrasound scan", "US", ("LIVER",), ("US LIVER", "LIVER ULTRASOUND DOPPLER"), "US"),
    P("fundus photography scan", "OP", ("EYE",), ("FUNDUS PHOTO OU", "RETINAL PHOTOGRAPHY"), "OP"),
    P("retinal OCT scan", "OPT", ("EYE",), ("OCT MACULA", "OCT RETINA OU"), "OPT"),
    P("colonoscopy scan", "ES", ("COLON",), ("COLONOSCOPY", "LOWER GI ENDOSCOPY"), "ES"),
    P("esophageal gastroscopy scan", "ES", ("STOMACH", "ESOPHAGUS"), ("EGD", "UPPER GI ENDOSCOPY"), "ES"),
    P("skin dermoscopy scan", "XC", ("SKIN",), ("DERMOSCOPY LESION", "DERMATOSCOPY"), "XC"),
]
OTHERS = [
    P(OTHER, "NM", ("WHOLEBODY",), ("NM BONE SCAN WHOLE BODY", "BONE SCINTIGRAPHY"), "NM"),
    P(OTHER, "MR", ("SHOULDER",), ("MRI SHOULDER LEFT", "MR SHOULDER ARTHROGRAM"), "MR"),
    P(OTHER, "CR", ("KNEE",), ("XR KNEE 3 VIEWS", "KNEE AP LAT"), "CR"),
    P(OTHER, "US", ("HEART",), ("ECHOCARDIOGRAM TTE", "ECHO COMPLETE"), "US"),
    P(OTHER, "MR", ("LIVER",), ("MRI LIVER W CONTRAST", "MR ABDOMEN LIVER"), "MR"),
]
#: Fields that could carry text the variant did not set: cleared first.
CLEARED = ("ProtocolName", "RequestedProcedureDescription", "PerformedProcedureStepDescription", "ReasonForStudy",
           "AdmittingDiagnosesDescription", "ImageComments", "AnatomicRegionSequence", "StudyDescription",
           "SeriesDescription", "BodyPartExamined")


@dataclass(frozen=True)
class Series:
    """One labelled row: the file, its truth, its gold card and what was done to its header."""

    name: str
    truth: Truth
    card: str
    corrupted: bool


def _unique_findings(cards: CardRepository, modality: str) -> list[tuple[str, str]]:
    """(card, finding) pairs where the finding is listed by that card alone among the modality's cards."""
    members = cards.by_modality(modality)
    pairs = []
    for card in members:
        for finding in card.findings:
            if finding.lower() == "normal":
                continue
            if sum(finding.lower() in {f.lower() for f in other.findings} for other in members) == 1:
                pairs.append((card.id, finding))
    # no finding tells the cards apart (breast ultrasound): any card's finding, that card the gold
    return pairs or [(card.id, f) for card in members for f in card.findings if f.lower() != "normal"]


def build_series(n: int, folder: Path, cards: CardRepository, seed: int) -> list[Series]:
    """Write ``n`` labelled series into ``folder`` (module docstring) and return their truth."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        name = f"{i:05d}.dcm"
        kind = rng.random()
        if kind < 0.10:
            ds = pydicom.dcmread(rng.choice(NON_IMAGES))
            ds.SOPInstanceUID = pydicom.uid.generate_uid()
            ds.save_as(folder / name)
            rows.append(Series(name, Truth(NONE), NONE, False))
            continue
        protocol = rng.choice(OTHERS if kind < 0.27 else PROTOCOLS)
        if protocol.truth == OTHER:
            truth, card = Truth(OTHER), NONE
        else:
            card, finding = rng.choice(_unique_findings(cards, protocol.truth))
            truth = Truth(protocol.truth, finding)
        ds = pydicom.dcmread(rng.choice(BASES[protocol.base]))
        for keyword in CLEARED:
            if keyword in ds:
                delattr(ds, keyword)
        if "ImageType" in ds and len(ds.ImageType) > 2:
            ds.ImageType = list(ds.ImageType)[:2]
        ds.Modality = protocol.code
        same_scanner = [p for p in PROTOCOLS + OTHERS if p.code == protocol.code and p.truth != protocol.truth]
        corrupted = False
        if rng.random() >= BODY_PART_MISSING:
            body_part = rng.choice(protocol.body_parts)
            if same_scanner and rng.random() < BODY_PART_WRONG:
                body_part, corrupted = rng.choice(rng.choice(same_scanner).body_parts), True
            ds.BodyPartExamined = body_part
        if rng.random() >= DESCRIPTION_MISSING:
            description = rng.choice(protocol.descriptions)
            if same_scanner and rng.random() < DESCRIPTION_WRONG:
                description, corrupted = rng.choice(rng.choice(same_scanner).descriptions), True
            elif truth.modality != OTHER and rng.random() < FINDING_NAMED:
                description += f" ? {truth.finding}"
            ds.SeriesDescription = description
            if rng.random() < 0.5:
                ds.StudyDescription = description
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.SeriesInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(folder / name)
        rows.append(Series(name, truth, card, corrupted))
    return rows


class PixelsOnly:
    """The ``transformers`` router in this bench: the pixel model at stages 1-2, the shared text stage 3.

    Stage 3 is answered by the header source's caption matcher (the same text stage for the three routers)
    and counted as one VLM call, as the ``transformers`` backend makes one there (image masked).
    """

    name = "transformers"

    def __init__(self, pixels: ConfusedPixels, text: EmbeddedBackend) -> None:
        self.pixels, self.text = pixels, text

    def identity(self) -> dict:
        return self.pixels.identity()

    def warm_up(self) -> None:
        self.text.warm_up()

    def answer(self, items, requests):
        if requests[0].stage != 3:
            return self.pixels.answer(items, requests)
        consultation = Consultation((), "text only: the VLM chooses among the cards' captions (image masked)",
                                    vlm_calls=1)
        return [replace(r, consultation=consultation) for r in self.text.answer(items, requests)]


def _backend(router: str, header: EmbeddedBackend, pixels: ConfusedPixels):
    if router == "header":
        return header
    if router == "pixels":
        return PixelsOnly(pixels, header)
    return HybridBackend(header, pixels)


def _labelled(rows: Sequence[Series], folder: Path) -> list[LabelledInput]:
    return [LabelledInput(folder / r.name, r.truth.modality, r.truth.finding if r.truth.modality not in (NONE, OTHER)
                          else "", r.card) for r in rows]


def evaluate(decisions, rows: Sequence[Series], pixels: ConfusedPixels, cards: CardRepository) -> dict:
    """Held-out figures of one router (module docstring)."""
    n = len(rows)
    one = routed_sets = reviews = misses = 0
    set_sizes, calls, reads = [], [], []
    confident_corrupted = caught = 0
    allowed = (*cards.modalities, NONE, OTHER)
    for decision, row in zip(decisions, rows):
        outcome = decision.outcome_name
        calls.append(decision.vlm_calls)
        reads.append(sum(1 for s in decision.stages if s.consulted and "pixels" in s.consulted))
        if outcome == "routed":
            one += 1
        elif outcome == "routed-set":
            routed_sets += 1
        elif outcome == "review":
            reviews += 1
        if decision.cards:
            set_sizes.append(len(decision.cards))
            misses += row.card not in decision.cards
        elif outcome in ("stopped", "failed"):
            misses += decision.final_label != row.card
        if row.corrupted and row.truth.modality != NONE:
            from onevlm.router.backend import StageRequest
            from onevlm.router.prompts import stage1_prompt

            request = StageRequest(stage=1, prompt=stage1_prompt(cards.modalities), allowed=allowed)
            probs = pixels.distribution(row.name, request)
            answer, p = max(probs.items(), key=lambda kv: kv[1])
            if answer == row.truth.modality and p >= CONFIDENT_PIXELS:
                confident_corrupted += 1
                corrected = bool(decision.stages) and decision.stages[0].chosen == row.truth.modality
                caught += corrected or decision.disagreement is not None
    return {"n": n, "one_card": one / n, "routed_set": routed_sets / n, "review": reviews / n, "risk": misses / n,
            "mean_set_size": statistics.mean(set_sizes) if set_sizes else None,
            "vlm_calls": statistics.mean(calls), "pixel_reads": statistics.mean(reads),
            "confident_corrupted": confident_corrupted, "caught": caught,
            "disagreements": sum(d.disagreement is not None for d in decisions) / n}


def run(series: int, repeats: int, alphas: Sequence[float], seed: int, holdout: float) -> dict:
    cards = CardRepository.load(default_cards_dir())
    header = EmbeddedBackend(cards)
    header.warm_up()
    findings = {m: sorted({f for c in cards.by_modality(m) for f in c.findings}) for m in cards.modalities}
    results: dict = {"series": series, "repeats": repeats, "holdout": holdout, "alphas": list(alphas), "runs": []}
    with tempfile.TemporaryDirectory(prefix="onevlm-fusion-bench-") as tmp:
        folder = Path(tmp)
        rows = build_series(series, folder, cards, seed)
        results["corrupted_share"] = sum(r.corrupted for r in rows) / len(rows)
        truth = {r.name: r.truth for r in rows}
        bar = tqdm(total=repeats * len(alphas) * len(ROUTERS), desc="fusion bench", unit="fit", disable=None)
        for repeat in range(repeats):
            rng = random.Random(seed * 1000 + repeat)
            order = list(range(len(rows)))
            rng.shuffle(order)
            cut = int(len(rows) * (1 - holdout))
            fit_rows, held_rows = [rows[i] for i in order[:cut]], [rows[i] for i in order[cut:]]
            pixels = ConfusedPixels(truth, findings, seed=seed * 1000 + repeat)
            for alpha in alphas:
                for router_name in ROUTERS:
                    backend = _backend(router_name, header, pixels)
                    started = time.perf_counter()
                    calibration = calibrate_rows(_labelled(fit_rows, folder), "bench", cards, backend, alpha, 0.1,
                                                 0.0, seed, None, None, None, 16)
                    if router_name == "hybrid":
                        backend = backend.with_fusion(calibration.fusion)
                    router = Router(cards, backend, calibration=calibration)
                    decisions = list(route_files(router, [folder / r.name for r in held_rows], batch_size=16,
                                                 progress=False))
                    figures = evaluate(decisions, held_rows, pixels, cards)
                    figures.update(router=router_name, alpha=alpha, repeat=repeat,
                                   seconds=time.perf_counter() - started,
                                   fusion=calibration.fusion.as_dict() if calibration.fusion else None)
                    results["runs"].append(figures)
                    bar.update(1)
        bar.close()
    results["summary"] = summarise(results["runs"], alphas)
    return results


def summarise(runs: Sequence[dict], alphas: Sequence[float]) -> dict:
    summary: dict = {}
    for alpha in alphas:
        for router in ROUTERS:
            mine = [r for r in runs if r["alpha"] == alpha and r["router"] == router]
            keys = ("one_card", "routed_set", "review", "risk", "vlm_calls", "pixel_reads", "disagreements")
            entry = {k: statistics.mean(r[k] for r in mine) for k in keys}
            sizes = [r["mean_set_size"] for r in mine if r["mean_set_size"] is not None]
            entry["mean_set_size"] = statistics.mean(sizes) if sizes else None
            entry["risk_above_alpha"] = sum(r["risk"] > alpha for r in mine) / len(mine)
            confident = sum(r["confident_corrupted"] for r in mine)
            entry["caught"] = sum(r["caught"] for r in mine) / confident if confident else None
            entry["confident_corrupted"] = confident
            summary[f"{router}@{alpha}"] = entry
        hybrid, header, pixels = (summary[f"{r}@{alpha}"] for r in ("hybrid", "header", "pixels"))
        best_single = max(header["one_card"], pixels["one_card"])
        summary[f"goals@{alpha}"] = {
            "hybrid_risk_at_most_alpha": hybrid["risk"] <= alpha,
            "one_card_ratio_vs_best_single": hybrid["one_card"] / best_single if best_single else None,
            "one_card_at_least_2x": hybrid["one_card"] >= 2 * best_single,
            "vlm_calls_ratio_vs_pixels": hybrid["vlm_calls"] / pixels["vlm_calls"] if pixels["vlm_calls"] else None,
            "vlm_calls_at_most_half": hybrid["vlm_calls"] <= 0.5 * pixels["vlm_calls"],
            "every_confident_corrupted_header_caught": hybrid["caught"] == 1.0 if hybrid["caught"] is not None else None,
        }
    return summary


def print_table(results: dict) -> None:
    print(f"{results['series']} series ({results['corrupted_share']:.1%} with a corrupted header), "
          f"{results['repeats']} repeats, {1 - results['holdout']:.0%} fit / {results['holdout']:.0%} held out")
    head = ("router", "α", "one card", "set", "review", "mean set", "risk", ">α", "VLM calls", "pixel reads",
            "flagged", "caught")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for key, entry in results["summary"].items():
        if key.startswith("goals"):
            continue
        router, alpha = key.split("@")
        size = "—" if entry["mean_set_size"] is None else f"{entry['mean_set_size']:.2f}"
        caught = "—" if entry["caught"] is None else f"{entry['caught']:.1%} of {entry['confident_corrupted']}"
        print(f"| {router} | {alpha} | {entry['one_card']:.1%} | {entry['routed_set']:.1%} | {entry['review']:.1%} | "
              f"{size} | {entry['risk']:.3f} | {entry['risk_above_alpha']:.0%} | {entry['vlm_calls']:.2f} | "
              f"{entry['pixel_reads']:.2f} | {entry['disagreements']:.1%} | {caught} |")
    for key, goals in results["summary"].items():
        if key.startswith("goals"):
            print(key, json.dumps(goals))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=900)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--holdout", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures (every run and the summary) here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    results = run(args.series, args.repeats, args.alphas, args.seed, args.holdout)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
