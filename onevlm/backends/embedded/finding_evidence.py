"""Stage 2 of the embedded backend: the primary finding from the header's descriptive text.

Phrases from the descriptions (study, series, protocol, reason for study…) are compared with
every finding the cards name, using all-MiniLM-L6-v2 cosine similarity. Only similarity above
``NOISE_FLOOR`` counts as evidence for a finding (logit ``(sim - floor) / T``). ``Normal`` stands
for "no finding identified" and holds a fixed lead of ``NORMAL_PRIOR`` (in logit units): when the
text names no finding, the answer is ``Normal`` with the low probability a near-uniform
distribution gives it, which says "no evidence either way", not "this study is normal".
Pixels are not read.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from onevlm.backends.embedded.anatomy import strip_anatomy
from onevlm.backends.embedded.distribution import Ranked, softmax_ranking
from onevlm.backends.embedded.text_encoder import TextEncoder
from onevlm.dicom.header import DicomHeader
from onevlm.router.backend import NORMAL

TEMPERATURE = 0.05
NOISE_FLOOR = 0.35
NORMAL_PRIOR = 1.0

_SPLIT = re.compile(r"[,;/^|\\]+|\s-\s")

#: Words that describe how an image was acquired, never what it shows.
TECHNIQUE_WORDS = frozenset(
    """ct mr mri us cr dx xr x ray xray scan scans imaging image images study series exam view views
    routine plain contrast wo w with without and of the a an in on for to axial coronal sagittal
    transverse scout localizer localiser pilot survey fast t1 t2 t1w t2w flair dwi adc se fse tse gre
    mpr mip recon reconstruction thin thick slice slices mm sec gated angio mra mrv cta protocol
    diagnostic diagnostics comp min max pa ap lat lateral oblique obli portable ultrasound sonography
    doppler echo dynamic dyn vibe fs tra bh bone soft tissue window lung mediastinum primary
    original derived secondary collection compressed uncompressed capture quad segmentation
    transesophageal transthoracic cervical cont contr noncontrast noncon enh enhanced iv oral""".split()
)


def finding_bearing(phrase: str) -> bool:
    """True if the phrase says more than anatomy and technique ("Routine Brain" says nothing)."""
    words = re.findall(r"[a-z]+", strip_anatomy(phrase.lower()))
    return any(len(w) >= 3 and w not in TECHNIQUE_WORDS for w in words)


def description_phrases(header: DicomHeader | None) -> list[tuple[str, str]]:
    """``(field, phrase)`` pairs that may name a finding: descriptions split at separators."""
    if header is None:
        return []
    out = []
    for field_name, text in header.descriptions:
        for phrase in _SPLIT.split(text):
            phrase = " ".join(phrase.split())
            if finding_bearing(phrase):
                out.append((field_name, phrase))
    return out


def rank_findings(
    header: DicomHeader | None, vocabulary: Sequence[str], encoder: TextEncoder | None
) -> tuple[list[Ranked], dict]:
    """Stage-2 distribution over ``vocabulary`` (which includes ``Normal``).

    The evidence's ``informative`` is ``False`` when no phrase scored above the noise floor:
    the answer is then the ``Normal`` default, which says nothing about the image.
    """
    findings = [f for f in vocabulary if f != NORMAL]
    phrases = description_phrases(header)
    if not phrases or encoder is None:
        logits = [0.0] * len(findings) + [NORMAL_PRIOR * TEMPERATURE]
        ranking = softmax_ranking([*findings, NORMAL], logits, TEMPERATURE)
        return ranking, {
            "method": "header-text-minilm-v1",
            "pixels_read": False,
            "temperature": TEMPERATURE,
            "text": [],
            "informative": False,
            "note": "no header text names a finding (anatomy and technique only, or none): no evidence either way",
        }
    sims = encoder.similarity([p for _, p in phrases], findings)  # (phrases, findings)
    best_phrase = np.argmax(sims, axis=0)
    best = sims[best_phrase, np.arange(len(findings))]
    logits = [max(float(x) - NOISE_FLOOR, 0.0) for x in best] + [NORMAL_PRIOR * TEMPERATURE]
    ranking = softmax_ranking([*findings, NORMAL], logits, TEMPERATURE)
    support = {}
    for r in ranking[:2]:
        if r.answer == NORMAL:
            support[r.answer] = "no finding named clearly enough in the text (none identified)"
        else:
            j = findings.index(r.answer)
            field_name, phrase = phrases[int(best_phrase[j])]
            support[r.answer] = f"{field_name} phrase '{phrase}' (cosine {best[j]:.3f})"
    informative = bool(np.any(best > NOISE_FLOOR))
    top = ranking[0].answer
    supporting: list[str] = []
    if top != NORMAL:
        j = findings.index(top)
        seen: set[str] = set()
        for (field_name, phrase), sim in zip(phrases, sims[:, j]):
            key = " ".join(phrase.lower().split())
            if sim > NOISE_FLOOR and key not in seen:  # the same phrase copied into two fields counts once
                seen.add(key)
                supporting.append(field_name)
    evidence = {
        "method": "header-text-minilm-v1",
        "pixels_read": False,
        "temperature": TEMPERATURE,
        "informative": informative,
        "noise_floor": NOISE_FLOOR,
        "normal_prior": NORMAL_PRIOR,
        "text": [f"{f}: {p}" for f, p in phrases],
        "support": support,
        # two different phrases naming the finding back it (the hybrid lets only such a header decide alone)
        "corroboration": {"answer": top, "supporting": supporting, "conflicting": [],
                          "corroborated": len(supporting) >= 2},
    }
    if not informative:
        evidence["note"] = f"no phrase is closer to a finding than the noise floor {NOISE_FLOOR}: no evidence either way"
    return ranking, evidence
