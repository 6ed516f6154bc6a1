"""Progress that never goes silent: a tqdm bar on a terminal, a log line every ~30 s everywhere else.

With ``disable=None`` tqdm draws nothing when stderr is a file, so a long phase with its output in a
log file printed nothing for minutes and looked hung (with ``disable=False`` it fills the file with
carriage returns instead). A :class:`Progress` draws the bar on a terminal and otherwise logs
``desc: n/total (pct), elapsed, ETA`` through ``logging`` at most every ``HARNESS_PROGRESS_SECONDS``
(default 30) seconds, plus once at the end. ``disable=True`` (a library caller's ``progress=False``,
or a rank other than the main one) is silent.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator

log = logging.getLogger("harness.progress")

DEFAULT_SECONDS = 30.0


def interval() -> float:
    try:
        return max(0.0, float(os.environ.get("HARNESS_PROGRESS_SECONDS", DEFAULT_SECONDS)))
    except ValueError:
        return DEFAULT_SECONDS


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """``tqdm``-like: ``update(n)``, ``set_postfix_str``, ``close``, iteration, context manager."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 disable: bool | None = None, initial: int = 0, unit: str = "it", leave: bool = False,
                 every: float | None = None, clock: Callable[[], float] = time.monotonic, logger=None):
        from tqdm.auto import tqdm

        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.start_n, self.postfix = initial, initial, ""
        self.clock, self.every, self.log = clock, interval() if every is None else every, logger or log
        self.t0 = self.last = clock()
        self.silent = disable is True
        shown = not self.silent and sys.stderr is not None and sys.stderr.isatty()
        self.bar = tqdm(total=self.total, desc=desc, initial=initial, unit=unit, leave=leave) if shown else None
        self.closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s
        if self.bar is not None:
            self.bar.set_postfix_str(s, refresh=refresh)

    def set_postfix(self, **values) -> None:
        self.set_postfix_str(", ".join(f"{k}={v}" for k, v in values.items()))

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        if self.silent:
            return
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self.log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        elapsed = now - self.t0
        done = self.n - self.start_n
        text = f"{self.desc}: {self.n}/{self.total if self.total is not None else '?'} {self.unit}"
        if self.total:
            text += f" ({100 * self.n / self.total:.0f}%)"
        text += f", {_clock(elapsed)} elapsed"
        if self.total and done > 0 and self.n < self.total:
            text += f", ETA {_clock(elapsed / done * (self.total - self.n))}"
        return text + (f" [{self.postfix}]" if self.postfix else "")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif not self.silent and self.clock() - self.t0 >= self.every:  # a phase long enough to have been reported ends with a line
            self.log.info("%s (done)", self.line())
