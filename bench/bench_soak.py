"""Soak: `serve` ingesting continuously for N seconds while rounds run against a fault-injecting endpoint
(the harness in tests/soak.py, which tests/test_soak.py runs for 2 minutes). Writes bench/results/soak.json.

    PYTHONPATH=. .venv/bin/python bench/bench_soak.py --seconds 600
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from tests.soak import run_soak

ROOT = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--fault-rate", type=float, default=0.3)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "soak.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="freeal-soak-") as tmp:
        report = run_soak(Path(tmp), args.seconds, args.seed, args.fault_rate)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    report["machine"] = f"{platform.node()} {platform.machine()}, 2 cores shared"
    report["date"] = time.strftime("%Y-%m-%d")
    report.pop("log_tail")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
