"""Split a data file (CSV, JSON lines, Parquet) into raw records, each with its line or row number, streamed.

A record that cannot be parsed (a ragged or badly quoted CSV line, a broken JSON line, bytes that are not
UTF-8) comes back with the problem named and its raw content, never dropped and never fatal: one bad line
must not cost the rest of the file. Only what makes the whole file unreadable raises `FileUnreadable`.

Files are read as they are consumed, so memory is bounded by one record, not the file: a record (a CSV
record, a JSON line or array element, a Parquet row) may hold up to MAX_RECORD_BYTES; a longer one comes
back as a problem carrying its first RAW_KEPT characters, and its rest is skipped without being held.
A CSV or JSON-lines reader holds at most MAX_RECORD_BYTES + one 64 KiB read; Parquet is read through
pyarrow one record batch at a time (pyarrow decodes a row group's column chunk at once, so a Parquet file's
row-group size bounds it too), and its name is never read as a glob, as DuckDB's read_parquet would.

CSV is parsed here rather than by DuckDB: DuckDB 2.0's sniffer gives up on quoting (or on the whole dialect)
when a file holds a bad line, and its rejects table keeps the raw line only with bad bytes replaced.
"""

from __future__ import annotations

import codecs
import collections
import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from freeal_stream.errors import FreealError

MAX_RECORD_BYTES = 1 << 20  # one record; a longer one is quarantined (its first RAW_KEPT characters kept)
RAW_KEPT = 2000  # characters of an over-long record kept as its raw content
_CHUNK = 1 << 16  # bytes per read


class FileUnreadable(FreealError):
    """The file as a whole cannot be read in the declared format (the message says why)."""


class RawRecord(NamedTuple):
    """One record: `values` by column, or None with `problem` = (reason, detail) when it could not be parsed.

    A NamedTuple, not a dataclass: a file makes one per row, and this is twice as fast to build."""

    location: str  # "line 7" (CSV, JSON lines) or "row 7" (Parquet, a JSON array)
    line: int  # 1-based line (or row) number
    values: dict[str, Any] | None
    raw: str | None = None  # the record as written; None = rebuild it from `values`
    problem: tuple[str, str] | None = None
    size: int = 0  # bytes it took in the file (what a batch of records is measured by)


@dataclass
class Records:
    """An open data file: its columns (None for JSON, whose keys are only known once every line is read)
    and its records, read as they are consumed. Close it (or exhaust `rows`) to close the file."""

    columns: list[str] | None
    rows: Iterator[RawRecord]

    def close(self) -> None:
        close = getattr(self.rows, "close", None)
        if close is not None:
            close()


class _Line(NamedTuple):
    number: int  # 1-based
    text: str  # decoded, ending kept; bytes that are not UTF-8 kept as surrogate escapes
    bad: int | None  # offset of the first byte that is not UTF-8
    size: int  # bytes in the file, also when `cut`
    cut: bool  # over MAX_RECORD_BYTES: `text` holds only its start


def _line_end(data: bytes, universal: bool) -> int:
    """Index just past the first line ending in `data`, or -1 (universal: \r\n and \r end lines too)."""
    n = data.find(b"\n")
    if universal:
        r = data.find(b"\r", 0, n if n != -1 else len(data))
        if r != -1:
            return r + 2 if data[r + 1 : r + 2] == b"\n" else r + 1
    return -1 if n == -1 else n + 1


def _lines(f: BinaryIO, universal: bool) -> Iterator[_Line]:
    """Numbered, decoded physical lines with their endings (\n; universal: also \r\n and \r), a UTF-8 byte
    order mark at the start dropped. A line over MAX_RECORD_BYTES comes cut to its first MAX_RECORD_BYTES
    bytes (with its whole size), its rest read and dropped a _CHUNK at a time."""
    carry, number = b"", 0
    while True:
        chunk = f.read(_CHUNK)
        if len(carry) > MAX_RECORD_BYTES:  # an over-long line: skip to its end
            head, size = carry[:MAX_RECORD_BYTES], len(carry)
            while chunk and (end := _line_end(chunk, universal)) == -1:
                size += len(chunk)
                chunk = f.read(_CHUNK)
            parts, carry = [head], b""
            sizes = [size + (end if chunk else 0)]
            chunk = chunk[end:] if chunk else b""
        else:
            parts, sizes = [], []
        if chunk:
            buf = carry + chunk
            more = buf.splitlines(True) if universal else io.BytesIO(buf).readlines()
            carry = more.pop() if not more[-1].endswith(b"\n") else b""  # a last \r may be half of \r\n
            parts += more
            sizes += map(len, more)
        elif not parts:
            if not carry:
                return
            parts, sizes, carry = [carry[:MAX_RECORD_BYTES]], [len(carry)], b""
        for data, size in zip(parts, sizes):
            number += 1
            if number == 1 and data.startswith(codecs.BOM_UTF8):
                data, size = data[len(codecs.BOM_UTF8) :], size - len(codecs.BOM_UTF8)
            cut = size > MAX_RECORD_BYTES
            if cut:
                data = data[:MAX_RECORD_BYTES]
            try:
                text, bad = data.decode("utf-8"), None
            except UnicodeDecodeError as e:
                text, bad = data.decode("utf-8", "surrogateescape"), e.start
            yield _Line(number, text, bad, size, cut)


