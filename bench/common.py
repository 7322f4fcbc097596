"""What every benchmark shares: where the repository and the data are, and how a result is recorded."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def data_dir(given: str | Path | None = None) -> Path:
    """The shared data folder (`given`, else $FREEAL_DATA_DIR, else ../shared/data beside the checkout); exits
    with a clear message when it is absent, as a benchmark cannot run without it."""
    path = Path(given or os.environ.get("FREEAL_DATA_DIR") or REPO.parent / "shared" / "data")
    if not (path / "mr" / "train.csv").exists():
        raise SystemExit(
            f"benchmark data not found at {path} (expected mr/train.csv). Fix: pass --data-dir or set "
            "FREEAL_DATA_DIR to the folder holding mr/ and subj/"
        )
    return path


def result_meta(args: dict[str, Any] | None = None) -> dict[str, Any]:
    """When, where and how a result was made: the date, the machine, the command line and the commit."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "commit": commit,
        "args": {k: str(v) for k, v in (args or {}).items()},
    }


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write a result as JSON (through a temporary file, so a killed run leaves the last complete one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
