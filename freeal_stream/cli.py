"""freeal-stream command line: run | serve | ingest | status | quarantine | export | review | report."""

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

    from freeal_stream.serve import Service, service_token

    token = service_token(job)  # refused before Ray or the models start
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("freeal_stream.service").setLevel(logging.INFO)  # what the inbox did with each file
    from freeal_stream.intake import ingest
    from freeal_stream.session import open_session

    with open_session(job, progress, args.address) as session:
        ingest(job, session.store, progress)
        service = Service(session, progress, token)
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
    from collections import Counter

    from freeal_stream.intake import add_batch, read_data_batches, written
    from freeal_stream.sources import Batch, summary_of
    from freeal_stream.store import Store

    running = _running_service(job)
    total = 0
    for name in args.files:
        added = extra = rows = 0
        problems: Counter[tuple[str, str]] = Counter()
        store: Store | None = None

        def write(batch: Batch, name: str = name) -> tuple[int, int]:
            nonlocal store
            if running is not None:
                return _send_to_service(running, batch, name)
            store = store or Store(job.state_path / "freeal.duckdb")  # opened once a batch is read: a refused
            return add_batch(store, batch, name), 0  # file leaves no state behind

        try:  # a batch at a time (memory bounded by two), the next read while the last is stored
            for batch, (got, more) in written(read_data_batches(job, Path(name)), write):
                added, extra, rows = added + got, extra + more, rows + len(batch.ids)
                problems += batch.problem_counts()
        finally:
            if store is not None:
                store.close()
        total += added
        notes = [
            n
            for n in (
                summary_of(problems),
                f"{extra} more quarantined by the service (ids already stored with another text)" if extra else "",
            )
            if n
        ]
        print(f"{name}: {added} new items of {rows}" + (f"; {'; '.join(notes)}" if notes else ""))
    print(
        f"{total} new items {'sent to the running service' if running else 'stored'}; they join the next round"
        f"\nquarantined and flagged rows: `freeal-stream quarantine {args.job}`"
    )
    return 0


def _send_to_service(running: Any, batch: Any, name: str, chunk: int = 5000) -> tuple[int, int]:
    """Post a file's items and its quarantined rows (recorded under the file's name); returns (added, how
    many more rows the service quarantined)."""
    items = [
        {"id": i, "text": t, "view": v, "gold": g}
        for i, t, v, g in zip(batch.ids, batch.texts, batch.views, batch.golds)
    ]
    aside = [
        {"location": p.location, "line": p.line, "reason": p.reason, "detail": p.detail, "raw": p.raw}
        for p in batch.problems
        if p.action == "quarantined"
    ]
    added = quarantined = 0
    for k in range(0, max(len(items), len(aside)), chunk):
        answer = running.add_items(items[k : k + chunk], source=name, quarantined=aside[k : k + chunk])
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

    url = find_service(job.state_path, host=job.service.host, port=job.service.port)
    return ServiceClient(url, os.environ.get(job.service.token_env)) if url else None


