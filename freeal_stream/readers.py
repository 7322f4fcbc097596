"""Split a data file (CSV, JSON lines, Parquet) into raw records, each with its line or row number.

A record that cannot be parsed (a ragged or badly quoted CSV line, a broken JSON line, bytes that are not
UTF-8) comes back with the problem named and its raw content, never dropped and never fatal: one bad line
must not cost the rest of the file. Only what makes the whole file unreadable raises `FileUnreadable`.

CSV is parsed here rather than by DuckDB: DuckDB 2.0's sniffer gives up on quoting (or on the whole dialect)
when a file holds a bad line, and its rejects table keeps the raw line only with bad bytes replaced.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import duckdb

from freeal_stream.errors import FreealError


class FileUnreadable(FreealError):
    """The file as a whole cannot be read in the declared format (the message says why)."""


class RawRecord(NamedTuple):
    """One record: `values` by column, or None with `problem` = (reason, detail) when it could not be parsed.

    A NamedTuple, not a dataclass: a file makes one per row, and this is twice as fast to build."""

    location: str                       # "line 7" (CSV, JSON lines) or "row 7" (Parquet, a JSON array)
    line: int                           # 1-based line (or row) number
    values: dict[str, Any] | None
    raw: str | None = None              # the record as written; None = rebuild it from `values`
    problem: tuple[str, str] | None = None


_DELIMITERS = (",", "\t", ";", "|")
_MAX_FIELD = 16 << 20   # a text up to 16 MiB is one field (the csv module's default stops at 128 KiB)


def _decode_lines(data: bytes) -> tuple[list[str], dict[int, int]]:
    """Physical lines (endings kept) and, for those that are not UTF-8, the offset of the first bad byte.

    Bad lines are decoded with surrogateescape so that the CSV parser still sees their delimiters.
    """
    lines, bad = [], {}
    for i, line in enumerate(data.splitlines(keepends=True)):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            bad[i] = e.start
            lines.append(line.decode("utf-8", "surrogateescape"))
    if lines and lines[0].startswith("\ufeff"):
        lines[0] = lines[0][1:]
    return lines, bad


def _as_written(text: str) -> str:
    """Text as it was in the file, with undecodable bytes shown as \\xNN (so it can be stored and printed)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _delimiter(header: str, suffix: str) -> str:
    """Tab for .tsv; else the most frequent of , TAB ; | in the header line (a comma when none occurs)."""
    if suffix == ".tsv":
        return "\t"
    counts = {d: header.count(d) for d in _DELIMITERS}
    best = max(_DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] else ","


def read_csv(path: Path) -> tuple[list[str], list[RawRecord]]:
    """The header's column names and every record after it; blank lines are skipped."""
    lines, bad = _decode_lines(path.read_bytes())
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        raise FileUnreadable("the file is empty (no header line)")
    if first in bad:
        raise FileUnreadable(f"the header (line {first + 1}) is not UTF-8 (byte {bad[first] + 1})")
    delim = _delimiter(lines[first], path.suffix.lower())
    csv.field_size_limit(max(csv.field_size_limit(), _MAX_FIELD))
    try:
        header = next(csv.reader([lines[first]], delimiter=delim, strict=True))
    except csv.Error as e:
        raise FileUnreadable(f"the header (line {first + 1}) cannot be parsed: {e}") from None
    header = [h.strip() for h in header]
    return header, list(_csv_records(lines, bad, first + 1, header, delim))


def _csv_records(lines: list[str], bad: dict[int, int], start: int, header: list[str],
                 delim: str) -> Iterator[RawRecord]:
    """Records from line index `start` on. After a bad record the parser restarts on the line after the
    record's FIRST line, so an unclosed quote costs one line, not the rest of the file."""
    pos = start
    while pos < len(lines):
        reader = csv.reader(map(lines.__getitem__, range(pos, len(lines))), delimiter=delim, strict=True)
        done = 0                        # lines the reader has consumed
        restart = None
        while True:
            begin = pos + done
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                runs_on = "end of data" in str(e) or pos + reader.line_num - begin > 1
                why = "a quote opened on this line is never closed" if runs_on else f"bad quoting ({e})"
                yield _bad_csv(lines, begin, begin + 1, "unreadable row", why)
                restart = begin + 1
                break
            done = reader.line_num
            end = pos + done
            if not fields:              # a blank line
                continue
            broken = [i for i in range(begin, end) if i in bad] if bad else None
            if broken:
                i = broken[0]
                yield _bad_csv(lines, begin, end, "not UTF-8", f"byte {bad[i] + 1} of line {i + 1} is not UTF-8")
            elif len(fields) != len(header):
                yield _bad_csv(lines, begin, begin + 1, "unreadable row",
                               f"{len(fields)} fields where the header has {len(header)}")
                if end - begin > 1:     # a quote opened on this line swallowed the next ones: re-read them
                    restart = begin + 1
                    break
            else:
                raw = lines[begin] if end - begin == 1 else "".join(lines[begin:end])
                yield RawRecord(f"line {begin + 1}", begin + 1, dict(zip(header, fields)), raw.rstrip("\r\n"))
        if restart is None:
            return
        pos = restart


