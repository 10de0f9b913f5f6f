"""``python -m onevlm.cards [DIR]``: validate a card folder (the CLI's ``onevlm cards validate``)."""

import sys

from onevlm.cards.repository import default_cards_dir, validate_directory

directory = sys.argv[1] if len(sys.argv) > 1 else default_cards_dir()
cards, errors = validate_directory(directory)
for error in errors:
    print(f"error: {error}", file=sys.stderr)
modalities = dict.fromkeys(c.modality for c in cards)
print(f"{len(cards)} valid cards, {len(errors)} errors, {len(modalities)} modalities")
sys.exit(1 if errors else 0)
