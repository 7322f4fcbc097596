"""Read a job's data file (CSV, JSONL or Parquet) into columns, with errors that name the file and column."""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import duckdb

from freeal_stream.config import DataConfig

_READERS = {"csv": "read_csv", "jsonl": "read_json", "parquet": "read_parquet"}
_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
             ".parquet": "parquet", ".pq": "parquet"}


class DataError(ValueError):
    """The data file cannot be read as the job describes it."""


@dataclass
class Batch:
    ids: list[str]
    texts: list[str]
    views: list[str | None]
    golds: list[str | None]
    hashes: list[str]
    skipped_empty: int
    ids_from_rows: bool = False   # no id column: ids are row numbers, unique only within this file


def content_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def detect_format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: cannot tell the format from the suffix '{path.suffix}'. "
                        "Fix: set data.format to csv, jsonl or parquet in the job file")
    return fmt


def read_items(cfg: DataConfig, optional: frozenset[str] = frozenset()) -> Batch:
    """Read the whole file; empty texts are skipped and counted, duplicate ids are an error.

    `optional` names column settings (e.g. 'gold_column') that a file may lack: later files dropped into
    a service's inbox need only the text.
    """
    path = Path(cfg.path)
    if not path.exists():
        raise DataError(f"{path}: data file not found. Fix: check data.path (relative to the job file)")
    fmt = detect_format(path, cfg.format)
    con = duckdb.connect()
    opts = ", all_varchar = true" if fmt == "csv" else ""
    try:
        rel = con.execute(f"SELECT * FROM {_READERS[fmt]}($p{opts})", {"p": str(path)})
        columns = [d[0] for d in rel.description]
        rows = rel.fetchall()
    except duckdb.Error as e:
        raise DataError(f"{path}: cannot be read as {fmt}: {e}".splitlines()[0]
                        + " Fix: check the file, or set data.format") from None
    finally:
        con.close()
    wanted = {"text_column": cfg.text_column, "id_column": cfg.id_column,
              "augmented_column": cfg.augmented_column, "gold_column": cfg.gold_column}
    for field, col in wanted.items():
        if col is not None and col not in columns and field in optional:
            cfg = dataclasses.replace(cfg, **{field: None})
        elif col is not None and col not in columns:
            raise DataError(f"{path}: no column '{col}' (data.{field}); the file has {columns}. "
                            f"Fix: set data.{field} to one of those")
    pos = {c: i for i, c in enumerate(columns)}

    def col(name: str | None, row: tuple) -> str | None:
        if name is None or row[pos[name]] is None:
            return None
        return str(row[pos[name]])

    out = Batch([], [], [], [], [], 0, ids_from_rows=cfg.id_column is None)
    seen: dict[str, int] = {}
    for n, row in enumerate(rows):
        text = col(cfg.text_column, row)
        if text is None or not text.strip():
            out.skipped_empty += 1
            continue
        item_id = col(cfg.id_column, row) if cfg.id_column else f"row-{n}"
        if item_id is None:
            raise DataError(f"{path}: row {n + 1} has an empty id in column '{cfg.id_column}'. "
                            "Fix: give every row an id, or drop data.id_column to number rows")
        if item_id in seen:
            raise DataError(f"{path}: id '{item_id}' appears twice (rows {seen[item_id] + 1} and {n + 1}). "
                            "Fix: make ids unique")
        seen[item_id] = n
        out.ids.append(item_id)
        out.texts.append(text)
        out.views.append(col(cfg.augmented_column, row))
        out.golds.append(col(cfg.gold_column, row))
        out.hashes.append(content_hash(text))
    return out
