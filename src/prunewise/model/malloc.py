"""Process-level tuning for CPU runs.

glibc serves every allocation above 32 MB with a fresh ``mmap``, and returns it to the kernel on
``free``: each new activation tensor of a block forward (e.g. 8 x 512 x 1536 floats = 25 MB and
up) is then page-faulted and zeroed again. On the bundled 135M model this costs 15-25% of a
calibration pass on 2 cores (``benchmarks/RESULTS.md``). :func:`keep_freed_memory` asks glibc to
serve large blocks from the heap and keep freed memory for reuse: the peak of live memory is
unchanged, but the resident size no longer shrinks after a peak. The CLI calls it; library users
may call it themselves. It is a no-op outside glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Disable glibc's mmap for large blocks and heap trimming; return whether it applied."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    log.debug("glibc mallopt tuning %s", "applied" if ok else "refused")
    return ok
