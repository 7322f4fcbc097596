"""Bad input at scale: `freeal-stream ingest` of a million-row file holding every kind of bad row, through the
real CLI; peak RSS, wall and CPU time; and a row-by-row check that every bad row is quarantined with its
reason, every flagged row flagged, and every good row stored (by id and content hash). The same on the clean
file the bad one was made from (bench.synthetic's MR-recombined pool), which is the ingest speed target.

The bad file is the clean pool with about 2% of its rows replaced, deterministically (seeded), by: broken
quoting, a quote never closed (the next row then written fully quoted, so where the runaway field stops is
certain), bytes that are not UTF-8, empty and blank texts, an earlier id with another text (half from the last
hundred rows, half from anywhere earlier: the same batch and a stored one), exact repeats, rows with a field
too many, JSON object lines (CSV files) or CSV lines (JSON-lines files), a text that is a list (JSON lines),
over-long records (1.2 MiB lines); and flagged, not quarantined: texts over max_text_chars, gold labels
outside the classes. Exact repeats copy unflagged rows only: a repeat, in a later batch, of a flagged row is
flagged again though nothing new is stored (within one batch it is not), a wrinkle left as it is.

    FREEAL_DATA_DIR=../shared/data nice -n 10 .venv/bin/python -m bench.bench_bad_input_scale \\
        [--rows 1000000] [--formats csv,jsonl] [--old-tree /tmp/old] [--repeat 1] \\
        [--out bench/results/bad_input_scale.json]

`--old-tree` ingests the clean file (and the bad one) with an older checkout too, alternating old and new so
both meet the same load. CPU seconds are the CLI process's own (user + system, its DuckDB threads included):
on a shared machine they say more than wall time.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import resource
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import yaml

from bench.bench_million import run_cli
from bench.common import REPO, data_dir, result_meta, write_result
from bench.synthetic import write_pool

LONG_RECORD = 1_200_000  # characters of an over-long record's text (the limit is 1 MiB a record)
MAX_TEXT_CHARS = 1000  # data.max_text_chars: a longer text is stored and flagged
# kind -> share of the rows it replaces (per format; too_long is a fixed count instead)
KINDS = {
    "csv": {
        "bad_quote": 0.002,
        "unclosed": 0.001,
        "not_utf8": 0.002,
        "empty": 0.002,
        "id_reused": 0.003,
        "exact_repeat": 0.001,
        "ragged": 0.002,
        "foreign_line": 0.002,
        "long_text": 0.0005,
        "unknown_gold": 0.0005,
    },
    "jsonl": {
        "not_utf8": 0.002,
        "empty": 0.002,
        "id_reused": 0.003,
        "exact_repeat": 0.001,
        "bad_type": 0.002,
        "foreign_line": 0.004,
        "long_text": 0.0005,
        "unknown_gold": 0.0005,
    },
}
TOO_LONG = 5
EXPECTED_REASON = {
    "bad_quote": "unreadable row",
    "unclosed": "unreadable row",
    "ragged": "unreadable row",
    "not_utf8": "not UTF-8",
    "empty": "empty text",
    "id_reused": "id reused with another text",
    "bad_type": "bad field type",
    "too_long": "record too long",
}
FOREIGN = {"csv": "JSON line in a CSV file", "jsonl": "broken JSON line"}
FLAGGED = {"long_text": "long text", "unknown_gold": "unknown gold label"}


@dataclass(frozen=True)
class BadFile:
    path: Path
    rows: int  # records written (blank lines none)
    expected: Path  # CSV: line, action, reason of every quarantined or flagged row
    good: Path  # CSV: id, content_hash of every row that must be stored
    kinds: dict[str, int]


def _csv_line(fields: list[str]) -> str:
    return (
        ",".join(f'"{f.replace(chr(34), chr(34) * 2)}"' if any(c in f for c in ',"\r\n') else f for f in fields) + "\n"
    )


def _quoted_line(fields: list[str]) -> str:
    return ",".join('"' + f.replace('"', '""') + '"' for f in fields) + "\n"


def _json_line(id_: str, text: object, label: str) -> str:
    return json.dumps({"id": id_, "text": text, "label": label}, ensure_ascii=False) + "\n"


def _pool_rows(pool_csv: Path) -> Iterator[list[str]]:
    with open(pool_csv, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        next(reader)
        yield from reader


def make_bad_file(pool_csv: Path, fmt: str, out_dir: Path, seed: int = 1) -> BadFile:
    """The pool with bad rows in place of some of its rows, and what ingest must make of each row."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bad_{pool_csv.stem}.{fmt}"
    expected, good = path.with_suffix(f".{fmt}.expected.csv"), path.with_suffix(f".{fmt}.good.csv")
    rng = random.Random(seed)
    kinds = KINDS[fmt]
    n_rows = sum(1 for _ in _pool_rows(pool_csv))
    long_at = set(rng.sample(range(1000, n_rows), TOO_LONG))
    stored: list[tuple[str, str, str]] = []  # (id, text, label) of the good rows so far
    plain: list[int] = []  # those of them not flagged (what an exact repeat copies)
    made: Counter[str] = Counter()
    line = 1 if fmt == "csv" else 0  # the CSV header is line 1
    with open(path, "wb") as f, open(expected, "w", newline="") as ef, open(good, "w", newline="") as gf:
        exp, gw = csv.writer(ef), csv.writer(gf)
        exp.writerow(["line", "action", "reason"])
        gw.writerow(["id", "content_hash"])
        if fmt == "csv":
            f.write(b"id,text,label\n")
        quote_next = False
        for k, (id_, text, label) in enumerate(_pool_rows(pool_csv)):
            line += 1  # every record is one physical line (MR's texts hold no line break)
            roll, kind = rng.random(), None
            for name, share in kinds.items():
                roll -= share
                if roll < 0:
                    kind = name
                    break
            if k in long_at:
                kind = "too_long"
            if (
                quote_next
                or (kind in ("id_reused", "exact_repeat") and not plain)
                or (kind == "unclosed" and '"' in text)
            ):
                kind = None
            if kind is None or kind in FLAGGED:
                if kind == "long_text":
                    text = (text + " ") * (MAX_TEXT_CHARS // max(1, len(text)) + 2)
                    text = text.strip()
                if kind == "unknown_gold":
                    label = "neutral"
                fields = [id_, text, label]
                f.write(
                    (_quoted_line(fields) if quote_next else _csv_line(fields)).encode()
                    if fmt == "csv"
                    else _json_line(*fields).encode()
                )
                quote_next = False
                stored.append((id_, text, label))
                if kind is None:
                    plain.append(len(stored) - 1)
                gw.writerow([id_, hashlib.sha1(text.encode()).hexdigest()])
                if kind in FLAGGED:
                    exp.writerow([line, "flagged", FLAGGED[kind]])
                    made[kind] += 1
                continue
            made[kind] += 1
            if kind == "exact_repeat":
                same = stored[rng.choice(plain)]
                f.write((_csv_line(list(same)) if fmt == "csv" else _json_line(*same)).encode())
                continue  # nothing new: neither stored again nor quarantined
            exp.writerow([line, "quarantined", FOREIGN[fmt] if kind == "foreign_line" else EXPECTED_REASON[kind]])
            if kind == "id_reused":
                near = rng.random() < 0.5
                other = stored[-rng.randint(1, min(100, len(stored)))] if near else rng.choice(stored)
                row: bytes = (
                    _csv_line([other[0], text, label]) if fmt == "csv" else _json_line(other[0], text, label)
                ).encode()
            elif kind == "not_utf8":
                row = (
                    (_csv_line([id_, text + " caf\udce9", label]))
                    if fmt == "csv"
                    else _json_line(id_, text, label).replace('"}', ' caf\udce9"}')
                ).encode("utf-8", "surrogateescape")
            elif kind == "empty":
                blank = rng.choice(["", "   "])
                row = (_csv_line([id_, blank, label]) if fmt == "csv" else _json_line(id_, blank, label)).encode()
            elif kind == "too_long":
                big = ("lorem ipsum dolor sit amet " * (LONG_RECORD // 27 + 1))[:LONG_RECORD]
                row = (_csv_line([id_, big, label]) if fmt == "csv" else _json_line(id_, big, label)).encode()
            elif kind == "foreign_line":
                row = (_json_line(id_, text, label) if fmt == "csv" else _csv_line([id_, text, label])).encode()
            elif kind == "bad_quote":
                row = f'{id_},"bad "quote" {text.replace(chr(34), "")}",{label}\n'.encode()
            elif kind == "unclosed":
                row = f'{id_},"{text},{label}\n'.encode()
                quote_next = True  # the runaway field stops at the next row's first quote, with an error
            elif kind == "ragged":
                row = (_csv_line([id_, text, label]).rstrip("\n") + ",extra\n").encode()
            elif kind == "bad_type":
                row = _json_line(id_, [text], label).encode()
            else:
                raise AssertionError(kind)
            f.write(row)
    return BadFile(path, n_rows, expected, good, dict(sorted(made.items())))


def job_file(work: Path, data: Path) -> Path:
    job = {
        "name": "bad-input-scale",
        "data": {
            "path": str(data),
            "text_column": "text",
            "id_column": "id",
            "gold_column": "label",
            "max_text_chars": MAX_TEXT_CHARS,
        },
        "task": {
            "description": "Sentiment of a movie review sentence.",
            "classes": {"negative": ["negative"], "positive": ["positive"]},
        },
        "llm": {"base_url": "http://127.0.0.1:9/v1", "model": "none"},  # ingest never calls it
        "state_dir": str(work / "state"),
    }
    path = work / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def ingest(tree: Path, data: Path, work: Path) -> dict:
    """`freeal-stream ingest` of `data` into a fresh state, with `tree`'s CLI: wall, CPU, peak RSS."""
    work.mkdir(parents=True, exist_ok=True)
    for old in (work / "state").glob("*"):
        old.unlink()
    job = job_file(work, data)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = run_cli(["ingest", str(job), str(data)], tree, env, work / "ingest.log")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "tree": str(tree),
        "file": str(data),
        "file_mb": round(data.stat().st_size / 2**20, 1),
        "wall_s": run["wall_s"],
        "cpu_s": round(cpu, 1),
        "peak_rss_mb": run["peak_rss_mb"].get("driver"),
        "said": [line for _, line in run["lines"]][:2],
        "state": str(work / "state" / "freeal.duckdb"),
    }


def check(state: Path, bad: BadFile) -> dict:
    """Every row accounted for: the quarantined and flagged rows by (line, action, reason), the stored items by
    (id, content hash); what differs is counted (and the first few shown)."""
    con = duckdb.connect(str(state), read_only=True)
    try:
        got = con.execute("SELECT line, action, reason FROM quarantine WHERE source = ?", [str(bad.path)]).fetchall()
        exp = con.execute(
            f"SELECT line, action, reason FROM read_csv('{bad.expected}', header=true, "
            "columns={'line': 'BIGINT', 'action': 'VARCHAR', 'reason': 'VARCHAR'})"
        ).fetchall()
        missing_bad, extra_bad = sorted(set(exp) - set(got)), sorted(set(got) - set(exp), key=str)
        good = f"read_csv('{bad.good}', header=true, columns={{'id': 'VARCHAR', 'content_hash': 'VARCHAR'}})"
        not_stored = con.execute(
            f"SELECT count(*) FROM (SELECT id, content_hash FROM {good} EXCEPT SELECT id, content_hash FROM items)"
        ).fetchone()[0]
        unexpected = con.execute(
            f"SELECT id, content_hash FROM items EXCEPT SELECT id, content_hash FROM {good}"
        ).fetchall()
        n_items = con.execute("SELECT count(*) FROM items").fetchone()[0]
        by_reason = dict(
            con.execute("SELECT action || ': ' || reason, count(*) FROM quarantine GROUP BY ALL ORDER BY 1").fetchall()
        )
    finally:
        con.close()
    return {
        "items": n_items,
        "expected_items": sum(1 for _ in open(bad.good)) - 1,
        "recorded": by_reason,
        "expected_recorded": len(exp),
        "bad_rows_missing": len(missing_bad),
        "bad_rows_extra": len(extra_bad),
        "good_rows_not_stored": not_stored,
        "rows_stored_that_should_not_be": len(unexpected),
        "examples": {"missing": missing_bad[:5], "extra": extra_bad[:5], "stored": [list(r) for r in unexpected[:5]]},
        "all_accounted_for": not (missing_bad or extra_bad or not_stored or unexpected),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--formats", default="csv", help="csv, jsonl or both (comma-separated)")
    ap.add_argument("--old-tree", type=Path, default=None, help="an older checkout to ingest with too")
    ap.add_argument("--repeat", type=int, default=1, help="clean-file ingests per tree (alternating)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench_bad_input_scale")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "bad_input_scale.json")
    args = ap.parse_args()
    trees = [("new", REPO)] + ([("old", args.old_tree.resolve())] if args.old_tree else [])
    result: dict = {**result_meta(vars(args)), "clean": [], "bad": []}
    t = time.monotonic()
    pool = write_pool(data_dir(args.data_dir), args.rows, args.work / f"pool_{args.rows}.csv")
    print(f"pool of {args.rows} rows: {pool} ({time.monotonic() - t:.0f} s)", flush=True)
    for rep in range(args.repeat):
        for name, tree in trees if rep % 2 == 0 else trees[::-1]:
            r = {"which": name, **ingest(tree, pool, args.work / f"clean_{name}")}
            result["clean"].append(r)
            print(json.dumps(r), flush=True)
            write_result(args.out, result)
    for fmt in (f for f in args.formats.split(",") if f):
        t = time.monotonic()
        bad = make_bad_file(pool, fmt, args.work)
        print(
            f"bad {fmt} file: {bad.path} ({bad.path.stat().st_size / 2**20:.0f} MB, {bad.kinds}; "
            f"{time.monotonic() - t:.0f} s)",
            flush=True,
        )
        for name, tree in trees:
            r = {"which": name, "format": fmt, "kinds": bad.kinds, **ingest(tree, bad.path, args.work / f"bad_{name}")}
            r["check"] = check(Path(r["state"]), bad)
            result["bad"].append(r)
            print(json.dumps(r), flush=True)
            write_result(args.out, result)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
