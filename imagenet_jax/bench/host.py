"""What the benchmarks measure of the host process itself, shared by bench train and input."""

from __future__ import annotations

import resource
import sys


def process_peak_rss_mb() -> float:
    """This process's peak resident set, in MiB."""
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (max_rss if sys.platform == "darwin" else max_rss * 1024) / 2**20  # Linux: KiB
