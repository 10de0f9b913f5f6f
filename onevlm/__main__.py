"""``python -m onevlm`` runs the CLI."""

import sys

from onevlm.cli import main

sys.exit(main())
