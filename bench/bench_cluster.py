"""The same job on a 3-node Ray cluster on this machine, through the real CLI with `--address`, with Ray's
token authentication on; then each kind of actor measured alone on that cluster; and the projection to 10M
texts that BENCHMARKS.md writes out (and `ray_cluster.yaml` is sized from).

The cluster: a head node (the driver, i.e. the coordinator, and the store actor, which follows the driver;
the trainer, pinned with `ray.trainer_resources: {trainer: 1}`) and two worker nodes carrying the
`annotator` and `scorer` resources (`ray.annotator_resources` / `ray.scorer_resources` pin those actors
there). Every Ray process listens on 127.0.0.1 only, with RAY_AUTH_MODE=token and one token for every
process; the bench checks both (every listening socket of every process, sampled through the run, and a
join without the token, which must fail).

Why `ray.cluster_utils.Cluster` and not `ray start`: on one machine, `ray start` cannot make a loopback-only
multi-node cluster. With Ray's loopback switch on (what a local job uses) it refuses a worker node ("Multi-
node Ray clusters are not supported on Windows and OSX"); with it off it rewrites `--node-ip-address=
127.0.0.1` and a 127.0.0.1 `--address` to the host's address (ray._private.services.resolve_ip_for_localhost),
so the worker would listen beyond loopback and never reach a head bound to 127.0.0.1. `Cluster` starts each
node with the same `Node` class `ray start` uses, without that rewrite; the nodes are separate raylets (own
object store, own workers), as on separate machines.

Cleanup: not `ray stop`, which stops every Ray process on the machine (other people's jobs too). Every
process the bench starts carries a marker in its environment and lives under the bench's own Ray temp dir;
at the end, on an error, Ctrl-C, SIGTERM or SIGHUP the cluster is shut down and whatever still carries the
marker is killed by pid. Ray's nodes also die with this process (fate sharing), so even a `kill -9` of the
bench leaves at most the instant LLM server and a CLI, which `--kill-leftovers` finds by the marker.

    FREEAL_DATA_DIR=../shared/data nice -n 10 .venv/bin/python -m bench.bench_cluster [--texts 20000]
        [--fraction 0.1] [--rounds 3] [--annotators-per-node 2] [--encoder minilm-static]
        [--out bench/results/cluster.json]

The job: the MR-recombined pool (bench.synthetic), the instant LLM (90% right; its own process, not
counted), budgeted P x rounds, head mode, the static encoder (MiniLM's 20k texts took 288 s of a 396 s run
on two 1-CPU scorers), slm.threads 1. Per process: peak RSS and CPU seconds, by role and node. Per actor,
alone, then all of a kind together: labels/s of annotators, texts/s of scorers embedding (frozen encoder) and
scoring (the job's last SLM, from its embeddings as head mode does, and from its texts as fine-tune mode
does), answers/s the store actor writes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

from bench.bench_million import first_at, job_file, role, run_cli, start_server
from bench.bench_throughput import prompts, store_writes
from bench.common import REPO, RESULTS, data_dir, result_meta, write_result
from bench.synthetic import mr_sentences, write_pool
from freeal_stream.testing.sockets import is_loopback, listening

HEAD = {"num_cpus": 1, "resources": {"trainer": 1}}  # the trainer's CPU; the driver and store need none


def worker_node(annotators: int) -> dict[str, Any]:
    return {"num_cpus": 1, "resources": {"annotator": annotators, "scorer": 1}}  # the scorer's CPU


class LocalCluster:
    """Three Ray nodes on 127.0.0.1 with token auth, started by this process; `close` leaves no process (each
    carries a marker in its environment, so even one Ray renamed and re-parented is found)."""

    MARK = "FREEAL_BENCH_CLUSTER"

    def __init__(self, annotators_per_node: int, temp_dir: Path, tries: int = 3):
        if "ray" in sys.modules:  # Ray reads its auth mode once, when imported
            raise RuntimeError("start the cluster before anything imports ray")
        os.environ.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=secrets.token_urlsafe(32),
            PYTHONPATH=str(REPO),
            OMP_WAIT_POLICY="PASSIVE",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
        )  # this process's, and every node's processes'
        from ray.cluster_utils import Cluster

        from freeal_stream.actors.runtime import loopback_only_ray

        loopback_only_ray()
        self.cluster: Any = None
        self.address = ""
        nodes = {"temp_dir": str(temp_dir), "include_dashboard": False}  # session files of its own
        t0 = time.monotonic()
        for attempt in range(tries):  # a node that takes over 30 s to register (Ray's fixed limit) fails it
            os.environ[self.MARK] = f"{os.getpid()}-{attempt}"
            try:
                self.cluster = Cluster(initialize_head=True, head_node_args={**HEAD, **nodes})
                for _ in range(2):
                    self.cluster.add_node(**worker_node(annotators_per_node), **nodes)
                self.cluster.wait_for_nodes(timeout=120)
                break
            except Exception as e:  # Ray raises a plain Exception for a node that did not come up
                print(f"cluster start failed ({e}); {'retrying' if attempt + 1 < tries else 'giving up'}", flush=True)
                self.close()
                if attempt + 1 == tries:
                    raise
        self.started_s = round(time.monotonic() - t0, 1)
        self.address = self.cluster.address

    def processes(self, exclude: set[int] = frozenset()) -> list[psutil.Process]:
        """This process's descendants: every node's processes (GCS, raylets, agents, workers), the CLI's."""
        return [p for p in psutil.Process().children(recursive=True) if p.pid not in exclude]

    def marked(self) -> list[psutil.Process]:
        """Every process started from this one since the marker was set, wherever it was re-parented (the
        marker is in its environment): the cluster's, and any CLI or probe still running."""
        out = []
        for p in psutil.process_iter():
            try:
                if p.pid != os.getpid() and p.environ().get(self.MARK) == os.environ[self.MARK]:
                    out.append(p)
            except psutil.Error:
                continue
        return out

    def kill_marked(self) -> list[int]:
        """Kill, by pid, every process started since the marker was set (the nodes', a finished CLI's none)."""
        left = self.marked()
        for p in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        return sorted(p.pid for p in left)

    def node_of(self, p: psutil.Process) -> str:
        """head / worker1 / worker2 by the raylet a process runs under (its socket name), '-' for none."""
        try:
            for q in [p, *p.parents()]:
                if q.name() == "raylet":
                    sock = next(a for a in q.cmdline() if a.startswith("--raylet_socket_name="))
                    k = sock.rsplit("raylet", 1)[1].lstrip(".")
                    return f"worker{k}" if k else "head"
        except (psutil.Error, StopIteration):
            pass
        return "-"

    def close(self) -> list[int]:
        """Shut the cluster down, then kill (by pid) any of its processes still there; returns their pids.
        Safe to call twice, and on a cluster that did not finish starting."""
        import ray

        ray.shutdown()
        if self.cluster is not None:
            with contextlib.suppress(Exception):  # a node half started; what is left is killed below
                self.cluster.shutdown()
            self.cluster = None
            time.sleep(2)
        forget_address(self.address)
        return self.kill_marked()


