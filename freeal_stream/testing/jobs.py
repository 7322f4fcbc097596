"""Jobs for tests and benchmarks: small copies of the demo job, and the CLI run as a separate process (needs a
source checkout: the demo job and its data are read from it)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]  # the source checkout (the demo job and its data)
DEMO = ROOT / "jobs"


def make_job(tmp_path: Path, n_per_class: int, **overrides) -> Path:
    """A copy of the demo job on a small stratified subset of its data, with its state under tmp_path."""
    with open(DEMO / "data" / "support_tickets.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    picked: list[dict[str, str]] = []
    seen: dict[str, int] = {}
    for r in rows:
        if seen.get(r["label"], 0) < n_per_class:
            seen[r["label"]] = seen.get(r["label"], 0) + 1
            picked.append(r)
    data = tmp_path / "items.csv"
    with open(data, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "text", "label"])
        w.writeheader()
        w.writerows(picked)
    job = yaml.safe_load((DEMO / "demo.yaml").read_text())
    job["data"]["path"] = str(data)
    job["state_dir"] = str(tmp_path / "state")
    for section, values in overrides.items():
        job[section] = {**job.get(section, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))  # class order is part of the prompt
    return path


def cli_process(*args: str, log: Path) -> subprocess.Popen:
    """`freeal-stream ARGS` in its own process (so a test can SIGKILL it), output to `log`."""
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        RAY_AUTH_MODE="disabled",
        OMP_WAIT_POLICY="PASSIVE",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "freeal_stream.cli", *args], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )


def wait_for(cond: Callable[[], Any], timeout_s: float, what: str, log: Path) -> Any:
    """Poll `cond` until it returns something truthy (returned); on timeout fail with the end of `log`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; service log:\n{log.read_text()[-3000:]}")
