"""Data files and posted items -> batches of items, with every bad row quarantined or flagged, never lost.

The policy (README, "Bad input"): what makes a whole file unusable (missing, unreadable format, the text or
id column absent, no gold value in the class list) is a `DataError` naming the file, the column and the fix,
and nothing is stored. A bad row (unparsable, not UTF-8, empty text or id, an id reused with another text)
is quarantined: kept with its raw content, location and reason, and not labelled. A usable row with a
caveat (a text over `data.max_text_chars`, a gold label outside the classes) is stored and flagged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from freeal_stream.config import DataConfig
from freeal_stream.errors import UserError
from freeal_stream.readers import READERS, FileUnreadable, RawRecord, Records

_SUFFIXES = {
    ".csv": "csv",
    ".tsv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


MAX_LISTED_PROBLEMS = 50  # quarantined/flagged items named in one POST /items answer (all are stored)


class DataError(UserError):
    """The data file cannot be read as the job describes it."""


Action = Literal["quarantined", "flagged"]


@dataclass(frozen=True)
class Problem:
    """A row quarantined (not stored as an item) or flagged (stored, with a caveat), as `status` lists it."""

    action: Action
    reason: str  # a short category, counted by status
    detail: str  # names the row and the field, and the fix
    location: str  # "line 7", "row 7", "items[2]"
    line: int | None
    raw: str
    item_id: str | None = None

    def as_row(self) -> tuple[Any, ...]:
        """The store's column order (plain values: it crosses to the store actor)."""
        return (self.location, self.line, self.action, self.reason, self.detail, self.item_id, self.raw)


@dataclass
class Batch:
    ids: list[str]
    texts: list[str]
    views: list[str | None]
    golds: list[str | None]
    hashes: list[str]
    records: list[RawRecord] = field(default_factory=list)  # each item's row, for a quarantine found later
    problems: list[Problem] = field(default_factory=list)
    duplicates: int = 0  # rows repeating an earlier row's id and text: nothing new, skipped
    ids_from_rows: bool = False  # no id column: ids are row numbers, unique only within this file

    @property
    def quarantined(self) -> int:
        return sum(p.action == "quarantined" for p in self.problems)

    @property
    def flagged(self) -> int:
        return sum(p.action == "flagged" for p in self.problems)

    @property
    def skipped_empty(self) -> int:
        return sum(p.reason == "empty text" for p in self.problems)

    def quarantine_ids(self, ids: Iterable[str], reason: str, why: str) -> None:
        """Move the items with these ids out of the batch into its quarantined problems, each located and shown
        as its row was (a file's line as written)."""
        drop = set(ids)
        keep = [k for k, i in enumerate(self.ids) if i not in drop]
        for k in (k for k, i in enumerate(self.ids) if i in drop):
            r = self.records[k]
            self.problems.append(
                Problem(
                    "quarantined",
                    reason,
                    f"{r.location}: id '{self.ids[k]}' {why}",
                    r.location,
                    r.line,
                    _raw_of(r),
                    self.ids[k],
                )
            )
        for name in ("ids", "texts", "views", "golds", "hashes", "records"):
            setattr(self, name, [getattr(self, name)[k] for k in keep])

    def problem_counts(self) -> Counter[tuple[str, str]]:
        """Rows per (action, reason): what `summary_of` describes (sum them over a file's batches)."""
        return Counter((p.action, p.reason) for p in self.problems)


def summary_of(counts: Counter[tuple[str, str]]) -> str:
    """'3 quarantined (empty text 2, not UTF-8 1); 1 flagged (long text 1)', or '' when nothing was."""
    return describe_counts([{"action": a, "reason": r, "count": n} for (a, r), n in counts.items()])


def describe_counts(counts: Sequence[dict[str, Any]]) -> str:
    """Rows per {action, reason, count} in one line (as a batch's or the store's are reported), '' if none."""
    parts = []
    for action in ("quarantined", "flagged"):
        mine = sorted((c for c in counts if c["action"] == action), key=lambda c: c["reason"])
        if mine:
            parts.append(
                f"{sum(c['count'] for c in mine)} {action} ("
                + ", ".join(f"{c['reason']} {c['count']}" for c in mine)
                + ")"
            )
    return "; ".join(parts)


