"""The HTML report: self-contained, every plot there, and every plot drawn when a real browser opens it.

The browser check opens the file in headless Chromium (Debian package `chromium`; scripts/install.sh installs it
where apt and root are there), reads where each plot lies on the page, takes a screenshot and measures the ink
inside each plot's box: a blank page, a plot that does not render, or a missing plot fails it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from freeal_stream.report import PLOTS, write_report
from tests.unit.test_review import CLASSES, filled_store
from tests.unit.test_status import job

WIDTH = 1200
MIN_INK = 0.01  # share of a plot's pixels that are not white: frame and ticks alone are ~1%, drawn plots 5-30%
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
]
_LAYOUT = """<script>document.title = JSON.stringify({height: document.documentElement.scrollHeight,
  plots: Array.from(document.querySelectorAll('figure.plot')).map(f => {
    const s = f.querySelector('svg'); const r = (s || f).getBoundingClientRect();
    return {id: f.id, x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height}; })});</script>"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(
        "headless Chromium is not installed, so the report is not checked in a browser. Fix: "
        "`apt-get install chromium` (scripts/install.sh does it on Debian/Ubuntu when run as root)"
    )


def _browser(*args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="freeal-chromium-") as profile:
        return subprocess.run(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )


def plot_ink(page: Path, tmp_path: Path) -> tuple[dict[str, float], float]:
    """({plot id: share of its pixels with ink}, share of the whole page with ink) as Chromium draws `page`."""
    from PIL import Image

    page = page.resolve()
    probe = tmp_path / f"{page.stem}.layout.html"  # the same page plus a script that reports the layout
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _LAYOUT + "</body>"), encoding="utf-8")
    dom = _browser("--dump-dom", f"--window-size={WIDTH},1000", probe.as_uri()).stdout
    layout = json.loads(re.search(r"<title>(.*?)</title>", dom, re.S).group(1).replace("&amp;", "&"))
    shot = tmp_path / f"{page.stem}.png"
    _browser(f"--screenshot={shot}", f"--window-size={WIDTH},{int(layout['height'])}", page.as_uri())
    image = Image.open(shot).convert("L")

    def ink(box: tuple[int, int, int, int]) -> float:
        region = image.crop(box)
        hist = region.histogram()
        return 1 - sum(hist[245:]) / max(1, region.width * region.height)

    plots = {
        p["id"].removeprefix("plot-"): ink((int(p["x"]), int(p["y"]), int(p["x"] + p["w"]), int(p["y"] + p["h"])))
        for p in layout["plots"]
    }
    return plots, ink((0, 0, image.width, image.height))


@pytest.fixture
def report(tmp_path) -> Path:
    s = filled_store(tmp_path)
    s.set_phase(
        1,
        "budgeted",
        "done",
        metrics={
            "round": 1,
            "slm_mode": "head",
            "llm_labelled": 18,
            "llm_no_label": 2,
            "llm_failed": 0,
            "requests_round": 20,
            "requests_total": 20,
            "prompt_tokens_round": 1000,
            "completion_tokens_round": 20,
            "cached_tokens_round": 600,
            "prompt_tokens_total": 1000,
            "clean_set": 12,
            "cost_total": 0.0,
            "slm_acc": 0.8,
            "llm_label_acc": 0.7,
        },
    )
    s.add_problems("x.csv", [("line 3", 3, "quarantined", "empty text", "line 3: field 'text' is empty", None, "a,,")])
    out = tmp_path / "report.html"
    write_report(s, job(), CLASSES, out)
    s.close()
    return out


def test_the_report_is_one_file_with_every_plot_inlined(report):
    page = report.read_text(encoding="utf-8")
    assert [m for m in re.findall(r'id="plot-(\w+)"', page)] == list(PLOTS)
    assert page.count("<svg") >= len(PLOTS)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing loaded from the network
    assert "<script" not in page
    assert "not estimated" in page and "line 3: field &#x27;text&#x27; is empty" in page
    assert "i0" in page  # a disputed example is listed


def test_the_report_opens_in_a_browser_with_every_plot_drawn(report, tmp_path):
    plots, page_ink = plot_ink(report, tmp_path)
    assert page_ink > 0.03, "the page is blank"
    assert set(plots) == set(PLOTS), f"plots on the page: {sorted(plots)}"
    for name, share in plots.items():
        assert share > MIN_INK, f"plot {name!r} has no ink ({share:.4f}): it did not render"


def test_the_browser_check_fails_on_a_blank_plot_and_a_blank_page(report, tmp_path):
    page = report.read_text(encoding="utf-8")
    start = page.index("<svg", page.index('id="plot-sources"'))
    end = page.index("</svg>", start) + len("</svg>")
    blanked = tmp_path / "blanked.html"
    blanked.write_text(page[:start] + '<svg width="720pt" height="200pt"></svg>' + page[end:], encoding="utf-8")
    plots, _ = plot_ink(blanked, tmp_path)
    assert plots["sources"] < MIN_INK and all(plots[p] > MIN_INK for p in PLOTS if p != "sources")
    empty = tmp_path / "empty.html"
    empty.write_text("<!DOCTYPE html><html><body></body></html>", encoding="utf-8")
    plots, page_ink = plot_ink(empty, tmp_path)
    assert plots == {} and page_ink < 0.03


def test_an_estimated_accuracy_is_read_in_each_shape_and_shown():
    from freeal_stream.report import estimate

    assert estimate({}) is None
    assert estimate({"estimated_accuracy": 0.9}) == (0.9, None, None)
    assert estimate({"estimated_accuracy": 0.9, "estimated_accuracy_low": 0.85, "estimated_accuracy_high": 0.94}) == (
        0.9,
        0.85,
        0.94,
    )
    assert estimate({"estimated_accuracy": 0.9, "estimated_accuracy_interval": [0.8, 0.95]}) == (0.9, 0.8, 0.95)
    assert estimate({"estimated_accuracy": {"value": 0.9, "low": 0.8, "high": 0.95}}) == (0.9, 0.8, 0.95)
    assert estimate({"estimated_accuracy": {"estimate": 0.7, "interval": [0.6, 0.8]}}) == (0.7, 0.6, 0.8)
    assert estimate({"estimated_accuracy": None}) is None


def test_the_report_shows_a_stored_estimate(tmp_path):
    s = filled_store(tmp_path)
    s.set_phase(
        1,
        "budgeted",
        "done",
        metrics={
            "round": 1,
            "requests_total": 10,
            "estimated_accuracy": 0.875,
            "estimated_accuracy_interval": [0.81, 0.92],
        },
    )
    write_report(s, job(), CLASSES, tmp_path / "r.html")
    s.close()
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "87.5% [81.0%, 92.0%]" in page and "not estimated" not in page
