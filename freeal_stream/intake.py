"""Every way data comes in (the job's file at `run`, `ingest`, the service's inbox, POST /items) as one path:
read or check the rows, store the good ones, record the quarantined and flagged ones (never lose a row).

Kept apart from `session` and `serve` so that reading data needs neither Ray nor the models.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from freeal_stream.config import DataConfig, JobConfig
from freeal_stream.progress import Progress
from freeal_stream.readers import RawRecord
from freeal_stream.sources import (
    MAX_LISTED_PROBLEMS,
    Batch,
    Columns,
    Problem,
    build_batch,
    content_hash,
    hash_id,
    read_batches,
    summary_of,
)


def add_batch(store: Any, batch: Batch, source: str) -> int:
    """Add a batch's items and record its quarantined and flagged rows; returns how many items were added.

    An id already stored with a different text is quarantined (moved into `batch.problems`), the stored item
    kept: changing a stored text would change what its label means. The problems are recorded first, so a
    crash between the two writes loses nothing a retry (deduplicated on both sides) would not redo.
    """
    clash = store.conflicting_ids(batch.ids, batch.hashes)
    if clash:
        batch.quarantine_ids(
            clash,
            "id reused with another text",
            "is already stored with a different text; the stored one is kept. Fix: give changed texts new ids",
        )
    store.add_problems(source, [p.as_row() for p in batch.problems])
    return store.add_items(batch.ids, batch.texts, batch.views, batch.golds, batch.hashes)


T = TypeVar("T")


def written(batches: Iterable[Batch], write: Callable[[Batch], T]) -> Iterator[tuple[Batch, T]]:
    """Each batch with what `write(batch)` returned, in order, the next batch read while one thread writes the
    last: a write waits on DuckDB or the store actor, which run outside Python's lock, so reading and storing
    overlap (on 2 cores, ingest takes about the longer of the two instead of their sum). Writes run one at a
    time, in file order, so each sees every earlier batch stored; at most two batches are held."""
    with ThreadPoolExecutor(1, thread_name_prefix="batch-writer") as writer:
        pending: tuple[Batch, Future[T]] | None = None
        for batch in batches:
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = batch, writer.submit(write, batch)
        if pending is not None:
            yield pending[0], pending[1].result()


def ingest(job: JobConfig, store: Any, progress: Progress) -> int:
    """Load the job's data file into the store, a batch at a time; items already there (same id or same text)
    are kept."""
    added, problems = 0, Counter[tuple[str, str]]()
    batches = read_batches(job.data, class_names=job.task.class_names)
    for batch, got in written(batches, lambda b: add_batch(store, b, job.data.path)):
        added += got
        problems += batch.problem_counts()
    msg = f"ingested {added} new items ({store.count_items()} in the store)"
    if problems:
        msg += f"; {summary_of(problems)}: list them with `freeal-stream quarantine {job.source_file}`"
    progress.say(msg)
    return added


def read_data_batches(job: JobConfig, path: Path) -> Iterator[Batch]:
    """A dropped file, read with the job's column settings (only the text column is required); without an
    id column, ids are content hashes (row numbers would collide with the rows of earlier files)."""
    for batch in read_batches(
        dataclasses.replace(job.data, path=str(path), format="auto"),
        optional=frozenset({"id_column", "gold_column", "augmented_column"}),
        class_names=job.task.class_names,
    ):
        if batch.ids_from_rows:
            batch.ids = [hash_id(h) for h in batch.hashes]
        yield batch


def ingest_data_file(store: Any, job: JobConfig, path: Path, say: Callable[[str], None] | None = None) -> int:
    """An inbox file into the store, a batch at a time (a file-level DataError, raised before the first
    batch, propagates: the inbox moves the file to failed/)."""
    added, problems = 0, Counter[tuple[str, str]]()
    for batch, got in written(read_data_batches(job, path), lambda b: add_batch(store, b, path.name)):
        added += got
        problems += batch.problem_counts()
    if problems and say is not None:
        say(f"{path.name}: {summary_of(problems)} (see `freeal-stream quarantine`)")
    return added


_API_COLUMNS = Columns(text="text", id="id", view="view", gold="gold")


def batch_from_items(
    items: list[dict[str, Any]], data: DataConfig | None = None, class_names: Sequence[str] | None = None
) -> Batch:
    """API items as a batch, checked as file rows are; an item without an id is named by its text's hash
    (the same text, the same id). Problems are located by the item's id, which the client knows."""
    records = [RawRecord(f"id '{_item_id(it)}'", k, it) for k, it in enumerate(items)]  # raw: built if a problem
    limit = data.max_text_chars if data else DataConfig.max_text_chars
    return build_batch(
        records,
        _API_COLUMNS,
        max_text_chars=limit,
        class_names=class_names,
        default_id=lambda _n, h: hash_id(h),
        ids_optional=True,
    )


def _item_id(item: dict[str, Any]) -> str:
    return str(item["id"]) if item.get("id") is not None else hash_id(content_hash(str(item.get("text"))))


def add_api_items(store: Any, job: JobConfig, items: list[dict[str, Any]]) -> dict[str, Any]:
    """POST /items' valid items into the store; answers with counts and the first problems (all are stored)."""
    batch = batch_from_items(items, job.data, job.task.class_names)
    added = add_batch(store, batch, "POST /items")
    listed = [
        {"location": p.location, "action": p.action, "reason": p.reason, "detail": p.detail}
        for p in batch.problems[:MAX_LISTED_PROBLEMS]
    ]
    return {
        "received": len(items),
        "added": added,
        "duplicates": len(items) - added - batch.quarantined,
        "quarantined": batch.quarantined,
        "flagged": batch.flagged,
        "problems": listed,
    }


def quarantine_rows(store: Any, rows: list[dict[str, Any]], source: str) -> None:
    """Record items the API refused, or rows a client's `ingest` set aside in its file, under `source`."""
    problems = [
        Problem("quarantined", str(r["reason"]), str(r["detail"]), str(r["location"]), r.get("line"), str(r["raw"]))
        for r in rows
    ]
    store.add_problems(source, [p.as_row() for p in problems])
