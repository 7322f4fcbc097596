"""Progress for long work: a live bar on a terminal (tqdm), plain throttled lines otherwise (logs, pipes),
each with counts, rate and ETA.

Callers say `update(stage, done, total)` as work completes and `say(line)` for anything else. A stage that
goes quiet (one big shard, a long epoch) is not silent: a heartbeat repeats its line with the time elapsed
every `heartbeat_s` (plain) or redraws the bar's clock every second (terminal).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO


def fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """`[stage] done/total rate ETA extra`: a tqdm bar on a terminal, else a line every `interval_s` seconds."""

    def __init__(self, stream: TextIO | None = None, interval_s: float = 5.0, heartbeat_s: float = 30.0):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval_s = 0.5 if self.tty else interval_s
        self.heartbeat_s = heartbeat_s
        self._lock = threading.RLock()
        self._stage = ""
        self._done = self._total = 0
        self._extra = ""
        self._start = self._last = 0.0
        self._bar: Any = None
        self._beating = False

    def say(self, msg: str) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.write(msg, file=self.stream)  # above the bar, which stays
            else:
                self.stream.write(msg + "\n")
                self.stream.flush()

    def update(self, stage: str, done: int, total: int, extra: str = "") -> None:
        with self._lock:
            now = time.monotonic()
            if stage != self._stage:
                self._close()
                self._stage, self._start, self._last = stage, now, 0.0
                self._start_heartbeat()
            self._done, self._total, self._extra = done, total, extra
            final = done >= total
            if self.tty:
                self._draw_bar(final)
            elif final or now - self._last >= self.interval_s:
                self._print_line(now)
            if final:
                self._close()

    # ---- terminal ---------------------------------------------------------------------------------
    def _draw_bar(self, final: bool) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self._total,
                desc=f"[{self._stage}]",
                file=self.stream,
                dynamic_ncols=True,
                mininterval=self.interval_s,
                leave=True,
                smoothing=0.1,
            )
        bar = self._bar
        bar.total = self._total
        if self._extra:
            bar.set_postfix_str(self._extra, refresh=False)
        bar.update(self._done - bar.n)
        if final:
            bar.refresh()

    # ---- plain lines ------------------------------------------------------------------------------
    def _print_line(self, now: float, heartbeat: bool = False) -> None:
        self._last = now
        elapsed = now - self._start
        rate = self._done / elapsed if elapsed > 0.5 else 0.0  # no rate from a stage's first instant
        final = self._done >= self._total
        eta = fmt_duration((self._total - self._done) / rate) if rate > 0 and not final else "-"
        speed = f"{rate:.2f}/s" if rate > 0 else "-/s"
        line = f"[{self._stage}] {self._done}/{self._total} {speed} ETA {eta} {self._extra}".rstrip()
        if heartbeat:
            line += f" (still working, {fmt_duration(elapsed)} in this stage)"
        self.stream.write(line + "\n")
        self.stream.flush()

    # ---- both -------------------------------------------------------------------------------------
    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._stage = ""

    def _start_heartbeat(self) -> None:
        if not self._beating:
            self._beating = True
            threading.Thread(target=self._heartbeat, name="progress-heartbeat", daemon=True).start()

    def _heartbeat(self) -> None:
        tick = 1.0 if self.tty else min(5.0, self.heartbeat_s)
        while True:
            time.sleep(tick)
            with self._lock:
                if not self._stage:
                    continue
                now = time.monotonic()
                if self._bar is not None:
                    self._bar.refresh()  # the elapsed clock moves even when no work has completed
                elif not self.tty and now - self._last >= self.heartbeat_s:
                    self._print_line(now, heartbeat=True)
