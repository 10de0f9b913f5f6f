"""A reviewer's answer to one routed series: the right card, "none of these", or "not routable".

Answers are labels: they live in the service's journal (never in the DICOM results), every one is
kept (the latest per series counts), and ``onevlm labels export`` turns them into the LABELS.csv
that ``onevlm calibrate fit`` reads. Research use only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: The reviewer named the right card (``card``).
CARD = "card"
#: The right card is not among those the router offered (which one is not said).
NONE_OF_THESE = "none-of-these"
#: No card should run on this series (the gold final answer is ``None``).
NOT_ROUTABLE = "not-routable"
ANSWER_KINDS = (CARD, NONE_OF_THESE, NOT_ROUTABLE)

_UID = re.compile(r"^[0-9.]{1,64}$")
_CARD_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: A reviewer is named by initials or a user name; free text beyond that belongs in the comment.
_REVIEWER = re.compile(r"^[\w .@-]{1,64}$")
MAX_COMMENT = 2000


@dataclass(frozen=True)
class ReviewAnswer:
    """One recorded answer (validated on construction: a bad value raises ``ValueError``).

    Attributes
    ----------
    group_key, series_instance_uid:
        The service group (study or series UID) and the series whose route was reviewed.
    kind:
        One of :data:`ANSWER_KINDS`.
    card:
        The right card's ID when ``kind`` is :data:`CARD`, else ``None``.
    reviewer:
        Who answered (initials or user name).
    comment:
        Optional free text (stored, never logged: it may name the patient).
    recorded_at:
        Unix time of the answer.
    """

    group_key: str
    series_instance_uid: str
    kind: str
    card: str | None
    reviewer: str
    comment: str = ""
    recorded_at: float = 0.0

    def __post_init__(self) -> None:
        for name in ("group_key", "series_instance_uid"):
            if not _UID.match(getattr(self, name) or ""):
                raise ValueError(f"{name} {getattr(self, name)!r} is not a UID")
        if self.kind not in ANSWER_KINDS:
            raise ValueError(f"answer {self.kind!r} must be one of {', '.join(ANSWER_KINDS)}")
        if self.kind == CARD and not _CARD_ID.match(self.card or ""):
            raise ValueError(f"card {self.card!r} is not a card ID")
        if self.kind != CARD and self.card is not None:
            raise ValueError(f"answer {self.kind!r} names no card")
        if not _REVIEWER.match(self.reviewer or ""):
            raise ValueError("reviewer must be 1-64 letters, digits, spaces or . @ - _ (initials or a user name)")
        if len(self.comment) > MAX_COMMENT:
            raise ValueError(f"comment is longer than {MAX_COMMENT} characters")