def _as_written(text: str) -> str:
    """Text as it was in the file, with undecodable bytes shown as \\xNN (so it can be stored and printed)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _too_long(location: str, number: int, start: str, size: int) -> RawRecord:
    """An over-long record, set aside with the start of its content."""
    return RawRecord(
        location,
        number,
        None,
        _as_written(start[:RAW_KEPT]).rstrip("\r\n") + " [...]",
        (
            "record too long",
            f"{location}: {size} bytes, over the {MAX_RECORD_BYTES} a record may hold; "
            f"its first {RAW_KEPT} characters are kept here. Fix: shorten or split the text",
        ),
        size,
    )


# ---- CSV ----------------------------------------------------------------------------------------------------
_DELIMITERS = (",", "\t", ";", "|")


def _delimiter(header: str, suffix: str) -> str:
    """Tab for .tsv; else the most frequent of , TAB ; | in the header line (a comma when none occurs)."""
    if suffix == ".tsv":
        return "\t"
    counts = {d: header.count(d) for d in _DELIMITERS}
    best = max(_DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] else ","


class _RecordTooLong(Exception):
    """The record being read has run past MAX_RECORD_BYTES."""


class _Feed:
    """The csv module's input: lines from a source with push-back, remembering those of the record being
    read, so a bad record can be reported and its later lines read again as records of their own."""

    def __init__(self, lines: Iterator[_Line]):
        self._lines, self._back = lines, collections.deque[_Line]()
        self.taken: list[_Line] = []
        self._size = 0

    def __iter__(self) -> _Feed:
        return self

    def __next__(self) -> str:
        line = self._back.popleft() if self._back else next(self._lines)
        self.taken.append(line)
        self._size += line.size
        if line.cut or self._size > MAX_RECORD_BYTES:
            raise _RecordTooLong
        return line.text

    def take(self) -> list[_Line]:
        """The lines of the record just read; the next record starts after them."""
        taken, self.taken, self._size = self.taken, [], 0
        return taken

    def read_again(self, lines: list[_Line]) -> None:
        self._back.extendleft(reversed(lines))


def read_csv(path: Path) -> Records:
    """The header's column names and every record after it; blank lines are skipped."""
    f = open(path, "rb")  # noqa: SIM115 (the records iterator closes it)
    try:
        lines = _lines(f, universal=True)
        first = next((line for line in lines if line.text.strip()), None)
        if first is None:
            raise FileUnreadable("the file is empty (no header line)")
        if first.bad is not None:
            raise FileUnreadable(f"the header (line {first.number}) is not UTF-8 (byte {first.bad + 1})")
        if first.cut:
            raise FileUnreadable(f"the header (line {first.number}) is over {MAX_RECORD_BYTES} bytes")
        delim = _delimiter(first.text, path.suffix.lower())
        csv.field_size_limit(max(csv.field_size_limit(), MAX_RECORD_BYTES))
        try:
            header = next(csv.reader([first.text], delimiter=delim, strict=True))
        except csv.Error as e:
            raise FileUnreadable(f"the header (line {first.number}) cannot be parsed: {e}") from None
    except BaseException:
        f.close()
        raise
    header = [h.strip() for h in header]
    return Records(header, _csv_records(f, lines, header, delim))


