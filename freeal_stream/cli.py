"""freeal-stream command line: run | serve | ingest | status | quarantine | export."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from freeal_stream.config import JobConfig, load_job
from freeal_stream.errors import UserError
from freeal_stream.progress import Progress

EXPORT_FORMATS = {".csv": "CSV", ".parquet": "PARQUET", ".jsonl": "JSON", ".json": "JSON"}


def _prepare_process(job: JobConfig) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def cmd_run(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    _prepare_process(job)
    progress = Progress()
    from freeal_stream.intake import ingest
    from freeal_stream.loop import FreeALRun
    from freeal_stream.rounds.metrics import format_round
    from freeal_stream.session import open_session

    with open_session(job, progress, args.address) as session:
        ingest(job, session.store, progress)
        rounds = FreeALRun(session, progress).run()
        progress.say("\nper-round figures:")
        for m in rounds:
            progress.say("  " + format_round(m))
        _print_summary(session.store, job, progress)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    _prepare_process(job)
    progress = Progress()
    import logging
    import signal

    from freeal_stream.serve import Service, check_can_serve

    check_can_serve(job)
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("freeal_stream.service").setLevel(logging.INFO)   # what the inbox did with each file
    from freeal_stream.intake import ingest
    from freeal_stream.session import open_session

    with open_session(job, progress, args.address) as session:
        ingest(job, session.store, progress)
        service = Service(session, progress)
        signal.signal(signal.SIGTERM, lambda *_: service.stop.set())
        try:
            service.serve()
        except KeyboardInterrupt:
            service.stop.set()
        progress.say("service stopped; everything accepted is stored (rerun `serve` to go on)")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    """Add data files: through the running service's API, or straight into the state when none runs."""
    job = load_job(args.job)
    from freeal_stream.intake import read_data_file

    running = _running_service(job)
    total = 0
    for name in args.files:
        batch = read_data_file(job, Path(name))
        if running is not None:
            added, extra = _send_to_service(running, batch, name)
        else:
            from freeal_stream.intake import add_batch
            from freeal_stream.store import Store

            store = Store(job.state_path / "freeal.duckdb")
            try:
                added, extra = add_batch(store, batch, name), 0
            finally:
                store.close()
        total += added
        notes = [n for n in (batch.summary(), f"{extra} more quarantined by the service (ids already stored with "
                             "another text)" if extra else "") if n]
        print(f"{name}: {added} new items of {len(batch.ids)}" + (f"; {'; '.join(notes)}" if notes else ""))
    print(f"{total} new items {'sent to the running service' if running else 'stored'}; they join the next round"
          f"\nquarantined and flagged rows: `freeal-stream quarantine {args.job}`")
    return 0


def _send_to_service(running: Any, batch: Any, name: str, chunk: int = 5000) -> tuple[int, int]:
    """Post a file's items and its quarantined rows (recorded under the file's name); returns (added, how
    many more rows the service quarantined)."""
    items = [{"id": i, "text": t, "view": v, "gold": g}
             for i, t, v, g in zip(batch.ids, batch.texts, batch.views, batch.golds)]
    aside = [{"location": p.location, "line": p.line, "reason": p.reason, "detail": p.detail, "raw": p.raw}
             for p in batch.problems if p.action == "quarantined"]
    added = quarantined = 0
    for k in range(0, max(len(items), len(aside)), chunk):
        answer = running.add_items(items[k:k + chunk], source=name, quarantined=aside[k:k + chunk])
        added += answer["added"]
        quarantined += answer.get("quarantined", 0)
    return added, quarantined - len(aside)


def _print_summary(store: Any, job: JobConfig, progress: Progress) -> None:
    from freeal_stream.status import format_estimate_lines, format_status, job_status

    st = job_status(store, job)
    for line in format_status(st)[1:5] + (format_estimate_lines(st["estimate"]) if st["estimate"] else []):
        progress.say(line)
    n, right = store.gold_agreement(job.task.class_names, job.freeal.label_of_record)
    if n:
        progress.say(f"final labels vs gold (reporting only): {right / n:.3f} on {n} items")


def _stored_class_names(store: Any) -> list[str]:
    """The class names of the job that made the state (the label indices in it refer to these)."""
    return list(json.loads(store.get_meta("job"))["task"]["classes"])


