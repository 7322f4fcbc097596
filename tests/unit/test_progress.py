"""Progress: plain lines with rate and ETA (and a heartbeat while a stage is quiet); a live bar on a terminal."""

from __future__ import annotations

import io
import time

from freeal_stream.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_carry_rate_and_eta_and_a_quiet_stage_still_speaks():
    out = io.StringIO()
    p = Progress(stream=out, interval_s=0.0, heartbeat_s=1.0)
    p.update("embed texts", 0, 100)
    time.sleep(2.6)  # one shard still running: nothing completes, the heartbeat says so
    p.update("embed texts", 50, 100)
    p.update("embed texts", 100, 100)
    p.say("next")
    lines = out.getvalue().splitlines()
    assert lines[0] == "[embed texts] 0/100 -/s ETA -"
    assert any(line.startswith("[embed texts] 0/100") and "still working" in line for line in lines[1:3])
    half = next(line for line in lines if line.startswith("[embed texts] 50/100"))
    assert "/s ETA " in half and "ETA -" not in half  # a rate and an ETA once work completes
    assert lines[-2].startswith("[embed texts] 100/100") and lines[-1] == "next"
    time.sleep(1.5)
    assert out.getvalue().splitlines()[-1] == "next"  # a finished stage sends no heartbeat


def test_a_terminal_gets_a_bar_and_lines_print_above_it():
    out = Terminal()
    p = Progress(stream=out)
    p.update("round 1 score", 0, 8)
    p.say("a line while the bar runs")
    for k in range(1, 9):
        p.update("round 1 score", k, 8, "shards")
    text = out.getvalue()
    assert "[round 1 score]" in text and "8/8" in text and "100%" in text and "shards" in text
    assert "a line while the bar runs\n" in text
