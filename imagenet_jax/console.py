"""What a person watching a run sees: one progress line per log interval, one line per
evaluation and checkpoint, and a small table at the end.

The library logs everything through absl (the workdir's log file keeps it all); this is
the short version, printed by process 0 only. On a terminal the progress line is
rewritten in place; piped or redirected, each update is a line of its own.
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Callable
from typing import TextIO


def format_duration(seconds: float) -> str:
    """'42s', '3m05s', '2h07m'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Console:
    """Progress of one run: `start`, then `train`, `evaluation`, `checkpoint`, `finish`.

    The ETA is the remaining steps times the seconds per step since the first update of
    this process (compilation and warm-up excluded, evaluations included: the time a run
    will really take). `clock` is injectable for tests.
    """

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = sys.stdout if stream is None else stream
        self.live = self.stream.isatty() if live is None else live
        self._clock = clock
        self._total_steps, self._steps_per_epoch = 0, 1
        self._since: tuple[int, float] | None = None  # (step, time) of the first update
        self._open_line = False  # a live progress line waits to be overwritten

    @classmethod
    def silent(cls) -> Console:
        """A console that prints nothing: library calls, and processes other than 0."""
        return cls(_Discard(), live=False)

    def start(self, *, first_step: int, total_steps: int, steps_per_epoch: int,
              description: str) -> None:
        self._total_steps, self._steps_per_epoch = total_steps, max(1, steps_per_epoch)
        verb = "Resuming at step" if first_step else "Training from step"
        self._print(f"{verb} {first_step} of {total_steps}: {description}")

    def eta_seconds(self, step: int) -> float | None:
        if self._since is None or step <= self._since[0]:
            return None
        first_step, first_time = self._since
        per_step = (self._clock() - first_time) / (step - first_step)
        return per_step * (self._total_steps - step)

    def train(self, step: int, metrics: dict) -> None:
        """The progress line: epoch, step, images/s, loss, top-1, learning rate, ETA."""
        if self._since is None:
            self._since = (step, self._clock())
        eta = self.eta_seconds(step)
        epoch = step / self._steps_per_epoch
        total_epochs = self._total_steps / self._steps_per_epoch
        parts = [f"epoch {epoch:.1f}/{total_epochs:g}", f"step {step}/{self._total_steps}",
                 f"{metrics.get('images_per_sec', float('nan')):,.0f} img/s",
                 f"loss {metrics['loss']:.4f}", f"top-1 {metrics['top1']:.4f}",
                 f"lr {metrics['learning_rate']:.4g}",
                 f"ETA {format_duration(eta) if eta is not None else '...'}"]
        self._print(" | ".join(parts), progress=True)

    def evaluation(self, step: int, split: str, metrics: dict) -> None:
        name = "EMA weights" if split.endswith("_ema") else "eval"
        self._print(f"{name} at step {step} (epoch {step / self._steps_per_epoch:g}): "
                    f"top-1 {metrics['top1']:.4f}, top-5 {metrics['top5']:.4f}, "
                    f"loss {metrics['loss']:.4f} ({metrics['num_examples']:,} examples)")

    def checkpoint(self, step: int, where: str) -> None:
        self._print(f"checkpoint of step {step} -> {where}")

    def note(self, message: str) -> None:
        self._print(message)

    def finish(self, result: dict, workdir: str, seconds: float,
               goodput: str | None = None) -> None:
        """The final table: each evaluated set of weights, where the run's time went
        (`goodput`, a line of train/goodput.py's Summary) and where the run lives."""
        rows = [("weights", "top-1", "top-5", "loss", "examples"),
                ("final", f"{result['top1']:.4f}", f"{result['top5']:.4f}",
                 f"{result['loss']:.4f}", f"{result['num_examples']:,}")]
        if "ema_top1" in result:
            rows.append(("EMA", f"{result['ema_top1']:.4f}", f"{result['ema_top5']:.4f}",
                         f"{result['ema_loss']:.4f}", f"{result['ema_num_examples']:,}"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                           for i, (cell, width) in enumerate(zip(row, widths, strict=True)))
                 for row in rows]
        self._print(f"Done at step {result['step']} in {format_duration(seconds)}; "
                    f"validation:\n  " + "\n  ".join(lines)
                    + (f"\n{goodput}" if goodput else "") + f"\nWorkdir: {workdir}")

    def _print(self, text: str, progress: bool = False) -> None:
        if progress and self.live:
            # Back to the line's start and clear it: the previous progress line is replaced.
            self.stream.write("\r\033[K" + text)
            self._open_line = True
        else:
            if self._open_line:  # the last progress line stays; this one starts below it
                self.stream.write("\n")
                self._open_line = False
            self.stream.write(text + "\n")
        self.stream.flush()


class _Discard(io.StringIO):
    def write(self, text: str) -> int:
        return len(text)