def _bad_csv(lines: list[str], begin: int, end: int, reason: str, why: str) -> RawRecord:
    fix = ("save the file as UTF-8" if reason == "not UTF-8" else
           'quote fields that hold the delimiter or a line break ("a, b"), and double quotes inside them ("")')
    return RawRecord(f"line {begin + 1}", begin + 1, None, _as_written("".join(lines[begin:end])).rstrip("\r\n"),
                     (reason, f"line {begin + 1}: {why}. Fix: {fix}"))


def read_jsonl(path: Path) -> tuple[list[str], list[RawRecord]]:
    """One JSON object per line (or, when the file starts with '[', one JSON array of objects).

    The columns are every key seen, in order of first appearance.
    """
    data = path.read_bytes()
    if data.lstrip()[:1] == b"[":
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise FileUnreadable(f"it starts with '[' but is not one valid JSON array ({e})") from None
        records = [_json_record(f"row {k}", k, json.dumps(v, ensure_ascii=False), v)
                   for k, v in enumerate(doc if isinstance(doc, list) else [doc], 1)]
    else:
        records = []
        for k, line in enumerate(data.split(b"\n"), 1):
            if line.strip():
                records.append(_json_line(k, line))
    columns: dict[str, None] = {}
    for r in records:
        columns.update(dict.fromkeys(r.values or ()))
    if records and not columns:
        first = records[0].problem[1] if records[0].problem else "no JSON object"
        raise FileUnreadable(f"no line is a JSON object ({first})")
    return list(columns), records


def _json_line(k: int, line: bytes) -> RawRecord:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return RawRecord(f"line {k}", k, None, line.decode("utf-8", "backslashreplace"),
                         ("not UTF-8", f"line {k}: byte {e.start + 1} is not UTF-8. Fix: save the file as UTF-8"))
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        return RawRecord(f"line {k}", k, None, text.rstrip("\r"),
                         ("broken JSON line", f"line {k}: not JSON ({e}). Fix: write one JSON object per line"))
    return _json_record(f"line {k}", k, text.rstrip("\r"), value)


def _json_record(location: str, k: int, raw: str, value: Any) -> RawRecord:
    if not isinstance(value, dict):
        return RawRecord(location, k, None, raw, ("broken JSON line", f"{location}: a JSON {type(value).__name__}, "
                                                  "not an object. Fix: write each record as {\"text\": ...}"))
    return RawRecord(location, k, {str(key): v for key, v in value.items()}, raw)


def read_parquet(path: Path) -> tuple[list[str], list[RawRecord]]:
    """Every row; binary cells are decoded as UTF-8 (a row whose bytes are not UTF-8 comes back as a problem)."""
    con = duckdb.connect()
    try:
        rel = con.execute("SELECT * FROM read_parquet($p)", {"p": str(path)})
        columns = [d[0] for d in rel.description]
        rows = rel.fetchall()
    except duckdb.Error as e:
        raise FileUnreadable(str(e).splitlines()[0]) from None
    finally:
        con.close()
    records = []
    for k, row in enumerate(rows, 1):
        values = dict(zip(columns, row))
        problem = None
        for name, v in values.items():
            if isinstance(v, (bytes, bytearray)):
                try:
                    values[name] = bytes(v).decode("utf-8")
                except UnicodeDecodeError as e:
                    values[name] = bytes(v).decode("utf-8", "backslashreplace")
                    problem = problem or ("not UTF-8", f"row {k}: column '{name}' byte {e.start + 1} is not UTF-8. "
                                          "Fix: write the column as UTF-8 strings")
        if problem:
            raw = json.dumps(values, default=str, ensure_ascii=False)
            records.append(RawRecord(f"row {k}", k, None, raw, problem))
        else:
            records.append(RawRecord(f"row {k}", k, values))
    return columns, records


READERS = {"csv": read_csv, "jsonl": read_jsonl, "parquet": read_parquet}
