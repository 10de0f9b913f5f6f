"""Stage 3 of the embedded backend: the model card whose caption best fits modality + finding.

The structured query ("<modality>; primary abnormality: <finding>") is embedded and compared
with each candidate's task caption (cosine similarity, all-MiniLM-L6-v2). A card that lists the
finding among its targets gets ``FINDING_BONUS``. ``None`` scores ``NONE_SIMILARITY``: a card
must fit better than that to be chosen.
"""

from __future__ import annotations

from typing import Sequence

from onevlm.backends.embedded.distribution import Ranked, softmax_ranking
from onevlm.backends.embedded.text_encoder import TextEncoder
from onevlm.cards.schema import ModelCard
from onevlm.router.backend import NONE

TEMPERATURE = 0.1
NONE_SIMILARITY = 0.25
FINDING_BONUS = 0.15


def structured_query(modality: str, finding: str) -> str:
    """The text stage 3 embeds (the paper's structured fields)."""
    return f"{modality}; primary abnormality: {finding}"


def rank_cards(
    modality: str, finding: str, cards: Sequence[ModelCard], encoder: TextEncoder
) -> tuple[list[Ranked], dict[str, str], dict]:
    """Stage-3 distribution over the candidate IDs and ``None``, with a justification per card."""
    query = structured_query(modality, finding)
    # the query is built from the card vocabulary (modality, finding): cached on disk with the captions
    sims = encoder.similarity([query], [c.task_caption for c in cards], persist_queries=True)[0] if cards else []
    logits, justifications = [], {}
    for card, sim in zip(cards, sims):
        listed = finding.lower() in {f.lower() for f in card.findings}
        score = float(sim) + (FINDING_BONUS if listed else 0.0)
        logits.append(score)
        justifications[card.id] = (
            f"caption similarity {float(sim):.3f} to '{query}'"
            + (f"; '{finding}' is one of its targets" if listed else "")
        )
    answers = [c.id for c in cards] + [NONE]
    logits.append(NONE_SIMILARITY)
    justifications[NONE] = f"no caption fits '{query}' better than {NONE_SIMILARITY}"
    ranking = softmax_ranking(answers, logits, TEMPERATURE)
    evidence = {
        "method": "caption-similarity-minilm-v1",
        "pixels_read": False,
        "temperature": TEMPERATURE,
        "query": query,
        "none_similarity": NONE_SIMILARITY,
        "finding_bonus": FINDING_BONUS,
    }
    return ranking, justifications, evidence