def _open_state_file(job: JobConfig) -> Any:
    from freeal_stream.store import Store

    db = job.state_path / "freeal.duckdb"
    if not db.exists():
        raise FileNotFoundError(f"no state yet at {db}: run `freeal-stream run {job.source_file}` first")
    return Store(db)


def _running_service(job: JobConfig) -> Any:
    """A client for the service running on this job's state, or None (then the DuckDB file is free)."""
    from freeal_stream.service.client import ServiceClient, find_service

    url = find_service(job.state_path)
    return ServiceClient(url, os.environ.get(job.service.token_env)) if url else None


def cmd_status(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    from freeal_stream.status import format_status, job_status

    running = _running_service(job)
    if running is not None:
        st = running.status()
    else:
        store = _open_state_file(job)
        try:
            st = job_status(store, job)
        finally:
            store.close()
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        print("\n".join(format_status(st)))
    return 0


def cmd_quarantine(args: argparse.Namespace) -> int:
    """List the rows set aside (quarantined) or labelled with a caveat (flagged), with where and why."""
    job = load_job(args.job)
    from freeal_stream.status import bad_input, format_bad_input

    running = _running_service(job)
    if running is not None:   # the file is held by the service: its status carries the first rows
        report = running.status()["quarantine"]
        report["rows"] = report["rows"][:args.limit]
    else:
        store = _open_state_file(job)
        try:
            report = bad_input(store, args.limit)
        finally:
            store.close()
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    print(format_bad_input(report))
    for r in report["rows"]:
        print(f"{r['source']} {r['location']}: {r['action']}, {r['reason']}: {r['detail']}")
        print(f"    raw: {r['raw'][:200]!r}")
    shown, total = len(report["rows"]), report["quarantined"] + report["flagged"]
    if shown < total:
        print(f"({shown} of {total} shown; --limit N shows more" + (", or stop the service to list them all)"
                                                                   if running is not None else ")"))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    out = Path(args.output)
    fmt = EXPORT_FORMATS.get(out.suffix.lower())
    if fmt is None:
        print(f"cannot export to '{out.suffix}': use one of {sorted(EXPORT_FORMATS)}", file=sys.stderr)
        return 2
    store = _open_state_file(job)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        n = store.export(str(tmp), fmt, _stored_class_names(store), job.freeal.label_of_record)
        tmp.replace(out)
    finally:
        store.close()
    print(f"exported {n} rows to {out}")
    return 0


def _address_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster to run on (default: ray.address, $RAY_ADDRESS, else a local Ray)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="freeal-stream", description="Label text data sets with an LLM and a "
                                "robustly self-trained small model (FreeAL), within an API budget.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or resume) a job until its rounds or budget are done")
    r.add_argument("job", help="job YAML file")
    _address_option(r)
    r.set_defaults(func=cmd_run)
    s = sub.add_parser("status", help="show spend, budget left, estimate to finish, rounds and label sources")
    s.add_argument("job")
    s.add_argument("--json", action="store_true", help="print the status as JSON")
    s.set_defaults(func=cmd_status)
    sv = sub.add_parser("serve", help="run the job as a service: label new data from the inbox folder and the "
                                      "HTTP API as it arrives")
    sv.add_argument("job")
    _address_option(sv)
    sv.set_defaults(func=cmd_serve)
    i = sub.add_parser("ingest", help="add data files to a job (through its running service, if one runs)")
    i.add_argument("job")
    i.add_argument("files", nargs="+", help="CSV / JSONL / Parquet files with the job's columns")
    i.set_defaults(func=cmd_ingest)
    q = sub.add_parser("quarantine", help="list the rows of the data that were quarantined (not labelled) or "
                                          "flagged (labelled, with a caveat), with file, line and reason")
    q.add_argument("job")
    q.add_argument("--json", action="store_true", help="print counts and rows as JSON")
    q.add_argument("--limit", type=int, default=1000, help="list at most this many rows (default 1000)")
    q.set_defaults(func=cmd_quarantine)
    e = sub.add_parser("export", help="write id, text, label, source, confidence (and the LLM's and the SLM's "
                                      "own labels) to CSV/Parquet/JSONL")
    e.add_argument("job")
    e.add_argument("output", help="output file; the format follows its suffix (.csv, .parquet, .jsonl)")
    e.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, FileNotFoundError) as e:   # the message names the problem and the fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: everything finished so far is in the state directory; rerun to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
