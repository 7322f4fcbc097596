"""Soak: `serve` ingesting continuously for N seconds while rounds run against a fault-injecting endpoint
(the harness in freeal_stream/testing/soak.py, which tests/integration/test_soak.py runs for 2 minutes).
Writes bench/results/soak.json.

    .venv/bin/python -m bench.bench_soak --seconds 600
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS
from freeal_stream.testing.soak import run_soak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--fault-rate", type=float, default=0.3)
    ap.add_argument("--out", type=Path, default=RESULTS / "soak.json")
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
