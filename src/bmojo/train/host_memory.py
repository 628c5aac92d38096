"""How the C library hands CPU tensors their memory: keep freed memory for reuse (glibc).

PyTorch allocates CPU tensors with ``malloc``. glibc serves blocks over its mmap threshold (at most 32 MiB) with
a fresh ``mmap`` and gives them back to the operating system when they are freed, so every large temporary of a
CPU training step (activations, attention gradients, the logits) faults its pages in again, one page at a time,
on every step. :func:`keep_freed_host_memory` makes glibc serve every block from its heap and keep the heap's
freed memory: the pages stay mapped and the next step reuses them. The process holds on to its peak footprint
instead of returning it between steps (plus what fragmentation of the heap adds to it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

# mallopt parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# Largest value mallopt takes (an int): the heap is trimmed only when its free top exceeds 2 GiB.
NEVER_TRIM = 2**31 - 1
_kept = False  # applied in this process (it lasts as long as the process)


def keep_freed_host_memory() -> bool:
    """Serve every ``malloc`` from the heap and never trim it; True where applied (Linux with glibc), False
    elsewhere.

    Process-wide and for the rest of the process (allocations made before keep their memory). Equivalent to
    starting Python with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``.
    """
    global _kept
    if _kept:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError) as error:
        logger.info("host memory: cannot load the C library (%s); allocations are left as they are", error)
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        logger.info("host memory: the C library is not glibc; allocations are left as they are")
        return False
    _kept = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
    if _kept:
        logger.info("host memory: glibc keeps freed memory for reuse (no mmap, no trimming)")
    return _kept


def host_memory_kept() -> bool:
    """Whether :func:`keep_freed_host_memory` has been applied in this process."""
    return _kept
