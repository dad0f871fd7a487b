"""The CPU process's heap, made to follow its live tensors (what the CPU estimate assumes).

glibc's malloc serves a block below its mmap threshold from the heap and keeps it mapped
once freed; the threshold starts at 128 KiB and rises, each time an mmapped block is
freed, up to 32 MiB. A training step frees and allocates thousands of activations of a
few MiB, so the process's resident set after a step or two held 16-41 % more than its
live tensors on one CPU and 40-48 % on another (docs/benchmarks.md, "Planner: CPU plans
within budget"): a gap that depends on the stage and the machine, which no constant in
the estimate could bound within 10 %. With the threshold fixed at 1 MiB (which also
stops it rising) and freed heap tops trimmed above 1 MiB, every tensor of 1 MiB or more
is its own mapping, returned at once when freed, and the gap fell to 4-6 %.

`bound_cpu_heap()` sets both, in this process and the DataLoader workers it forks; a
stage that trains on the CPU (`training.trainer.run_stage`) and the `plan --verify` trial
call it, so that what is measured is what trains.
"""
from __future__ import annotations

import ctypes
import logging
import platform

logger = logging.getLogger(__name__)

HEAP_BLOCK_BYTES = 1 << 20  # blocks this size or larger: mmapped; heap tops above it: trimmed
_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def bound_cpu_heap() -> bool:
    """Fix glibc's mmap threshold and trim threshold at `HEAP_BLOCK_BYTES`.

    Returns:
        True where it was set; False where the C library is not glibc (nothing changed).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = (mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK_BYTES) == 1
            and mallopt(_M_TRIM_THRESHOLD, HEAP_BLOCK_BYTES) == 1)
    logger.debug("glibc heap: mmap and trim thresholds at %d bytes: %s", HEAP_BLOCK_BYTES, done)
    return done