def _csv_records(f: BinaryIO, lines: Iterator[_Line], header: list[str], delim: str) -> Iterator[RawRecord]:
    """Records after the header. After a bad record the parser restarts on the line after the record's
    FIRST line, so an unclosed quote costs one line, not the rest of the file (nor more than
    MAX_RECORD_BYTES of memory: a record running longer is taken as an unclosed quote)."""
    with f:
        feed = _Feed(lines)
        reader = csv.reader(feed, delimiter=delim, strict=True)
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except (csv.Error, _RecordTooLong) as e:
                taken = feed.take()
                if isinstance(e, _RecordTooLong) and len(taken) == 1:
                    yield _too_long(f"line {taken[0].number}", taken[0].number, taken[0].text, taken[0].size)
                else:
                    runs_on = len(taken) > 1 or "end of data" in str(e)
                    if not runs_on and taken[0].bad is None and _is_json_object(taken[0].text):
                        yield _bad_csv(
                            taken[0], "JSON line in a CSV file", "a JSON object, not a row of the CSV's columns"
                        )
                    else:
                        why = "a quote opened on this line is never closed" if runs_on else f"bad quoting ({e})"
                        yield _bad_csv(taken[0], "unreadable row", why)
                    feed.read_again(taken[1:])
                reader = csv.reader(feed, delimiter=delim, strict=True)
                continue
            taken = feed.take()
            if not fields:  # a blank line
                continue
            first = taken[0]
            if len(taken) == 1 and first.bad is None and _is_json_object(first.text, fields):
                yield _bad_csv(first, "JSON line in a CSV file", "a JSON object, not a row of the CSV's columns")
                continue
            if len(taken) == 1 and first.bad is None and len(fields) == len(header):  # the common case, fast
                yield RawRecord(
                    f"line {first.number}",
                    first.number,
                    dict(zip(header, fields)),
                    first.text.rstrip("\r\n"),
                    None,
                    first.size,
                )
                continue
            broken = next((line for line in taken if line.bad is not None), None)
            if broken is not None and broken.bad is not None:
                yield _bad_csv(
                    taken[0], "not UTF-8", f"byte {broken.bad + 1} of line {broken.number} is not UTF-8", taken
                )
            elif len(fields) != len(header):
                yield _bad_csv(taken[0], "unreadable row", f"{len(fields)} fields where the header has {len(header)}")
                if len(taken) > 1:  # a quote opened on this line swallowed the next ones: re-read them
                    feed.read_again(taken[1:])
                    reader = csv.reader(feed, delimiter=delim, strict=True)
            else:
                raw = taken[0].text if len(taken) == 1 else "".join(line.text for line in taken)
                yield RawRecord(
                    f"line {taken[0].number}",
                    taken[0].number,
                    dict(zip(header, fields)),
                    raw.rstrip("\r\n"),
                    None,
                    sum(line.size for line in taken),
                )


def _is_json_object(line: str, fields: list[str] | None = None) -> bool:
    """Whether a CSV line is a JSON object (a JSON line pasted into a CSV file), which the csv module would
    otherwise split at its commas into fields of garbage. `fields`, when given, spares the parse for the
    usual line, whose first field does not start with '{'."""
    if fields is not None and not fields[0].lstrip().startswith("{"):
        return False
    if not line.lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, RecursionError):
        return False


def _bad_csv(first: _Line, reason: str, why: str, lines: list[_Line] | None = None) -> RawRecord:
    fix = {
        "not UTF-8": "save the file as UTF-8",
        "JSON line in a CSV file": "write it as a CSV row, or put JSON records in a .jsonl file of their own",
    }.get(reason, 'quote fields that hold the delimiter or a line break ("a, b"), and double quotes inside them ("")')
    lines = lines or [first]
    return RawRecord(
        f"line {first.number}",
        first.number,
        None,
        _as_written("".join(line.text for line in lines)).rstrip("\r\n"),
        (reason, f"line {first.number}: {why}. Fix: {fix}"),
        sum(line.size for line in lines),
    )


# ---- JSON ---------------------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> Records:
    """One JSON object per line (or, when the file starts with '[', one JSON array of objects, streamed).

    The columns are the keys of the objects, known only once every record is read (columns None)."""
    f = open(path, "rb")  # noqa: SIM115 (the records iterator closes it)
    try:
        array = _first_byte(f) == b"["
    except BaseException:
        f.close()
        raise
    return Records(None, _json_array(f) if array else _json_lines(f))


def _first_byte(f: BinaryIO) -> bytes:
    """The first byte that is not whitespace (b'' for none); the file is left at its start."""
    while chunk := f.read(_CHUNK):
        stripped = chunk.lstrip()
        if stripped:
            f.seek(0)
            return stripped[:1]
    f.seek(0)
    return b""


def _json_lines(f: BinaryIO) -> Iterator[RawRecord]:
    with f:
        for line in _lines(f, universal=False):
            if line.cut:
                yield _too_long(f"line {line.number}", line.number, line.text, line.size)
            elif line.text.strip():
                yield _json_line(line)


def _json_line(line: _Line) -> RawRecord:
    k, text = line.number, line.text.rstrip("\n")
    if line.bad is not None:
        return RawRecord(
            f"line {k}",
            k,
            None,
            _as_written(text),
            ("not UTF-8", f"line {k}: byte {line.bad + 1} is not UTF-8. Fix: save the file as UTF-8"),
            line.size,
        )
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        return RawRecord(
            f"line {k}",
            k,
            None,
            text.rstrip("\r"),
            ("broken JSON line", f"line {k}: not JSON ({e}). Fix: write one JSON object per line"),
            line.size,
        )
    return _json_record(f"line {k}", k, text.rstrip("\r"), value, line.size)


