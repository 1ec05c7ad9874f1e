"""``python -m competition`` (what ``torchrun -m competition train ...`` runs in each process)."""

import sys

from competition.cli import main

sys.exit(main())
