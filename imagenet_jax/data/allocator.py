"""Freed memory kept for reuse: glibc's malloc set up for an input pipeline.

By default glibc hands blocks of 128 KB and more straight back to the operating system
(its mmap and trim thresholds), so nearly every image-sized buffer of the pipeline is
fresh memory: a TFDS record (~110 KB), a decoded 500x375 crop (~560 KB), a 224-px float
resize (~600 KB). The first write to each 4 KB page of fresh memory is a page fault,
which can make copying a record into a new Python `bytes` an order of magnitude slower
than copying it into reused memory (BENCHMARKS.md, "Input at pod scale"). For TFDS reads
this happens while holding the GIL, which is what limits how reads scale with cores.

`keep_freed_memory()` raises both thresholds, so freed blocks stay in the process and
are reused: its resident memory stays near its peak instead of returning to the OS
between batches. With another allocator preloaded (tcmalloc, jemalloc), or off glibc,
it does nothing. mallopt(3) is not thread-safe: the CLI calls it first thing, before
TensorFlow or JAX start a thread; a program of its own calls it as early, or starts
Python with the same setting in the environment:
GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456
"""

from __future__ import annotations

import ctypes

# mallopt(3) parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20   # glibc's maximum: blocks up to 32 MB come from the heap
TRIM_THRESHOLD = 256 * 2**20  # free memory at the top of a heap kept up to 256 MB


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to keep and reuse freed blocks; True if it took effect.
    Process-wide; call it before any other thread starts (mallopt is not thread-safe)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process runs on
    except (OSError, AttributeError):  # not glibc (or not a POSIX dlopen)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
