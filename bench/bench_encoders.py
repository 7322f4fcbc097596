"""Frozen encoders for big pools (issue 16, item 3): MiniLM against `minilm-static`, on MR and at 1M texts.

1. Accuracy: head-mode SLM test accuracy on MR with each encoder, plain CE on the gold labels and on GPT-3.5's
   (mr_data.train_and_score, the same seeds, SLMConfig's defaults otherwise; gold is read only to score).
2. Speed: texts/s of each encoder on the same synthetic texts, in this process at 1 and 2 torch threads, and
   through the product's ScorerPool on a local Ray with 1 scorer (which then takes both cores) and with
   2 scorers (one core each); the conditions are interleaved and the median of --reps is kept, so the ratios
   hold on a shared machine even when the absolute rates drift.
3. 1M texts: MiniLM's time projected from its best rate above; the static encoder's measured, in this
   process on 1 thread and through 2 scorers. Also timed: the static encoder's one-time distillation (into a
   fresh folder), and whether it gives the cached model byte for byte.

Synthetic texts: each joins the first half (by words) of one MR sentence (train + test) to the second half of
another, the pair drawn by a seeded RNG (numpy default_rng(0)); a text already drawn is drawn again, so all are
distinct. They are as long as MR's sentences (~21 words).

    python -m bench.bench_encoders --data-dir ../shared/data
    python -m bench.bench_encoders --skip-accuracy --million 0     # speed only

-> bench/results/encoders.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.mr_data import RESULTS, add_mr_args, load_mr, mean_std, mr_present, train_and_score, write_merged

ENCODERS = ("all-MiniLM-L6-v2", "minilm-static")
MILLION = 1_000_000


def synthetic_texts(sentences: list[str], n: int, seed: int = 0) -> list[str]:
    """n distinct texts, each the first half of one sentence and the second half of another (seeded)."""
    rng = np.random.default_rng(seed)
    words = [s.split() for s in sentences]
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        for a, b in rng.integers(len(words), size=(min(n, 200_000), 2)):
            wa, wb = words[a], words[b]
            text = " ".join(wa[: len(wa) // 2] + wb[len(wb) // 2 :])
            if text not in seen:
                seen.add(text)
                out.append(text)
                if len(out) == n:
                    break
    return out


def accuracy(args: argparse.Namespace, train, test) -> dict:
    from freeal_stream.config import FreeALConfig, SLMConfig
    from freeal_stream.slm.trainer import Recipe

    out: dict = {}
    for column in ("label", "gpt35_label"):
        for enc in ENCODERS:
            cfg = SLMConfig(mode="head", encoder=enc)
            runs = [
                train_and_score(
                    train,
                    test,
                    column,
                    Recipe.plain_ce(),
                    False,
                    cfg,
                    FreeALConfig(),
                    seed,
                    args.cache_dir,
                    f"{enc} {column}",
                )[0]
                for seed in args.seeds
            ]
            m, s = mean_std([r["test_acc"] for r in runs])
            out[f"{enc} | {column}"] = {
                "test_acc_mean": m,
                "test_acc_std": s,
                "test_acc": [r["test_acc"] for r in runs],
                "seeds": args.seeds,
            }
            print(f"{enc:>18} CE on {column:<11}: test {100 * m:.2f} ± {100 * s:.2f}", flush=True)
    return out


def timed(fn: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def speed(args: argparse.Namespace, texts: list[str]) -> dict:
    """texts/s per (encoder, where): in-process at 1 and 2 threads, 1 and 2 scorer actors; interleaved."""
    import ray
    import torch

    from freeal_stream.actors.runtime import start_ray
    from freeal_stream.actors.scorers import ScorerPool
    from freeal_stream.config import RayConfig
    from freeal_stream.slm.encoder import load_encoder
    from freeal_stream.slm.static_encoder import static_model_dir

    with tempfile.TemporaryDirectory() as tmp:  # the one-time distillation, timed; and is it deterministic?
        t0 = time.perf_counter()
        fresh = static_model_dir(Path(tmp))
        distill_s = time.perf_counter() - t0
        same = (fresh / "model.safetensors").read_bytes() == (static_model_dir() / "model.safetensors").read_bytes()
    print(f"distilled {ENCODERS[1]} in {distill_s:.0f} s; identical to the cached one: {same}", flush=True)
    n = {ENCODERS[0]: args.n_minilm, ENCODERS[1]: args.n_static}
    encoders = {e: load_encoder(e, 64) for e in ENCODERS}
    # 3 logical CPUs so both pools fit at once; they take turns, and each sizes its threads to the 2 real cores
    start_ray(RayConfig(local_cpus=3), address="local")
    pools = {size: ScorerPool(64, 1, size=size) for size in (1, 2)}
    rates: dict[str, list[float]] = {}
    try:
        for rep in range(args.reps):
            for enc in ENCODERS:
                sample = texts[: n[enc]]
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    encoders[enc].embed(sample[:256])  # warm
                    rates.setdefault(f"{enc} | in-process {threads} thread(s)", []).append(
                        timed(lambda enc=enc, sample=sample: encoders[enc].embed(sample), len(sample))
                    )
                for size, pool in pools.items():
                    threads = pool.work_threads()
                    ray.get([a.embed.remote(enc, sample[:256], t) for a, t in zip(pool.actors, threads)])  # load
                    rates.setdefault(f"{enc} | {size} scorer(s) x {threads[0]} thread(s)", []).append(
                        timed(lambda pool=pool, enc=enc, sample=sample: pool.embed(enc, sample), len(sample))
                    )
            print(
                f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in rates.items()), flush=True
            )
        million = {}
        if args.million:
            big = synthetic_texts(args.sentences, args.million)
            torch.set_num_threads(1)
            t0 = time.perf_counter()
            encoders[ENCODERS[1]].embed(big)
            million["in-process 1 thread"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            pools[2].embed(ENCODERS[1], big)
            million["2 scorers x 1 thread"] = time.perf_counter() - t0
            print(
                f"{ENCODERS[1]} on {args.million:,} texts: " + ", ".join(f"{k} {v:.0f} s" for k, v in million.items()),
                flush=True,
            )
    finally:
        ray.shutdown()
    med = {k: statistics.median(v) for k, v in rates.items()}
    best_minilm = max(v for k, v in med.items() if k.startswith(ENCODERS[0]))
    return {
        "distill_s": distill_s,
        "distill_identical_to_cached": same,
        "texts_per_s_median": med,
        "texts_per_s_runs": rates,
        "n_texts": n,
        "minilm_1m_projected_s": MILLION / best_minilm,
        "static_measured_s": million,
        "static_measured_n": args.million,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_mr_args(ap, RESULTS / "encoders.json")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-minilm", type=int, default=4096, help="texts per MiniLM speed run")
    ap.add_argument("--n-static", type=int, default=50_000, help="texts per static-encoder speed run")
    ap.add_argument("--million", type=int, default=MILLION, help="texts for the static encoder's full run (0: skip)")
    ap.add_argument("--skip-accuracy", action="store_true")
    args = ap.parse_args()
    if not mr_present(args.data_dir):
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as in the scorer actors
    train, test = load_mr(args.data_dir, None)
    args.sentences = train["text"].tolist() + test["text"].tolist()
    entry = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_avg_at_start": os.getloadavg(),
    }
    if not args.skip_accuracy:
        entry["accuracy"] = accuracy(args, train, test)
    entry["speed"] = speed(args, synthetic_texts(args.sentences, max(args.n_minilm, args.n_static)))
    entry["load_avg_at_end"] = os.getloadavg()
    write_merged(args.out, "encoders", entry)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
