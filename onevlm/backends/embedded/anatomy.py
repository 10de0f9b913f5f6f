"""Anatomical regions named by DICOM Body Part Examined values and by acquisition text.

The embedded backend reads no pixels; anatomy is what the header says. Regions are coarse on
purpose (a model card accepts a region, not a structure). ``GENERIC_REGIONS`` name a body area
that contains organs with cards of their own (an abdominal CT may be a liver or a kidney CT).
"""

from __future__ import annotations

import re
from typing import Iterable

#: Body Part Examined value -> region.
BODY_PART_REGIONS: dict[str, str] = {
    "HEAD": "head", "BRAIN": "head", "SKULL": "head", "HEADNECK": "head",
    "NECK": "neck", "THYROID": "neck", "CAROTID": "neck",
    "CHEST": "chest", "THORAX": "chest", "LUNG": "lung",
    "BREAST": "breast",
    "ABDOMEN": "abdomen", "ABDOMENPELVIS": "abdomen", "CHESTABDOMEN": "abdomen", "CHESTABDPELVIS": "abdomen",
    "PELVIS": "pelvis",
    "LIVER": "liver", "KIDNEY": "kidney", "GALLBLADDER": "gallbladder", "PANCREAS": "pancreas",
    "SPLEEN": "spleen", "ADRENAL": "adrenal", "BLADDER": "bladder",
    "PROSTATE": "prostate", "CERVIX": "cervix", "UTERUS": "uterus",
    "COLON": "colon", "RECTUM": "colon", "ESOPHAGUS": "upper gi", "STOMACH": "upper gi", "DUODENUM": "upper gi",
    "SKIN": "skin", "EYE": "eye", "RETINA": "eye",
    "BLOOD": "blood", "BONEMARROW": "blood",
    "HEART": "heart",
    "SPINE": "spine", "CSPINE": "spine", "TSPINE": "spine", "LSPINE": "spine", "SSPINE": "spine", "COCCYX": "spine",
    "EXTREMITY": "extremity", "ARM": "extremity", "LEG": "extremity", "HAND": "extremity", "FOOT": "extremity",
    "KNEE": "extremity", "HIP": "extremity", "SHOULDER": "extremity", "ELBOW": "extremity", "WRIST": "extremity",
    "ANKLE": "extremity", "FEMUR": "extremity",
    "WHOLEBODY": "whole body", "ENTIRE BODY": "whole body", "WHOLE BODY": "whole body",
    "LYMPHNODE": "lymph node",
}

#: Regions that contain organs with cards of their own; a match on them is weaker evidence.
GENERIC_REGIONS = frozenset({"abdomen", "pelvis", "chest", "whole body"})

#: Regions that lie inside another region (an abdominal CT card accepts a liver CT).
CONTAINED_IN = {
    "liver": "abdomen", "kidney": "abdomen", "gallbladder": "abdomen", "pancreas": "abdomen",
    "spleen": "abdomen", "adrenal": "abdomen", "bladder": "pelvis", "prostate": "pelvis",
    "uterus": "pelvis", "cervix": "pelvis", "lung": "chest", "heart": "chest",
}

#: Words (regular expressions on lower-case text) that name a region in free text.
TEXT_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\b(head|brain|skull|cranial|intracranial|cerebr\w*|neuro\w*|stroke)\b", "head"),
    (r"\b(neck|thyroid|carotids?)\b", "neck"),
    (r"\b(chest|thorax|thoracic|cxr)\b", "chest"),
    (r"\b(lungs?|pulmonary|pleura\w*)\b", "lung"),
    (r"\b(breast|mammo\w*|tomosynthesis)\b", "breast"),
    (r"\b(abdomen|abdominal|abd)\b", "abdomen"),
    (r"\b(pelvis|pelvic)\b", "pelvis"),
    (r"\b(liver|hepat\w*)\b", "liver"),
    (r"\b(kidneys?|renal|nephr\w*)\b", "kidney"),
    (r"\b(gall ?bladder|biliary|cholecyst\w*)\b", "gallbladder"),
    (r"\bpancrea\w*\b", "pancreas"),
    (r"\bspleen\b", "spleen"),
    (r"\bprostat\w*\b", "prostate"),
    (r"\b(cervix|pap smear|pap test)\b", "cervix"),
    (r"\b(obstetric\w*|fetal|fetus|pregnan\w*|uterus|uterine)\b", "uterus"),
    (r"\b(colon\w*|rectum|rectal|sigmoid\w*|bowel|colorectal)\b", "colon"),
    (r"\b(esophag\w*|oesophag\w*|gastr\w*|stomach|egd|duoden\w*)\b", "upper gi"),
    (r"\b(skin|derm\w*|nev\w*|mole|melanoma)\b", "skin"),
    (r"\b(eyes?|retina\w*|fundus|ophthalm\w*|macula\w*)\b", "eye"),
    (r"\b(blood smear|peripheral blood|bone marrow)\b", "blood"),
    (r"\b(heart|cardiac|cardio\w*|echo\w*|coronary|tee|tte|smartscore)\b", "heart"),
    (r"\b(spine|spinal|vertebra\w*|lumbar|[clts][ -]?spine)\b", "spine"),
    (r"\b(extremit\w*|knee|hand|wrist|ankle|foot|feet|femur|femoral|tibia\w*|fibula|shoulder|elbow|hip|humer\w*|forearm)\b", "extremity"),
    (r"\b(whole ?body)\b", "whole body"),
)
_COMPILED = tuple((re.compile(p), region) for p, region in TEXT_PATTERNS)


def region_of_body_part(value: str) -> str | None:
    """The region of a Body Part Examined value (``None`` if unknown or empty)."""
    key = " ".join(value.upper().split())
    return BODY_PART_REGIONS.get(key) or BODY_PART_REGIONS.get(key.replace(" ", ""))


def regions_in_text(text: str) -> list[str]:
    """Regions named in free text, in order of first mention, without duplicates."""
    lowered = text.lower().replace("^", " ").replace("_", " ")
    hits: list[tuple[int, str]] = []
    for pattern, region in _COMPILED:
        match = pattern.search(lowered)
        if match:
            hits.append((match.start(), region))
    return list(dict.fromkeys(region for _, region in sorted(hits)))


def expand(regions: Iterable[str]) -> set[str]:
    """Regions plus the regions containing them (liver -> liver, abdomen)."""
    out = set()
    for region in regions:
        out.add(region)
        if region in CONTAINED_IN:
            out.add(CONTAINED_IN[region])
    return out


def strip_anatomy(text: str) -> str:
    """``text`` (lower case) with every anatomy word removed."""
    lowered = text.lower().replace("^", " ").replace("_", " ")
    for pattern, _ in _COMPILED:
        lowered = pattern.sub(" ", lowered)
    return " ".join(lowered.split())