@dataclass(frozen=True)
class Columns:
    """Which field of a record holds what (the job's data columns, or the API's item fields)."""

    text: str
    id: str | None = None
    view: str | None = None
    gold: str | None = None


def content_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def hash_id(content_hash: str) -> str:
    """The id of an item that came without one: the same text always gets the same id."""
    return f"h-{content_hash[:16]}"


def detect_format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: cannot tell the format from the suffix '{path.suffix}'. "
            "Fix: set data.format to csv, jsonl or parquet in the job file"
        )
    return fmt


def _cell(values: dict[str, Any], name: str | None, where: str) -> str | None:
    """A field as text (numbers are written out); raises TypeError naming the field for lists, objects..."""
    if name is None:
        return None
    v = values.get(name)
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise TypeError(f"{where}: field '{name}' is a {type(v).__name__}, not a string. Fix: write it as a string")


def truncation_note(text: str, max_chars: int) -> str:
    return (
        f"the text has {len(text)} characters, over data.max_text_chars = {max_chars}: it is stored whole, "
        f"the LLM sees its first {max_chars} characters (cut back to a word boundary) and the small model "
        "its first slm.max_length tokens"
    )


def build_batch(
    records: Iterable[RawRecord],
    cols: Columns,
    *,
    max_text_chars: int,
    class_names: Sequence[str] | None,
    default_id: Callable[[int, str], str],
    ids_from_rows: bool = False,
    ids_optional: bool = False,
    start: int = 0,
) -> Batch:
    """Check each record and sort it into the batch, its quarantined rows and its flagged rows.

    Within a batch the first row with an id wins: the same id and text again is a plain duplicate (skipped),
    the same id with another text is quarantined (across the batches of a file the store does the same).
    `default_id(n, hash)` names rows without an id column (n counts records from `start`), and with
    `ids_optional` (API items) also rows that give none; a blank id is always quarantined.
    """
    out = Batch([], [], [], [], [], ids_from_rows=ids_from_rows)
    classes = _class_keys(class_names)
    seen: dict[str, tuple[str, str]] = {}  # id -> (hash, location of its first row)

    def problem(r: RawRecord, action: Action, reason: str, detail: str, item_id: str | None = None) -> None:
        out.problems.append(Problem(action, reason, detail, r.location, r.line, _raw_of(r), item_id))

    for n, r in enumerate(records, start):
        if r.values is None:
            reason, detail = r.problem or ("unreadable row", f"{r.location}: cannot be read")
            problem(r, "quarantined", reason, detail)
            continue
        try:
            text = _cell(r.values, cols.text, r.location)
            given_id = _cell(r.values, cols.id, r.location)
            view, gold = _cell(r.values, cols.view, r.location), _cell(r.values, cols.gold, r.location)
        except TypeError as e:
            problem(r, "quarantined", "bad field type", str(e))
            continue
        if text is None or not text.strip():
            problem(
                r,
                "quarantined",
                "empty text",
                f"{r.location}: field '{cols.text}' is empty or blank. Fix: give the row a text, or drop it",
            )
            continue
        h = content_hash(text)
        blank_id = given_id is not None and not given_id.strip()
        if blank_id or (cols.id is not None and given_id is None and not ids_optional):
            problem(
                r,
                "quarantined",
                "empty id",
                f"{r.location}: field '{cols.id}' is empty. Fix: give every row "
                "an id, or drop data.id_column to number rows",
            )
            continue
        item_id = given_id if given_id is not None else default_id(n, h)
        first = seen.get(item_id)
        if first is not None:
            if first[0] == h:
                out.duplicates += 1
            else:
                problem(
                    r,
                    "quarantined",
                    "id reused with another text",
                    f"{r.location}: id '{item_id}' was first used by {first[1]} with a different text; the "
                    "first is kept. Fix: give changed texts new ids",
                    item_id,
                )
            continue
        seen[item_id] = (h, r.location)
        if gold is not None and classes:
            known = classes.get(_class_key(gold))
            if known is None:
                problem(
                    r,
                    "flagged",
                    "unknown gold label",
                    f"{r.location}: gold label '{gold}' (field "
                    f"'{cols.gold}') is not one of {list(classes.values())}; it is dropped, so it never counts "
                    "in accuracy. Fix: correct the label, or the class names in task.classes",
                    item_id,
                )
            gold = known
        if len(text) > max_text_chars:
            problem(r, "flagged", "long text", f"{r.location}: {truncation_note(text, max_text_chars)}", item_id)
        out.ids.append(item_id)
        out.texts.append(text)
        out.views.append(view)
        out.golds.append(gold)
        out.hashes.append(h)
        out.records.append(r)
    return out


