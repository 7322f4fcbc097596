"""freeal-stream command line: run | status | export."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from freeal_stream.config import ConfigError, JobConfig, load_job
from freeal_stream.progress import Progress

EXPORT_FORMATS = {".csv": "CSV", ".parquet": "PARQUET", ".jsonl": "JSON", ".json": "JSON"}


def _llm_endpoint(job: JobConfig, stack: contextlib.ExitStack, progress: Progress) -> tuple[str, str, bool]:
    """(base_url, model name, is_local): the job's endpoint, or the embedded server started for this run."""
    if job.llm.base_url:
        return job.llm.base_url, job.llm.model, False
    from freeal_stream.local_llm import LocalLLMServer

    server = LocalLLMServer(model=job.llm.model, context_size=job.llm.context_size,
                            threads=job.llm.server_threads)
    progress.say(f"starting the embedded llama.cpp server ({job.llm.model}) on 127.0.0.1")
    base_url = server.start()
    stack.callback(server.stop)
    return base_url, server.model_name, True


def cmd_run(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    progress = Progress()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(job.slm.threads)
    from freeal_stream.llm.client import LLMClient
    from freeal_stream.loop import FreeALRun, api_key, format_round, ingest, open_state

    store = open_state(job)
    with contextlib.ExitStack() as stack:
        stack.callback(store.close)
        ingest(job, store, progress)
        base_url, model, local = _llm_endpoint(job, stack, progress)
        client = LLMClient(job.llm, base_url, api_key(job, local), cache=store)
        rounds = FreeALRun(job, store, client, model, progress).run()
        progress.say("\nper-round figures:")
        for m in rounds:
            progress.say("  " + format_round(m))
        _print_summary(store, progress)
    return 0


def _print_summary(store: Any, progress: Progress) -> None:
    counts = store.label_counts_by_source()
    spent = store.spent()
    progress.say(f"labels by source: {counts}; LLM spent: {spent['requests']} requests, "
                 f"{spent['prompt_tokens'] + spent['completion_tokens']} tokens "
                 f"({spent['cached_tokens']} prompt tokens from the server's prefix cache)")
    _register_outputs(store)
    rows = store.con.execute("""SELECT count(*), count(*) FILTER (WHERE l.gold = c.name)
                                FROM labels_out l JOIN class_names c ON c.idx = l.label
                                WHERE l.gold IS NOT NULL""").fetchall()
    n, right = rows[0]
    if n:
        progress.say(f"final labels vs gold (reporting only): {right / n:.3f} on {n} items")


def _register_outputs(store: Any) -> None:
    """Views `labels_out` and `class_names` on the store connection, with the class names of the stored job."""
    store.create_label_views(list(json.loads(store.get_meta("job"))["task"]["classes"]))


def cmd_status(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    from freeal_stream.store import Store

    db = job.state_path / "freeal.duckdb"
    if not db.exists():
        print(f"no state yet at {db}: run `freeal-stream run {args.job}` first")
        return 1
    store = Store(db)
    try:
        progress = Progress(stream=sys.stdout)
        progress.say(f"state: {db}; items: {store.count_items()}; annotated by the LLM: "
                     f"{len(store.annotated_ids())}")
        from freeal_stream.loop import format_round

        for r in store.rounds():
            progress.say(f"  round {r['round']}: {r['phase']}" +
                         (f" — {format_round(r['metrics'])}" if r["metrics"] else ""))
        _print_summary(store, progress)
    finally:
        store.close()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    from freeal_stream.store import Store

    out = Path(args.output)
    fmt = EXPORT_FORMATS.get(out.suffix.lower())
    if fmt is None:
        print(f"cannot export to '{out.suffix}': use one of {sorted(EXPORT_FORMATS)}", file=sys.stderr)
        return 2
    db = job.state_path / "freeal.duckdb"
    if not db.exists():
        print(f"no state at {db}: run the job first", file=sys.stderr)
        return 1
    store = Store(db)
    try:
        _register_outputs(store)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        store.con.execute(f"""COPY (SELECT l.id, l.text, c.name AS label, l.source, l.confidence,
                                           cl.name AS llm_label, cs.name AS slm_label
                                    FROM labels_out l LEFT JOIN class_names c ON c.idx = l.label
                                    LEFT JOIN class_names cl ON cl.idx = l.llm_label
                                    LEFT JOIN class_names cs ON cs.idx = l.slm_label
                                    ORDER BY l.seq) TO '{tmp}' (FORMAT {fmt})""").fetchall()
        tmp.replace(out)
        n = store.count_items()
    finally:
        store.close()
    print(f"exported {n} rows to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="freeal-stream", description="Label text data sets with an LLM and a "
                                "robustly self-trained small model (FreeAL), within an API budget.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or resume) a job until its rounds or budget are done")
    r.add_argument("job", help="job YAML file")
    r.set_defaults(func=cmd_run)
    s = sub.add_parser("status", help="show rounds, spend and label sources of a job's state")
    s.add_argument("job")
    s.set_defaults(func=cmd_status)
    e = sub.add_parser("export", help="write id, text, label, source, confidence (and the LLM's and the SLM's "
                                      "own labels) to CSV/Parquet/JSONL")
    e.add_argument("job")
    e.add_argument("output", help="output file; the format follows its suffix (.csv, .parquet, .jsonl)")
    e.set_defaults(func=cmd_export)
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message already names the problem and the fix: print it, no traceback."""
    from freeal_stream.llm.client import FatalLLMError
    from freeal_stream.local_llm import ModelNotAvailable, ServerStartError
    from freeal_stream.sources import DataError
    from freeal_stream.store import StateError

    return ConfigError, DataError, StateError, FatalLLMError, ModelNotAvailable, ServerStartError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:
        if isinstance(e, _user_errors()):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("interrupted: everything finished so far is in the state directory; rerun to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
