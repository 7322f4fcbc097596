"""A million texts through the real CLI on this machine: wall time per phase, peak memory per process, the
DuckDB file, labels/s; the same at smaller sizes to show memory flat; optionally an older commit beside.

The pool is made deterministically from MR's sentences (`bench.synthetic`: halves of two same-polarity
sentences joined, seeded; the label is their polarity). An instant OpenAI-compatible server on 127.0.0.1
(`freeal_stream.testing.instant_llm`, its own process, not counted) answers like an LLM that is right 90% of
the time. The job: budgeted, P = 1% x 3 rounds, head mode, the frozen encoder `slm.encoder` picks.

    .venv/bin/python -m bench.bench_million [--sizes 100000,1000000] [--fraction 0.01] [--rounds 3]
        [--old-tree /tmp/old --old-size 60000 --old-fraction 0.1] [--out bench/results/million.json]

Peak RSS is sampled every 0.25 s over the CLI process and every process under it (Ray's GCS, raylet and
workers: the store, annotator, scorer and trainer actors), grouped by role.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import yaml

from bench.common import REPO, data_dir, result_meta, write_result
from bench.synthetic import write_pool

TASK = "Classify the sentiment of the movie review sentence: negative or positive."
ROLES = ("StoreActor", "Annotator", "Scorer", "Trainer", "gcs_server", "raylet")


def role(proc: psutil.Process, driver: int) -> str:
    """What a process of the job is: the driver (the CLI), an actor by class, or a Ray daemon."""
    if proc.pid == driver:
        return "driver"
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "gone"
    for name in ROLES:
        if name in cmd:
            return name
    return "ray (other)" if "ray" in cmd else "other"


class RssSampler(threading.Thread):
    """Peak RSS per role (and of the sum over all processes at one instant) of a process tree, and CPU seconds
    per role (each process's last sample). `procs` and `name` widen it beyond the tree of `pid` (a cluster's
    processes, which the CLI did not start) and its roles (e.g. by node); by default: the tree and `role`."""

    def __init__(
        self,
        pid: int,
        every_s: float = 0.25,
        procs: Callable[[], list[psutil.Process]] | None = None,
        name: Callable[[psutil.Process], str] | None = None,
    ):
        super().__init__(daemon=True)
        self.pid, self.every_s, self.list_procs, self.role_of = pid, every_s, procs, name
        self.peak: dict[str, int] = {}
        self.peak_total = 0
        self._cpu: dict[int, tuple[str, float]] = {}  # pid -> (role, CPU seconds at its last sample)
        self.stop = threading.Event()

    @property
    def cpu_s(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for r, seconds in self._cpu.values():
            out[r] = out.get(r, 0.0) + seconds
        return out

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.stop.is_set():
            try:
                procs = self.list_procs() if self.list_procs is not None else [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for p in procs:
                try:
                    rss, cpu = p.memory_info().rss, p.cpu_times()
                    r = self.role_of(p) if self.role_of is not None else role(p, self.pid)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                if r.startswith("gone") and p.pid in self._cpu:  # exiting: keep what it was
                    r = self._cpu[p.pid][0]
                self.peak[r] = max(self.peak.get(r, 0), rss)
                self._cpu[p.pid] = (r, cpu.user + cpu.system)
                total += rss
            self.peak_total = max(self.peak_total, total)
            self.stop.wait(self.every_s)


def run_cli(
    args: list[str],
    cwd: Path,
    env: dict[str, str],
    log: Path,
    procs: Callable[[int], Callable[[], list[psutil.Process]]] | None = None,
    name: Callable[[int], Callable[[psutil.Process], str]] | None = None,
) -> dict:
    """Run `freeal-stream ARGS` from `cwd`'s checkout; wall time, timestamped output lines, peak RSS and CPU
    seconds by role. `procs(pid)` / `name(pid)`, given the CLI's pid, make the sampler's (see RssSampler)."""
    t0 = time.monotonic()
    lines: list[tuple[float, str]] = []
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "freeal_stream.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
            env={**env, "PYTHONPATH": str(cwd)},
        )
        sampler = RssSampler(proc.pid, procs=procs(proc.pid) if procs else None, name=name(proc.pid) if name else None)
        sampler.start()
        for line in proc.stdout:  # progress lines end in \r on a terminal; here they are plain lines
            lines.append((round(time.monotonic() - t0, 2), line.rstrip()))
            out.write(f"{lines[-1][0]:9.2f} {line}")
        proc.wait()
        sampler.stop.set()
        sampler.join()
    if proc.returncode:
        raise SystemExit(f"freeal-stream {' '.join(args)} failed; see {log}")
    return {
        "wall_s": round(time.monotonic() - t0, 1),
        "lines": lines,
        "peak_rss_mb": {k: round(v / 2**20) for k, v in sorted(sampler.peak.items())},
        "peak_rss_total_mb": round(sampler.peak_total / 2**20),
        "cpu_s": {k: round(v, 1) for k, v in sorted(sampler.cpu_s.items())},
    }


def first_at(lines: list[tuple[float, str]], pattern: str) -> float | None:
    rx = re.compile(pattern)
    return next((t for t, line in lines if rx.search(line)), None)


def start_server(pool_csv: Path, accuracy: float) -> tuple[subprocess.Popen, str]:
    table = pool_csv.with_suffix(".answers.jsonl")
    if not table.exists():
        with open(pool_csv, encoding="utf-8") as f, open(table, "w", encoding="utf-8") as out:
            for row in csv.DictReader(f):
                out.write(json.dumps({"text": row["text"], "label": row["label"]}) + "\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "freeal_stream.testing.instant_llm", "--table", str(table), "--accuracy", str(accuracy)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    return proc, proc.stdout.readline().split("listening on ", 1)[1].strip()


def job_file(
    work: Path, pool_csv: Path, base_url: str, args: argparse.Namespace, fraction: float, encoder: str | None
) -> Path:
    job = {
        "name": "million",
        "data": {"path": str(pool_csv), "text_column": "text", "id_column": "id", "gold_column": "label"},
        "task": {"description": TASK, "classes": {"negative": ["negative"], "positive": ["positive"]}},
        "llm": {
            "base_url": base_url,
            "model": "instant",
            "api_key_env": "INSTANT_KEY",
            "max_tokens": 4,
            "concurrency": args.concurrency,
        },
        "slm": {"mode": "head", "epochs": 4, **({"encoder": encoder} if encoder else {})},
        "freeal": {"rounds": args.rounds, "query_fraction": fraction, "generated_per_class": 8},
        "ray": {"annotators": args.annotators},
        "state_dir": str(work / "state"),
        "seed": 0,
    }
    path = work / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def measure(size: int, tree: Path, work: Path, args: argparse.Namespace, fraction: float, encoder: str | None) -> dict:
    """One job of `size` texts through `tree`'s CLI: run, then export; the figures."""
    work.mkdir(parents=True, exist_ok=True)
    pool_csv = write_pool(
        data_dir(args.data_dir), size, Path(tempfile.gettempdir()) / "bench_million" / f"pool_{size}.csv"
    )
    server, url = start_server(pool_csv, args.accuracy)
    env = dict(os.environ, INSTANT_KEY="x", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        job = job_file(work, pool_csv, url, args, fraction, encoder)
        run = run_cli(["run", str(job)], tree, env, work / "run.log")
        export = run_cli(["export", str(job), str(work / "labels.parquet")], tree, env, work / "export.log")
    finally:
        server.kill()
    from freeal_stream.store import Store  # this checkout's reader (the state is read, not written)

    store = Store(work / "state" / "freeal.duckdb")
    try:
        rounds = [r["metrics"] for r in store.rounds()]
        n_gold, right = store.gold_agreement(["negative", "positive"], "llm")
    finally:
        store.close()
    lines = run["lines"]
    ingested = first_at(lines, r"ingested \d+ new items")
    requests = sum(m.get("llm_requested", 0) for m in rounds)
    annotate_s = sum(m.get("annotate_s", 0) for m in rounds)
    state = work / "state"
    return {
        "size": size,
        "tree": str(tree),
        "wall_s": run["wall_s"],
        "ingest_s": ingested,
        "rounds": [
            {
                k: m.get(k)
                for k in (
                    "round",
                    "seconds",
                    "plan_s",
                    "annotate_s",
                    "train_s",
                    "demos_s",
                    "llm_requested",
                    "slm_mode",
                    "slm_acc",
                    "llm_label_acc",
                )
            }
            for m in rounds
        ],
        "labels_per_s": round(requests / annotate_s, 1) if annotate_s else None,
        "export_s": export["wall_s"],
        "export_peak_rss_mb": export["peak_rss_mb"].get("driver"),
        "peak_rss_mb": run["peak_rss_mb"],
        "peak_rss_total_mb": run["peak_rss_total_mb"],
        "duckdb_mb": round((state / "freeal.duckdb").stat().st_size / 2**20, 1),
        "arrays_mb": round(sum(p.stat().st_size for p in (state / "arrays").glob("*")) / 2**20, 1)
        if (state / "arrays").exists()
        else None,
        "export_accuracy": round(right / n_gold, 4) if n_gold else None,
        "log": str(work / "run.log"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--fraction", type=float, default=0.01, help="P: share of the unannotated pool per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--annotators", type=int, default=2)
    ap.add_argument("--accuracy", type=float, default=0.9, help="how often the instant LLM is right")
    ap.add_argument("--encoder", default=None, help="slm.encoder (default: the job default)")
    ap.add_argument("--old-tree", type=Path, default=None, help="an older checkout to run the --old-size job with")
    ap.add_argument("--old-size", type=int, default=60000)
    ap.add_argument("--old-fraction", type=float, default=0.1)
    ap.add_argument("--old-encoder", default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench_million")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "million.json")
    args = ap.parse_args()
    result: dict = {**result_meta(vars(args)), "runs": []}
    if args.old_tree is not None:  # the same job, old checkout and new, one after the other
        for name, tree in (("old", args.old_tree), ("new", REPO)):
            r = measure(
                args.old_size, tree, args.work / f"{name}_{args.old_size}", args, args.old_fraction, args.old_encoder
            )
            result["runs"].append({"which": name, **r})
            print(json.dumps({k: v for k, v in r.items() if k != "rounds"}), flush=True)
            write_result(args.out, result)
        old, new = result["runs"][-2], result["runs"][-1]
        result["new_vs_old"] = {
            "wall": round(new["wall_s"] / old["wall_s"], 3),
            "peak_rss_total": round(new["peak_rss_total_mb"] / old["peak_rss_total_mb"], 3),
        }
    for size in (int(s) for s in args.sizes.split(",") if s):
        r = measure(size, REPO, args.work / f"new_{size}", args, args.fraction, args.encoder)
        result["runs"].append({"which": "new", **r})
        print(json.dumps({k: v for k, v in r.items() if k != "rounds"}), flush=True)
        write_result(args.out, result)
    print(json.dumps(result.get("new_vs_old", {})))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
