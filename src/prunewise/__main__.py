"""``python -m prunewise``: the command line (:mod:`prunewise.cli`)."""

import sys

from .cli import main

sys.exit(main())