def cmd_status(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    from freeal_stream.service.client import json_safe
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
        print(json.dumps(json_safe(st), indent=2, allow_nan=False))
    else:
        print("\n".join(format_status(st)))
    return 0


def cmd_quarantine(args: argparse.Namespace) -> int:
    """List the rows set aside (quarantined) or labelled with a caveat (flagged), with where and why."""
    job = load_job(args.job)
    from freeal_stream.service.client import json_safe
    from freeal_stream.status import bad_input, format_bad_input

    running = _running_service(job)
    if running is not None:  # the file is held by the service: its status carries the first rows
        report = running.status()["quarantine"]
        report["rows"] = report["rows"][: args.limit]
    else:
        store = _open_state_file(job)
        try:
            report = bad_input(store, args.limit)
        finally:
            store.close()
    if args.json:
        print(json.dumps(json_safe(report), indent=2, ensure_ascii=False, allow_nan=False))
        return 0
    print(format_bad_input(report))
    for r in report["rows"]:
        print(f"{r['source']} {r['location']}: {r['action']}, {r['reason']}: {r['detail']}")
        print(f"    raw: {r['raw'][:200]!r}")
    shown, total = len(report["rows"]), report["quarantined"] + report["flagged"]
    if shown < total:
        print(
            f"({shown} of {total} shown; --limit N shows more"
            + (", or stop the service to list them all)" if running is not None else ")")
        )
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


def _stopped_state(job: JobConfig, verb: str) -> Any:
    """The state file for a command that needs it whole (a running service holds it)."""
    if _running_service(job) is not None:
        raise UserError(
            f"a service is running on {job.state_path}: it holds the state file. Fix: stop it "
            f"(Ctrl-C or SIGTERM), run `freeal-stream {verb}`, then start it again"
        )
    return _open_state_file(job)


def cmd_review_export(args: argparse.Namespace) -> int:
    """Write the rows where a human label is worth most, for Label Studio, Argilla or a spreadsheet."""
    job = load_job(args.job)
    from freeal_stream.review import default_queue_path, how_to_review, pick_for_review, write_queue

    if args.n < 1 or not 0 <= args.random_share <= 1:
        raise UserError(
            f"--n {args.n} --random-share {args.random_share}: give at least 1 row and a share between 0 and 1"
        )

    store = _stopped_state(job, "review export")
    try:
        names = _stored_class_names(store)
        pick = pick_for_review(store, args.n, job.freeal.label_of_record, len(names), args.random_share, job.seed)
        out = Path(args.output) if args.output else default_queue_path(job.state_path, args.format)
        files = write_queue(pick.rows, out, args.format, names)
        store.queue_for_review(pick.rows, pick.joined_random)
    finally:
        store.close()
    joined = len(pick.joined_random)
    print(
        f"wrote {len(pick.rows)} rows for review to {files[0]} ("
        + ", ".join(f"{r} {n}" for r, n in pick.counts().items() if n)
        + ")"
        + (f"; {joined} rows reviewed before join the random sample" if joined else "")
    )
    print(how_to_review(args.format, files, args.job))
    return 0


def cmd_review_import(args: argparse.Namespace) -> int:
    """Read reviewers' labels back: they win over the models' labels and train the next rounds' SLM."""
    job = load_job(args.job)
    from freeal_stream.review import format_review_check, import_review, review_check

    store = _stopped_state(job, "review import")
    try:
        result = import_review(store, Path(args.file), _stored_class_names(store), job.freeal.label_of_record)
        check = format_review_check(review_check(store.review_agreement()))
    finally:
        store.close()
    print(result.summary(args.file))
    if result.quarantined:
        print(f"quarantined rows, with the reason and the fix: `freeal-stream quarantine {args.job}`")
    if check:
        print(check)
    print(
        "the human labels stand in `export` now; the next round's SLM trains on them and the LLM is not asked "
        "about those rows again"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    from freeal_stream.report import write_report

    out = Path(args.output) if args.output else job.state_path / "report.html"
    store = _stopped_state(job, "report")
    try:
        write_report(store, job, _stored_class_names(store), out)
    finally:
        store.close()
    print(f"wrote {out} (one self-contained HTML file: open it in a browser)")
    return 0


def _address_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster to run on (default: ray.address, $RAY_ADDRESS, else a local Ray)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="freeal-stream",
        description="Label text data sets with an LLM and a "
        "robustly self-trained small model (FreeAL), within an API budget.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or resume) a job until its rounds or budget are done")
    r.add_argument("job", help="job YAML file")
    _address_option(r)
    r.set_defaults(func=cmd_run)
    s = sub.add_parser("status", help="show spend, budget left, estimate to finish, rounds and label sources")
    s.add_argument("job")
    s.add_argument("--json", action="store_true", help="print the status as JSON")
    s.set_defaults(func=cmd_status)
    sv = sub.add_parser(
        "serve", help="run the job as a service: label new data from the inbox folder and the HTTP API as it arrives"
    )
    sv.add_argument("job")
    _address_option(sv)
    sv.set_defaults(func=cmd_serve)
    i = sub.add_parser("ingest", help="add data files to a job (through its running service, if one runs)")
    i.add_argument("job")
    i.add_argument("files", nargs="+", help="CSV / JSONL / Parquet files with the job's columns")
    i.set_defaults(func=cmd_ingest)
    q = sub.add_parser(
        "quarantine",
        help="list the rows of the data that were quarantined (not labelled) or "
        "flagged (labelled, with a caveat), with file, line and reason",
    )
    q.add_argument("job")
    q.add_argument("--json", action="store_true", help="print counts and rows as JSON")
    q.add_argument("--limit", type=int, default=1000, help="list at most this many rows (default 1000)")
    q.set_defaults(func=cmd_quarantine)
    e = sub.add_parser(
        "export",
        help="write id, text, label, source, confidence (and the LLM's and the SLM's own labels) to CSV/Parquet/JSONL",
    )
    e.add_argument("job")
    e.add_argument("output", help="output file; the format follows its suffix (.csv, .parquet, .jsonl)")
    e.set_defaults(func=cmd_export)
    _review_parsers(sub)
    rp = sub.add_parser(
        "report",
        help="write one self-contained HTML report: per-round figures, accuracy against "
        "spend, labels by source, confidence, disputed examples, bad input",
    )
    rp.add_argument("job")
    rp.add_argument("output", nargs="?", help="the HTML file (default: <state_dir>/report.html)")
    rp.set_defaults(func=cmd_report)
    return p


def _review_parsers(sub: Any) -> None:
    from freeal_stream.review import FORMATS

    rv = sub.add_parser("review", help="human review: export the rows worth a human look, import the labels back")
    rsub = rv.add_subparsers(dest="review_command", required=True)
    x = rsub.add_parser(
        "export",
        help="write the rows where a human label is worth most (some drawn at random, "
        "for an unbiased accuracy check; then disputed, rare classes, least confident)",
    )
    x.add_argument("job")
    x.add_argument("output", nargs="?", help="the file to write (default: <state_dir>/review/queue-TIME.*)")
    x.add_argument("--n", type=int, default=200, help="rows to review (default 200)")
    x.add_argument(
        "--format",
        choices=FORMATS,
        default="csv",
        help="csv (fill in the label column), labelstudio (tasks JSON + labelling config) or argilla "
        "(records JSON); default csv",
    )
    x.add_argument(
        "--random-share",
        type=float,
        default=0.2,
        help="share of the rows drawn at random: they measure the export's accuracy without bias (default 0.2)",
    )
    x.set_defaults(func=cmd_review_export)
    m = rsub.add_parser(
        "import",
        help="read a review tool's export (Label Studio JSON/JSON-MIN/CSV, Argilla "
        "records JSON, or the CSV with its label column filled in)",
    )
    m.add_argument("job")
    m.add_argument("file")
    m.set_defaults(func=cmd_review_import)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, FileNotFoundError) as e:  # the message names the problem and the fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: everything finished so far is in the state directory; rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