def _raw_of(r: RawRecord) -> str:
    """A row's content as written (a file's line), or as JSON where there is none (an API item)."""
    return r.raw if r.raw is not None else json.dumps(r.values, default=str, ensure_ascii=False)


BATCH_ROWS = 10_000  # records per batch read from a file...
BATCH_BYTES = 8 << 20  # ...or fewer, once their bytes in the file reach this


def read_batches(
    cfg: DataConfig,
    optional: frozenset[str] = frozenset(),
    class_names: Sequence[str] | None = None,
    *,
    rows: int | None = BATCH_ROWS,
    max_bytes: int | None = BATCH_BYTES,
) -> Iterator[Batch]:
    """The file in batches of at most `rows` records (or `max_bytes` of them), bad rows quarantined or flagged
    (see the module's policy); None = no limit. Memory is bounded by a batch, not the file.

    Everything that refuses the whole file is checked before the first batch, so a refused file stores
    nothing: the header or schema, and where the answer needs every row (a JSON file's keys, gold values
    against the classes), a first pass over the file that keeps nothing. `optional` names column settings
    (e.g. 'gold_column') that a file may lack: later files dropped into a service's inbox need only the text.
    """
    path = Path(cfg.path)
    if not path.exists():
        raise DataError(f"{path}: data file not found. Fix: check data.path (relative to the job file)")
    fmt = detect_format(path, cfg.format)
    cols = _check_file(path, fmt, cfg, optional, class_names)
    with contextlib.closing(_open(path, fmt)) as records:
        start = 0
        for chunk in _chunks(records.rows, rows, max_bytes, lambda e: _unreadable(path, fmt, e)):
            yield build_batch(
                chunk,
                cols,
                max_text_chars=cfg.max_text_chars,
                class_names=class_names,
                default_id=lambda n, _h: f"row-{n}",
                ids_from_rows=cols.id is None,
                start=start,
            )
            start += len(chunk)


def read_items(
    cfg: DataConfig, optional: frozenset[str] = frozenset(), class_names: Sequence[str] | None = None
) -> Batch:
    """The whole file as one batch (`read_batches` without limits): for small files, tests and benchmarks."""
    return next(
        read_batches(cfg, optional, class_names, rows=None, max_bytes=None),
        Batch([], [], [], [], [], ids_from_rows=cfg.id_column is None),
    )


def _unreadable(path: Path, fmt: str, e: Exception) -> DataError:
    return DataError(f"{path}: cannot be read as {fmt}: {e}. Fix: check the file, or set data.format")


def _open(path: Path, fmt: str) -> Records:
    try:
        return READERS[fmt](path)
    except (FileUnreadable, OSError) as e:
        raise _unreadable(path, fmt, e) from None


def _chunks(
    records: Iterator[RawRecord], rows: int | None, max_bytes: int | None, unreadable: Callable[[Exception], DataError]
) -> Iterator[list[RawRecord]]:
    chunk: list[RawRecord] = []
    size = 0
    try:
        for r in records:
            chunk.append(r)
            size += r.size
            if (rows is not None and len(chunk) >= rows) or (max_bytes is not None and size >= max_bytes):
                yield chunk
                chunk, size = [], 0
    except (FileUnreadable, OSError) as e:  # found past the first pass (a Parquet page gone bad)
        raise unreadable(e) from None
    if chunk:
        yield chunk


