"""What planning a run will compute, before it computes it: the heavy passes, whether their
results are already cached, and roughly how long each takes.

A dry run prints this before any calibration pass (``prunewise prune --dry-run``), so that a
default OWL dry run does not start a pass of 128 x 2048 tokens through every block unannounced.
The figures are estimates, not promises: one calibration sample is timed through block 0
(the fastest of two runs, after capturing its inputs), and each pass is that time x samples x
blocks; a backward pass counts as two forwards; a spectrum is timed on a 256 x 512 float64 matrix
and scaled by ``m n min(m, n)``. Statistics declare their cost in :data:`STATISTICS` (``cost=``)
and drivers theirs in the allocator registry (``driver_cost=``), next to their definitions;
:func:`prunewise.allocation.planner.preview` gathers them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from ..model.blocks import run_block
from .esd import eigenvalues

# ``ctx`` below is a :class:`prunewise.allocation.statistics.StatContext`; that module declares each
# statistic's cost with the helpers here, so this one does not import it back.
StatContext = Any


@dataclass
class Work:
    """One heavy step of a plan: what it computes, about how long (None: cached) and a cheaper way, if any."""

    what: str
    seconds: float | None
    cheaper: str = ""

    def line(self) -> str:
        when = "cached, nothing to compute" if self.seconds is None else f"about {duration(self.seconds)}"
        text = f"- {self.what}: {when}"
        return text + (f"\n  quicker: {self.cheaper}" if self.cheaper else "")


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Rates:
    """Measured speeds the estimates scale from (each measured once, when first needed)."""

    def __init__(self, ctx: StatContext):
        self.ctx = ctx

    @cached_property
    def block_s(self) -> float:
        """Seconds for one calibration sample through block 0, forward."""
        source, calib = self.ctx.source, self.ctx.need_calib("a time estimate")
        inputs = source.capture(calib[:1], 1)
        times = []
        with torch.no_grad(), source.block(0) as block:
            for _ in range(2):
                t0 = time.perf_counter()
                run_block(block, inputs.hidden, inputs.calls[0])
                times.append(time.perf_counter() - t0)
        return min(times)

    @cached_property
    def spectrum_flop_s(self) -> float:
        """Seconds per ``m n min(m, n)`` of one matrix's eigenvalues (:func:`esd.eigenvalues`)."""
        a = torch.randn(256, 512, dtype=torch.float64)
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            eigenvalues(a)
            times.append(time.perf_counter() - t0)
        return min(times) / (256 * 512 * 256)

    def passes(self, samples: int, factor: float = 1.0) -> float:
        """Seconds for ``samples`` calibration samples through every block, ``factor`` forwards each."""
        return samples * len(self.ctx.source) * self.block_s * factor


def calibration_pass(ctx: StatContext, rates: Rates, what: str, factor: float = 1.0) -> Work:
    """A pass of the calibration set through every block (``factor`` forwards per block)."""
    n, seqlen = ctx.calib.shape
    work = Work(f"{what}: {n} x {seqlen} tokens through {len(ctx.source)} blocks", rates.passes(n, factor))
    if n > 16:
        work.cheaper = (
            f"--nsamples 16 takes about {duration(rates.passes(16, factor))} "
            "(statistics from fewer samples: a different, noisier allocation)"
        )
    return work


def prune_cost(ctx: StatContext, rates: Rates, mode: str) -> float:
    """Seconds for one prune of the whole model with the run's metric (0 when it reads no data)."""
    if not ctx.metric.needs:
        return 0.0
    return rates.passes(ctx.calib.shape[0], 1.0 if mode == "single-pass" else 2.0)
