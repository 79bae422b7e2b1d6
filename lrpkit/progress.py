"""A one-line progress bar on stderr for lrpkit's long runs (attributors, evaluation).

``show=None`` (the default everywhere) draws the bar only when stderr is a terminal and the run
has already taken longer than ``delay`` seconds, so short runs and logs stay quiet;
``show=True`` always draws it, ``show=False`` never. No dependency.

Examples
--------
>>> import io
>>> stream = io.StringIO()
>>> with Progress("demo", 2, show=True, unit="batches", stream=stream) as bar:
...     bar.step()
...     bar.step()
>>> stream.getvalue().splitlines()[-1].split("\\r")[-1]
'lrpkit demo [########################] 2/2 batches'
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 24


class Progress:
    """``lrpkit LABEL [#####.......] DONE/TOTAL UNIT``, redrawn in place at every step.

    Parameters
    ----------
    label
        What runs (e.g. ``"SmoothGrad"``).
    total
        The number of steps.
    show
        ``True``: always draw; ``False``: never; ``None``: on a terminal, once the run has taken
        longer than ``delay`` seconds.
    unit
        Shown after the count (e.g. ``"batches"``).
    stream
        Where to draw (default: ``sys.stderr``).
    delay
        Seconds before an automatic (``show=None``) bar appears.
    """

    def __init__(
        self,
        label: str,
        total: int,
        show: bool | None = None,
        unit: str = "",
        stream: TextIO | None = None,
        delay: float = 1.0,
    ) -> None:
        self.label, self.total, self.show, self.unit = label, total, show, unit
        self.stream = stream if stream is not None else sys.stderr
        self.delay, self.started = delay, time.monotonic()
        self.done, self.drawn = 0, False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def step(self) -> None:
        """Count one step done and redraw the bar if it is shown."""
        self.done += 1
        if not self.drawn and not self._wanted():
            return
        filled = WIDTH * self.done // max(self.total, 1)
        unit = f" {self.unit}" if self.unit else ""
        self.stream.write(f"\rlrpkit {self.label} [{'#' * filled}{'.' * (WIDTH - filled)}] {self.done}/{self.total}{unit}")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        """End the bar's line (if one was drawn)."""
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False

    def _wanted(self) -> bool:
        if self.show is not None:
            return self.show
        return _is_terminal(self.stream) and time.monotonic() - self.started > self.delay


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except (ValueError, OSError):
        return False


__all__ = ["Progress"]
