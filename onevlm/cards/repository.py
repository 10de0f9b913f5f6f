"""The model-card repository: every card of a folder, and the views the router needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from onevlm.cards.schema import CardError, ModelCard, load_card

CARD_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class CardRepository:
    """An immutable, validated set of model cards.

    Build one with :meth:`load` (from a folder) or :meth:`from_cards`. Card IDs are unique.
    """

    cards: tuple[ModelCard, ...]

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for card in self.cards:
            if card.id in seen:
                raise CardError(card.source, "id", f"'{card.id}' is also used by {seen[card.id]}")
            seen[card.id] = card.source

    @classmethod
    def from_cards(cls, cards: Iterable[ModelCard]) -> "CardRepository":
        """Build a repository from cards already in memory (sorted by ID)."""
        return cls(tuple(sorted(cards, key=_id_order)))

    @classmethod
    def load(cls, directory: str | Path) -> "CardRepository":
        """Load and validate every ``*.yaml`` card in ``directory``.

        Raises
        ------
        CardError
            On the first invalid card (use :func:`validate_directory` to collect all errors).
        FileNotFoundError
            If the folder does not exist or holds no card.
        NotADirectoryError
            If ``directory`` is a file.
        """
        cards, errors = _read_directory(directory)
        if errors:
            raise errors[0]
        return cls.from_cards(cards)

    @property
    def modalities(self) -> tuple[str, ...]:
        """Stage 1's admissible list: the cards' modality fields, deduplicated, in card order."""
        return tuple(dict.fromkeys(card.modality for card in self.cards))

    @property
    def findings(self) -> tuple[str, ...]:
        """Every finding named by any card, deduplicated case-insensitively, in card order."""
        seen: dict[str, str] = {}
        for card in self.cards:
            for finding in card.findings:
                seen.setdefault(finding.lower(), finding)
        return tuple(seen.values())

    def by_modality(self, modality: str) -> tuple[ModelCard, ...]:
        """The stage-3 candidates: cards whose modality equals ``modality`` exactly."""
        return tuple(card for card in self.cards if card.modality == modality)

    def get(self, card_id: str) -> ModelCard:
        """The card with this ID (``KeyError`` if none)."""
        for card in self.cards:
            if card.id == card_id:
                return card
        raise KeyError(card_id)

    def __len__(self) -> int:
        return len(self.cards)

    def __iter__(self):
        return iter(self.cards)


def _id_order(card: ModelCard) -> tuple[int, str]:
    return (int(card.id.split("_")[1]), card.id)


def _card_files(directory: Path) -> list[Path]:
    if directory.is_file():
        raise NotADirectoryError(f"{directory}: not a folder (give the folder that holds the *.yaml cards)")
    if not directory.is_dir():
        raise FileNotFoundError(f"model-card folder not found: {directory}")
    files = sorted(p for p in directory.iterdir() if p.suffix in CARD_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no *.yaml model cards in {directory}")
    return files


def _read_directory(directory: str | Path) -> tuple[list[ModelCard], list[CardError]]:
    cards: list[ModelCard] = []
    errors: list[CardError] = []
    ids: dict[str, str] = {}
    for path in _card_files(Path(directory)):
        try:
            card = load_card(path)
        except CardError as exc:
            errors.append(exc)
            continue
        if card.id in ids:
            errors.append(CardError(path.name, "id", f"'{card.id}' is also used by {ids[card.id]}"))
            continue
        ids[card.id] = path.name
        cards.append(card)
    return cards, errors


def validate_directory(directory: str | Path) -> tuple[list[ModelCard], list[CardError]]:
    """Validate every card in ``directory`` and return ``(valid cards, errors)``.

    Every error names its file and field; a duplicate ID is reported on the second file.
    """
    return _read_directory(directory)


def default_cards_dir() -> Path:
    """The ``model_cards/`` folder shipped with the project (``ONEVLM_CARDS`` overrides it)."""
    import os

    override = os.environ.get("ONEVLM_CARDS")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "model_cards"