def _json_record(location: str, k: int, raw: str, value: Any, size: int) -> RawRecord:
    if not isinstance(value, dict):
        return RawRecord(
            location,
            k,
            None,
            raw,
            (
                "broken JSON line",
                f'{location}: a JSON {type(value).__name__}, not an object. Fix: write each record as {{"text": ...}}',
            ),
            size,
        )
    return RawRecord(location, k, {str(key): v for key, v in value.items()}, raw, None, size)


def _json_array(f: BinaryIO) -> Iterator[RawRecord]:
    """The elements of one JSON array, decoded one at a time from a buffer of at most MAX_RECORD_BYTES plus
    one read (an element longer than that, or anything but a valid array, makes the file unreadable)."""

    def broken(why: str) -> FileUnreadable:
        return FileUnreadable(f"it starts with '[' but is not one valid JSON array ({why})")

    decoder, text = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8")()
    buf, pos, eof = "", 0, False

    def more() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        chunk = f.read(_CHUNK)
        eof = not chunk
        try:
            buf, pos = buf[pos:] + text.decode(chunk, final=eof), 0
        except UnicodeDecodeError as e:
            raise broken(f"not UTF-8: {e.reason}") from None
        return True

    def skip_space() -> str:
        """The next character that is not whitespace ('' at the end of the file)."""
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or not more():
                return buf[pos : pos + 1]

    with f:
        if skip_space() != "[":
            raise broken("no '['")
        pos += 1
        k = 0
        while True:
            c = skip_space()
            if not c:
                raise broken("it is never closed")
            if c == "]":
                pos += 1
                if skip_space():
                    raise broken(f"text after the closing ']' (element {k})")
                return
            if k:
                if c != ",":
                    raise broken(f"expected ',' or ']' after element {k}, found {c!r}")
                pos += 1
                if not skip_space():
                    raise broken("it is never closed")
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or eof:  # a number at the end of the buffer may go on in the next read
                        break
                except json.JSONDecodeError as e:
                    if eof or len(buf) - pos > MAX_RECORD_BYTES:
                        raise broken(
                            f"element {k + 1}: {e}" if eof else f"element {k + 1} is over {MAX_RECORD_BYTES} bytes"
                        ) from None
                except RecursionError:
                    raise broken(f"element {k + 1} is nested too deeply") from None
                more()
            k += 1
            raw = buf[pos:end]
            pos = end
            yield _json_record(f"row {k}", k, raw, value, len(raw))


# ---- Parquet ------------------------------------------------------------------------------------------------
_PARQUET_BATCH = 1024


def read_parquet(path: Path) -> Records:
    """Every row, a record batch at a time; binary cells are decoded as UTF-8 (a row whose bytes are not
    UTF-8 comes back as a problem)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise FileUnreadable(str(e).splitlines()[0]) from None
    return Records(list(pf.schema_arrow.names), _parquet_rows(pf))


def _parquet_rows(pf: Any) -> Iterator[RawRecord]:
    import pyarrow as pa

    k = 0
    try:
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH):
            for values in batch.to_pylist():
                k += 1
                yield _parquet_record(k, values)
    except pa.ArrowException as e:
        raise FileUnreadable(f"row {k + 1}: {str(e).splitlines()[0]}") from None
    finally:
        pf.close()


def _parquet_record(k: int, values: dict[str, Any]) -> RawRecord:
    problem, size = None, 0
    for name, v in values.items():
        if isinstance(v, (bytes, bytearray)):
            try:
                values[name] = bytes(v).decode("utf-8")
            except UnicodeDecodeError as e:
                values[name] = bytes(v).decode("utf-8", "backslashreplace")
                problem = problem or (
                    "not UTF-8",
                    f"row {k}: column '{name}' byte {e.start + 1} is not UTF-8. Fix: write the column as UTF-8 strings",
                )
        if isinstance(values[name], str):
            size += len(values[name])
    if size > MAX_RECORD_BYTES:
        return _too_long(f"row {k}", k, json.dumps(values, default=str, ensure_ascii=False)[:RAW_KEPT], size)
    if problem:
        return RawRecord(f"row {k}", k, None, json.dumps(values, default=str, ensure_ascii=False), problem, size)
    return RawRecord(f"row {k}", k, values, None, None, size)


READERS = {"csv": read_csv, "jsonl": read_jsonl, "parquet": read_parquet}
