"""Process-level tuning for CPU runs.

glibc serves every allocation above 32 MB with a fresh ``mmap``, and returns it to the kernel on
``free``: each new activation tensor of a block forward (e.g. 8 x 512 x 1536 floats = 25 MB and
up) is then page-faulted and zeroed again. On the bundled 135M model this costs 15-25% of a
calibration pass on 2 cores (``benchmarks/RESULTS.md``). :func:`keep_freed_memory` asks glibc to
serve large blocks from the heap and keep freed memory for reuse: the peak of live memory is
unchanged, but the resident size no longer shrinks after a peak. The CLI calls it; library users
may call it themselves. It is a no-op outside glibc.

The kept heap fragments where large short-lived tensors alternate with small long-lived ones:
GBLM's gradient pass (each window's logits, 100 MB on the bundled model, between the kept block
inputs and the per-window gradients) grew the resident size by 1.4 GB for 0.4 GB live. Such a pass
runs under :func:`returning_freed_memory`, which gives large blocks back to ``mmap`` for its
duration.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
from collections.abc import Iterator

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
LARGE = 32 << 20  # blocks from this size are mmap-ed while memory is returned (glibc's own maximum)
_kept = False  # keep_freed_memory applied


def _libc_function(name: str):
    """glibc's ``name`` taking ints, or None outside glibc."""
    lib = ctypes.util.find_library("c")
    if not lib:
        return None
    try:
        fn = getattr(ctypes.CDLL(lib), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int] if name == "mallopt" else [ctypes.c_size_t]
    return fn


def _mallopt():
    return _libc_function("mallopt")


def release_free_heap() -> bool:
    """Give the free pages of every malloc arena back to the kernel (``malloc_trim(0)``): the
    resident size is then the live memory, and a block later allocated where freed memory was kept
    is faulted in anew, so it shows in the resident size. Return whether it ran (glibc only)."""
    trim = _libc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


def keep_freed_memory() -> bool:
    """Disable glibc's mmap for large blocks and heap trimming; return whether it applied."""
    global _kept
    mallopt = _mallopt()
    ok = mallopt is not None and bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    log.debug("glibc mallopt tuning %s", "applied" if ok else "refused")
    _kept = _kept or ok
    return ok


@contextlib.contextmanager
def returning_freed_memory() -> Iterator[None]:
    """For the duration, blocks of :data:`LARGE` bytes and more are mmap-ed again (given back to
    the kernel when freed) and the heap is trimmed; then :func:`keep_freed_memory` applies again.
    glibc still serves a large block from a free heap chunk kept before, before it considers
    ``mmap``; :func:`release_free_heap` makes such pages non-resident. The tuning is a no-op
    unless :func:`keep_freed_memory` had applied."""
    mallopt = _mallopt() if _kept else None
    if mallopt is None:
        yield
        return
    mallopt(M_MMAP_THRESHOLD, LARGE)
    mallopt(M_MMAP_MAX, 65536)
    mallopt(M_TRIM_THRESHOLD, LARGE)
    try:
        yield
    finally:
        keep_freed_memory()
