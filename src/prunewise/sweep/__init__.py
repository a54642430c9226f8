"""Sweeps: the grid (:mod:`.grid`), the runner that resumes and records (:mod:`.runner`), the
worker that holds one model (:mod:`.worker`) and where runs execute (:mod:`.executors`)."""

from .grid import Sweep, label, run_key  # noqa: F401  (the sweep API)
from .runner import SweepOptions, SweepSummary, run_sweep  # noqa: F401
