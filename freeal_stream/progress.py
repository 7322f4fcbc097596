"""Progress lines for long work: counts, rate and ETA, throttled so logs stay readable."""
from __future__ import annotations

import sys
import time
from typing import TextIO


def fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Prints `[stage] done/total rate ETA extra`; rewrites one line on a terminal, else prints every few s."""

    def __init__(self, stream: TextIO | None = None, interval_s: float = 5.0):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval_s = 0.5 if self.tty else interval_s
        self._stage = ""
        self._start = 0.0
        self._last = 0.0

    def say(self, msg: str) -> None:
        if self.tty and self._stage:
            self.stream.write("\n")
            self._stage = ""
        self.stream.write(msg + "\n")
        self.stream.flush()

    def update(self, stage: str, done: int, total: int, extra: str = "") -> None:
        now = time.monotonic()
        if stage != self._stage:
            if self.tty and self._stage:
                self.stream.write("\n")
            self._stage, self._start, self._last = stage, now, 0.0
        final = done >= total
        if not final and now - self._last < self.interval_s:
            return
        self._last = now
        elapsed = now - self._start
        rate = done / elapsed if elapsed > 0.5 else 0.0   # no rate from a stage's first instant
        eta = fmt_duration((total - done) / rate) if rate > 0 and not final else "-"
        speed = f"{rate:.2f}/s" if rate > 0 else "-/s"
        line = f"[{stage}] {done}/{total} {speed} ETA {eta} {extra}".rstrip()
        self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        if final and self.tty:
            self.stream.write("\n")
            self._stage = ""
        self.stream.flush()
