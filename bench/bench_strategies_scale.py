"""Selection at scale: pick 1% of a synthetic pool of 100k and 1M items, with shards streamed from a generator.

Each shard (ids, Dirichlet class probabilities, 384-d float32 embeddings drawn around 20 centres) is made from
(seed, shard index) when read and dropped after, so the pool is never materialised. Each (strategy, pool size,
classes) runs in a fresh process, so its peak RSS (getrusage maxrss, minus the peak after imports and a warm-up
selection) is its own; the time to only generate the shards is measured after and reported apart.

    .venv/bin/python -m bench.bench_strategies_scale [--pools 100000,1000000] [--classes 2,4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from bench.common import RESULTS
from strategies.base import QueryContext, Shard
from strategies.registry import load_strategy
from strategies.select import select

DIM = 384
CENTRES = 20


def synthetic_shards(
    rows: int, shard_rows: int, n_classes: int, seed: int, needs: frozenset[str]
) -> Callable[[], Iterator[Shard]]:
    """A re-openable stream of synthetic shards; shard k depends only on (seed, k). Like a real loader, it
    makes only the columns in `needs`."""
    centres = np.random.default_rng(seed).normal(scale=0.5, size=(CENTRES, DIM)).astype(np.float32)

    def shards() -> Iterator[Shard]:
        for k, start in enumerate(range(0, rows, shard_rows)):
            rng = np.random.default_rng([seed, k])
            size = min(shard_rows, rows - start)
            probs = rng.dirichlet(np.full(n_classes, 0.5), size).astype(np.float32)
            emb = None
            if "embeddings" in needs:
                emb = rng.standard_normal((size, DIM), dtype=np.float32)
                emb += centres[rng.integers(0, CENTRES, size)]
            yield Shard(np.char.mod("doc-%09d", np.arange(start, start + size)), probs=probs, embeddings=emb)

    return shards


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_one(strategy: str, rows: int, n_classes: int, shard_rows: int, seed: int) -> dict:
    """One measurement, in this process (the parent starts a fresh one per configuration)."""
    s = load_strategy(strategy)
    ctx = QueryContext(round=2, seed=seed, n_classes=n_classes)
    # warm-up: lazy imports, BLAS, k-means
    select(s, synthetic_shards(1000, 500, n_classes, seed + 1, s.needs), 10, ctx)
    base = _maxrss_mb()
    n = rows // 100
    t0 = time.perf_counter()
    source = synthetic_shards(rows, shard_rows, n_classes, seed, s.needs)
    picked = select(s, source, n, ctx)
    select_s = time.perf_counter() - t0
    peak = _maxrss_mb()
    t0 = time.perf_counter()
    passes = 2 if strategy == "hybrid" else 1  # hybrid reads the pool twice (k-means fit, then candidates)
    for _ in range(passes):
        for _shard in source():
            pass
    gen_s = time.perf_counter() - t0
    assert len(picked) == n == len(set(picked.tolist()))
    # ids are 13-character str (4 bytes a character), probs and embeddings float32
    return {
        "strategy": strategy,
        "pool": rows,
        "n": n,
        "classes": n_classes,
        "shard_rows": shard_rows,
        "select_s": select_s,
        "generate_only_s": gen_s,
        "strategy_s": select_s - gen_s,
        "peak_rss_delta_mb": peak - base,
        "rss_after_warmup_mb": base,
        "pool_if_materialised_mb": rows * (13 + DIM * ("embeddings" in s.needs) + n_classes) * 4 / 2**20,
        "passes": passes,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pools", default="100000,1000000")
    ap.add_argument("--strategies", default="uncertainty,hybrid")
    ap.add_argument("--classes", default="2,4")
    ap.add_argument("--shard-rows", type=int, default=25_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "strategies_scale.json")
    ap.add_argument("--one", nargs=3, metavar=("STRATEGY", "ROWS", "CLASSES"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), int(args.one[2]), args.shard_rows, args.seed)))
        return 0

    runs = []
    for strategy in args.strategies.split(","):
        for classes in args.classes.split(","):
            for rows in args.pools.split(","):
                cmd = [
                    sys.executable,
                    __file__,
                    "--one",
                    strategy,
                    rows,
                    classes,
                    "--shard-rows",
                    str(args.shard_rows),
                    "--seed",
                    str(args.seed),
                ]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
                print(f"  {runs[-1]}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "machine": platform.platform(),
                "cpus": os.cpu_count(),
                "dim": DIM,
                "runs": runs,
            },
            indent=1,
        )
        + "\n"
    )
    print(
        "\n| strategy | classes | pool | n (1%) | select s | of which generating shards s | peak RSS delta MB "
        "| pool if materialised MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(
            f"| {r['strategy']} | {r['classes']} | {r['pool']:,} | {r['n']:,} | {r['select_s']:.1f} | "
            f"{r['generate_only_s']:.1f} | {r['peak_rss_delta_mb']:.0f} | {r['pool_if_materialised_mb']:,.0f} |"
        )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