def _check_file(
    path: Path, fmt: str, cfg: DataConfig, optional: frozenset[str], class_names: Sequence[str] | None
) -> Columns:
    """Which columns to read, after every check that refuses the file as a whole (DataError)."""
    wanted = {
        "text_column": cfg.text_column,
        "id_column": cfg.id_column,
        "augmented_column": cfg.augmented_column,
        "gold_column": cfg.gold_column,
    }
    classes = _class_keys(class_names)
    with contextlib.closing(_open(path, fmt)) as records:
        columns = records.columns
        scan = None
        gold = cfg.gold_column if classes and (columns is None or cfg.gold_column in columns) else None
        if columns is None or gold is not None:
            try:  # a file with a header (CSV, Parquet) is scanned only until its first gold value of a class
                scan = _scan(
                    records.rows,
                    set(c for c in wanted.values() if c),
                    gold,
                    classes,
                    until_known_gold=columns is not None,
                )
            except (FileUnreadable, OSError) as e:
                raise _unreadable(path, fmt, e) from None
            if columns is None:
                if scan.records and not scan.keys:
                    raise _unreadable(path, fmt, FileUnreadable(f"no line is a JSON object ({scan.first_problem})"))
                columns = scan.keys
    present = {}
    for setting, col in wanted.items():
        if col is not None and col not in columns and setting not in optional:
            raise DataError(f"{path}: no column '{col}' (data.{setting}); " + _columns_and_fix(columns, setting))
        present[setting] = col if col in columns else None
    cols = Columns(
        text=cfg.text_column, id=present["id_column"], view=present["augmented_column"], gold=present["gold_column"]
    )
    if scan is not None and cols.gold is not None and scan.unknown_golds and not scan.known_gold:
        raise DataError(
            f"{path}: none of the {scan.unknown_golds} values of column '{cols.gold}' (data.gold_column) "
            f"is a class of task.classes (first: {scan.first_unknown!r}). Fix: make task.classes' names "
            "the labels the file uses, or set data.gold_column to the right column (or remove it)"
        )
    return cols


_SHOWN_KEYS = 50  # columns a JSON file's first pass remembers for an error message (any number is checked)


@dataclass
class _Scan:
    """What a first pass over a file found (it keeps nothing else)."""

    records: int = 0
    keys: list[str] = field(default_factory=list)  # the wanted columns seen, then others, in order seen
    first_problem: str = "no JSON object"
    unknown_golds: int = 0
    known_gold: bool = False
    first_unknown: str | None = None


def _scan(
    records: Iterator[RawRecord],
    wanted: set[str],
    gold: str | None,
    classes: dict[str, str],
    *,
    until_known_gold: bool = False,
) -> _Scan:
    """The first pass. A JSON file is read to its end (its keys, and a broken JSON array, show only there); a file
    with a header may stop at its first gold value of a class, as then nothing left can refuse the file."""
    out = _Scan()
    seen: set[str] = set()
    for r in records:
        out.records += 1
        if r.values is None:
            if out.records == 1 and r.problem:
                out.first_problem = r.problem[1]
            continue
        for key in r.values:
            if key not in seen and (key in wanted or len(seen) < _SHOWN_KEYS):
                seen.add(key)
                out.keys.append(key)
        value = r.values.get(gold) if gold is not None else None
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and classes:
            if _class_key(str(value)) in classes:
                out.known_gold = True
                if until_known_gold:
                    return out
            else:
                out.unknown_golds += 1
                out.first_unknown = out.first_unknown or str(value)
    return out


_PLAIN_NAME = re.compile(r"[\w .()\[\]#%&+,'-]{1,64}")


def _columns_and_fix(columns: Sequence[str], setting: str) -> str:
    """The file's column names and the fix for an error, unless they do not look like names: a file that is
    not a data file at all (a password file, a key) must not have its first line quoted back."""
    if columns and all(_PLAIN_NAME.fullmatch(c) for c in columns):
        return f"the file has {list(columns)}. Fix: set data.{setting} to one of those"
    return (
        f"the file's first line does not look like a header of column names ({len(columns)} field(s), not "
        "shown). Fix: check that the path names a data file with a header line"
    )


def _class_key(name: str) -> str:
    """How a gold label is matched to a class name: case- and space-insensitively."""
    return name.strip().casefold()


def _class_keys(class_names: Sequence[str] | None) -> dict[str, str]:
    return {_class_key(c): c for c in class_names or ()}
