"""Model cards: schema, validation and the repository the router reads."""

from onevlm.cards.repository import CardRepository, default_cards_dir, validate_directory
from onevlm.cards.schema import CardError, DicomMatch, ExecuteSpec, ModelCard, load_card

__all__ = [
    "CardError",
    "CardRepository",
    "DicomMatch",
    "ExecuteSpec",
    "ModelCard",
    "default_cards_dir",
    "load_card",
    "validate_directory",
]