def forget_address(address: str) -> None:
    """Remove Ray's note of the latest cluster (/tmp/ray/ray_current_cluster) when it names ours, so a later
    `ray.init(address="auto")` on this machine does not look for a cluster that is gone."""
    if not address:
        return
    from ray._private.utils import get_ray_address_file

    note = Path(get_ray_address_file(None))
    with contextlib.suppress(OSError):
        if note.read_text().strip() == address:
            note.unlink()


def kill_leftovers(mine: bool = False) -> list[int]:
    """Kill, by pid, what a run of this bench started and left running (its marker names the bench's pid): this
    run's (`mine`), or those of runs that are gone (after a `kill -9`), never those of a run still going."""
    left = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ValueError):
            mark = p.environ().get(LocalCluster.MARK) if p.uids().real == os.getuid() else None
            if mark is None or p.pid == os.getpid():
                continue
            bench = int(mark.split("-")[0])
            if bench == os.getpid() if mine else not psutil.pid_exists(bench):
                left.append(p)
    for p in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    return sorted(p.pid for p in left)


def exit_on_signals() -> None:
    """SIGTERM and SIGHUP end the bench as Ctrl-C does, through its `finally` blocks (which stop the cluster)."""

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(f"stopped by signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


class SocketWatch(threading.Thread):
    """Every listening TCP socket of the cluster's processes, sampled every 2 s while the job runs."""

    def __init__(self, cluster: LocalCluster, exclude: set[int]):
        super().__init__(daemon=True)
        self.cluster, self.exclude = cluster, exclude
        self.seen: set[tuple[str, str, int]] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            procs = {p.pid: p for p in self.cluster.processes(self.exclude) + self.cluster.marked()}
            self.seen |= listening([p for pid, p in procs.items() if pid not in self.exclude])
            self.stop.wait(2.0)


def join_without_token(address: str) -> str:
    """What a client that has not the cluster's token gets: it must not connect."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_TOKEN"}
    code = f"import ray; ray.init(address={address!r}); print('JOINED')"
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        return "no connection in 180 s"
    if "JOINED" in out.stdout:
        return "JOINED (token auth is not working)"
    return (out.stderr.strip().splitlines() or ["?"])[-1]


def run_job(
    cluster: LocalCluster, url: str, pool_csv: Path, work: Path, args: argparse.Namespace, server_pid: int
) -> dict:
    """`freeal-stream run JOB --address ...` on the cluster: phases, rates, memory and CPU per role and node."""
    shutil.rmtree(work, ignore_errors=True)  # a state left by an earlier run would be resumed, not redone
    work.mkdir(parents=True)
    job = job_file(work, pool_csv, url, args, args.fraction, args.encoder)
    raw = yaml.safe_load(job.read_text())
    raw["slm"]["threads"] = 1
    raw["ray"] = {
        "annotators": 2 * args.annotators_per_node,
        "scorers": 2,
        "annotator_resources": {"annotator": 1},
        "scorer_resources": {"scorer": 1},
        "trainer_resources": {"trainer": 1},
    }
    job.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = dict(os.environ, INSTANT_KEY="x")
    exclude = {os.getpid(), server_pid}
    watch = SocketWatch(cluster, exclude)
    watch.start()
    try:
        run = run_cli(
            ["run", str(job), "--address", cluster.address],
            REPO,
            env,
            work / "run.log",
            procs=lambda _pid: lambda: cluster.processes(exclude),
            name=lambda pid: lambda p: f"{role(p, pid)}@{cluster.node_of(p)}",
        )
    finally:
        watch.stop.set()
        watch.join()
    from freeal_stream.store import Store

    store = Store(work / "state" / "freeal.duckdb")
    try:
        rounds = [r["metrics"] for r in store.rounds()]
        items = store.count_items()
    finally:
        store.close()
    lines = run["lines"]
    embed_at = first_at(lines, r"embedding [\d,]+ texts with the frozen encoder")
    embed_end = first_at(lines, r"generating demonstrations|round 1/") if embed_at is not None else None
    scoring = [
        (t, int(m.group(1).replace(",", "")))
        for t, line in lines
        if (m := re.search(r"scoring ([\d,]+) items with round", line))
    ]
    score_s = [
        round(next((u for u, line in lines if u >= t and re.search(rf"score\] {n}/{n}\b", line)), t) - t, 1)
        for t, n in scoring
    ]  # to its progress line saying all are done
    labels = sum(m.get("llm_requested", 0) for m in rounds)
    annotate_s = sum(m.get("annotate_s", 0) for m in rounds)
    exposed = sorted(s for s in watch.seen if not is_loopback(s[1]))
    return {
        "items": items,
        "wall_s": run["wall_s"],
        "ingest_done_s": first_at(lines, r"ingested \d+ new items"),
        "embed_s": round(embed_end - embed_at, 1) if embed_at is not None and embed_end is not None else None,
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
                    "slm_acc",
                    "llm_label_acc",
                )
            }
            for m in rounds
        ],
        "labels": labels,
        "labels_per_s": round(labels / annotate_s, 1) if annotate_s else None,
        "pool_scoring": [{"items": n, "s": t} for (_, n), t in zip(scoring, score_s)],
        "peak_rss_mb": run["peak_rss_mb"],
        "peak_rss_total_mb": run["peak_rss_total_mb"],
        "cpu_s": run["cpu_s"],
        "listening_sockets": len(watch.seen),
        "listening_beyond_loopback": exposed,
        "log": str(work / "run.log"),
    }


class Meter:
    """Rates of one kind of actor: per second of wall time (this shared machine's load included) and per CPU
    second its processes spent (what a dedicated core would do; the projection uses it)."""

    def __init__(self, cluster: LocalCluster):
        self.cluster = cluster

    def cpu(self, kind: str) -> float:
        """CPU seconds so far of the cluster's live actor processes of a class (`ray::Scorer`, ...)."""
        total = 0.0
        for p in self.cluster.processes():
            with contextlib.suppress(psutil.Error):
                if p.cmdline() and p.cmdline()[0].startswith(f"ray::{kind}"):
                    t = p.cpu_times()
                    total += t.user + t.system
        return total

    def rate(self, kind: str, n: int, fn: Any) -> dict[str, float]:
        cpu, t0 = self.cpu(kind), time.perf_counter()
        fn()
        wall, cpu = time.perf_counter() - t0, self.cpu(kind) - cpu
        return {"per_s": round(n / wall, 1), "per_cpu_s": round(n / cpu, 1) if cpu > 0 else None}


def scorer_rates(meter: Meter, scorers: Any, encoder: str, texts: list[str], files: dict[str, bytes]) -> dict[str, Any]:
    """Texts/s of a scorer pool: frozen embedding, then a trained SLM's scores from those embeddings (head mode)
    and from the texts (through the encoder, as fine-tune mode scores), each after a warm-up call per actor."""
    from freeal_stream.actors.scorers import ShardInput

    shards = [(s, texts[s : s + 256]) for s in range(0, len(texts), 256)]
    n = 2 * len(scorers.actors)  # warm-up shards: the pool gives each actor two before the next actor
    scorers.embed_shards(encoder, [(k, texts[k : k + 8]) for k in range(n)], lambda _s, _e: None)  # loads it
    emb: dict[int, Any] = {}
    out: dict[str, Any] = {
        "embed": meter.rate("Scorer", len(texts), lambda: scorers.embed_shards(encoder, shards, emb.__setitem__))
    }
    for kind, inputs in (
        ("score_from_embeddings", [(s, ShardInput(emb=emb[s])) for s, _ in shards]),
        ("score_from_texts", [(s, ShardInput(texts=t)) for s, t in shards]),
    ):
        scorers.score_shards("probe", files, inputs[:n], lambda _s, _r: None)  # loads the model everywhere
        out[kind] = meter.rate(
            "Scorer",
            len(texts),
            lambda inputs=inputs: scorers.score_shards("probe", files, inputs, lambda _s, _r: None),
        )
    out["nodes"] = sorted(set(scorers.node_ids()))
    return out


def probes(cluster: LocalCluster, url: str, work: Path, args: argparse.Namespace) -> dict:
    """Each kind of actor alone on the cluster, then all of its kind together (the coordinator's role is played
    by this process, connected to the head like the CLI)."""
    import ray

    from freeal_stream.actors.annotators import AnnotatorPool, wait_for_actors
    from freeal_stream.actors.runtime import start_ray
    from freeal_stream.actors.scorers import ScorerPool
    from freeal_stream.actors.store_actor import start_store
    from freeal_stream.config import LLMConfig, RayConfig, SLMConfig
    from freeal_stream.slm.model import read_model_files

    start_ray(RayConfig(), cluster.address)
    meter = Meter(cluster)
    out: dict[str, Any] = {}
    store = start_store(work / "probe.duckdb")
    try:
        requests = prompts(2 * args.probe_requests + 20000, mr_sentences(data_dir(args.data_dir)))
        out["store_answer_writes"] = meter.rate("StoreActor", 20000, lambda: store_writes(store, requests[-20000:]))
        cfg = LLMConfig(model="instant", max_tokens=4, concurrency=args.concurrency)
        for k, size in enumerate((1, 2 * args.annotators_per_node)):
            batch = requests[k * args.probe_requests : (k + 1) * args.probe_requests]
            pool = AnnotatorPool(
                cfg, url, "x", store, size=size, chunk_size=16, max_restarts=0, resources={"annotator": 1}
            )
            wait_for_actors(pool)
            rate = meter.rate("Annotator", len(batch), lambda p=pool, b=batch: p.complete_many(b))
            out[f"annotators_{size}"] = {**rate, "nodes": sorted(set(pool.node_ids()))}
            pool.shutdown()
    finally:
        store.close()
    texts = [t for t, _ in mr_sentences(data_dir(args.data_dir))][: args.probe_texts]
    model_dir = max((work / "job" / "state" / "models").glob("round-*"), key=lambda p: int(p.name.split("-")[1]))
    files = read_model_files(model_dir)
    for size in (1, 2):
        scorers = ScorerPool(SLMConfig().max_length, 1, size=size, resources={"scorer": 1})
        out[f"scorers_{size}"] = scorer_rates(meter, scorers, args.encoder, texts, files)
        for a in scorers.actors:
            ray.kill(a)
    return out


def projection(
    job: dict[str, Any], probes: dict[str, Any], ingest_per_s: float | None, args: argparse.Namespace
) -> dict[str, Any]:
    """Minutes for `--project-texts` texts (P = `--project-fraction` x `--project-rounds`, head mode, the static
    encoder) on N worker nodes of `--node-vcpus` vCPUs, from the rates measured here, a vCPU there assumed to do
    per CPU second what one here does. On the workers: frozen embedding over (vCPUs - 2) one-thread scorers a
    node (two vCPUs left to 4 annotators, the raylet and agents); annotation at the slower of the annotators'
    CPU and the endpoint's `--rpm`. On the head, whatever N: ingest (the clean 1M-row CSV's rate, from
    bad_input_scale.json), the store actor's answer writes, training (the trainer's seconds in the job less its
    pool scoring, as a line through the rounds' seconds against labels held) and each round's pool scoring
    through the coordinator (its items/s in the job, where the coordinator reads and ships every shard)."""
    texts, rounds, p = args.project_texts, args.project_rounds, args.project_fraction
    held = [texts * (1 - (1 - p) ** (r + 1)) for r in range(rounds)]  # labels held after round r+1
    labels = held[-1]
    embed = probes["scorers_1"]["embed"]["per_cpu_s"]
    annotate = probes["annotators_1"]["per_cpu_s"]
    writes = probes["store_answer_writes"]["per_s"]
    scored = sum(s["items"] for s in job["pool_scoring"]) / sum(s["s"] for s in job["pool_scoring"])
    job_held, cum = [], 0
    for r in job["rounds"]:
        cum += r["llm_requested"]
        job_held.append(cum)
    train = [r["train_s"] - sc["s"] for r, sc in zip(job["rounds"], job["pool_scoring"])]  # less scoring
    fixed, per_label = fit_line(job_held, train)
    rates = {
        "embed_texts_per_scorer_cpu_s": embed,
        "labels_per_annotator_cpu_s": annotate,
        "answer_writes_per_s": writes,
        "pool_scoring_items_per_s": round(scored),
        "train_s_per_round": round(fixed, 2),
        "train_s_per_label_held": round(per_label, 6),
        "ingest_rows_per_s": ingest_per_s,
        "labels": round(labels),
        "labels_held_per_round": [round(h) for h in held],
    }
    head = {
        "ingest_min": texts / ingest_per_s / 60 if ingest_per_s else None,
        "answer_writes_min": labels / writes / 60,
        "train_min": (rounds * fixed + per_label * sum(held)) / 60,
        "pool_scoring_min": rounds * texts / scored / 60,
    }
    rows = []
    for nodes in (int(n) for n in args.project_nodes.split(",")):
        scorers, annotators = (args.node_vcpus - 2) * nodes, 4 * nodes
        label_rate = min(annotate * annotators, args.rpm / 60)
        row = {
            "worker_nodes": nodes,
            "scorers": scorers,
            "annotators": annotators,
            "embed_min": texts / (embed * scorers) / 60,
            "annotate_min": labels / label_rate / 60,
            "annotation_bound": "endpoint rpm" if label_rate == args.rpm / 60 else "annotator CPU",
        }
        row["total_min"] = row["embed_min"] + row["annotate_min"] + sum(v or 0 for v in head.values())
        rows.append({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()})
    return {
        "rates": rates,
        "head_min": {k: round(v, 1) if v is not None else None for k, v in head.items()},
        "rows": rows,
    }


def fit_line(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x; with a slope that is not positive (noise), b = sum(y) / sum(x) and a = 0, an
    upper bound for larger x."""
    mx, my = sum(x) / len(x), sum(y) / len(y)
    var = sum((v - mx) ** 2 for v in x)
    b = sum((u - mx) * (v - my) for u, v in zip(x, y)) / var if var else 0.0
    if b <= 0 or my - b * mx < 0:
        return 0.0, sum(y) / sum(x)
    return my - b * mx, b


def ingest_rate() -> float | None:
    """Rows/s of the newest clean 1M-row CSV ingest recorded by bench_bad_input_scale (None when absent)."""
    path = RESULTS / "bad_input_scale.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    walls = [r["wall_s"] for r in result["clean"] if r["which"] == "new"]
    return round(int(result["args"]["rows"]) / min(walls)) if walls else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=20000)
    ap.add_argument("--fraction", type=float, default=0.1, help="P: share of the unannotated pool per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--annotators-per-node", type=int, default=2)
    ap.add_argument("--accuracy", type=float, default=0.9)
    ap.add_argument("--encoder", default="minilm-static", help="slm.encoder of the job and the scorer probes")
    ap.add_argument("--probe-requests", type=int, default=4000)
    ap.add_argument("--probe-texts", type=int, default=10240)
    ap.add_argument("--project-texts", type=int, default=10_000_000)
    ap.add_argument("--project-fraction", type=float, default=0.01, help="P of the projected job")
    ap.add_argument("--project-rounds", type=int, default=3)
    ap.add_argument("--project-nodes", default="2,4,8,16", help="worker node counts to project")
    ap.add_argument("--node-vcpus", type=int, default=8, help="vCPUs of a projected worker node (m6i.2xlarge: 8)")
    ap.add_argument("--rpm", type=float, default=10000, help="the endpoint's request limit a minute")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench_cluster")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cluster.json")
    ap.add_argument(
        "--kill-leftovers",
        action="store_true",
        help="only kill what runs of this bench that are gone left running (found by a marker)",
    )
    args = ap.parse_args()
    if args.kill_leftovers:
        print(f"killed: {kill_leftovers()}")
        return
    exit_on_signals()
    args.annotators = 2 * args.annotators_per_node  # bench_million.job_file reads it
    args.work.mkdir(parents=True, exist_ok=True)
    pool_csv = write_pool(data_dir(args.data_dir), args.texts, args.work / f"pool_{args.texts}.csv")
    result: dict[str, Any] = {
        **result_meta(vars(args)),
        "nodes": {"head": HEAD, "workers": [worker_node(args.annotators_per_node)] * 2},
    }
    os.environ[LocalCluster.MARK] = f"{os.getpid()}-server"  # the LLM server is this run's too
    server, url = start_server(pool_csv, args.accuracy)
    cluster = None
    try:
        cluster = LocalCluster(args.annotators_per_node, args.work / "ray")
        result["cluster_start_s"] = cluster.started_s
        result["join_without_token"] = join_without_token(cluster.address)
        print(json.dumps({k: result[k] for k in ("cluster_start_s", "join_without_token")}), flush=True)
        result["job"] = run_job(cluster, url, pool_csv, args.work / "job", args, server.pid)
        print(json.dumps(result["job"]), flush=True)
        write_result(args.out, result)
        result["probes"] = probes(cluster, url, args.work, args)
        print(json.dumps(result["probes"]), flush=True)
        result["projection"] = projection(result["job"], result["probes"], ingest_rate(), args)
        print(json.dumps(result["projection"]), flush=True)
    finally:
        if cluster is not None:
            result["killed_after_shutdown"] = cluster.close()
        server.kill()
        result["left_running"] = kill_leftovers(mine=True)  # nothing, unless the cluster failed to start
        write_result(args.out, result)


if __name__ == "__main__":
    main()
