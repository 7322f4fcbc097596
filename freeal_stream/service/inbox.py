"""An inbox folder a running service watches for new unlabelled data files.

Drop a file into the inbox and, once it has stopped changing, the service ingests it and moves it to
``done/``; a file that cannot be ingested goes to ``failed/`` next to a ``<name>.error.txt`` note saying
why and how to fix it. A file is never lost: it is moved only after the store has committed its items.

Writers must never let a half-written file be read. The convention: write to a name ending ``.tmp``
(or ``.part``, ``.partial``, ``.crdownload``, or a dotfile), then rename it to its final name in the same
folder (a rename is atomic). As a second guard for writers that ignore the convention, a file is taken
only once its size and modification time have stayed the same for ``settle_s`` across two scans or more.

Only regular files directly in the inbox are read. Symbolic links are never followed: a link is moved
(the link itself, not its target) to ``failed/`` with a note asking for a copy of the file instead.
Sub-folders, FIFOs and other non-regular entries are left alone. A settled file whose name does not end
with a data suffix goes to ``failed/`` with a note, so a mistyped name is noticed rather than ignored.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

DEFAULT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".json", ".parquet")
PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload")

Status = Literal["ingested", "duplicate file", "failed", "waiting"]


@dataclass(frozen=True)
class InboxResult:
    """What one scan did with one file."""

    name: str
    status: Status
    added: int = 0
    error: str | None = None


def _well_named(name: str) -> bool:
    """False for files still being written (by convention) and for names that could leave the folder."""
    if name.startswith(".") or name.lower().endswith(PARTIAL_SUFFIXES):
        return False
    # "." and ".." start with a dot, so only separators are left to rule out
    return not any(sep in name for sep in {"/", "\0", os.sep, os.altsep or "/"})


def _settled_digest(path: Path, state: tuple[int, int]) -> str | None:
    """sha256 of the file if it is still the regular file that settled in ``state``, else None.

    Opened without following a link and without blocking (a FIFO swapped in would block a plain open),
    then checked through the open descriptor, so what is hashed is what was seen.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None  # gone, or swapped for a link: the next scan sees what is there now
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or (info.st_size, info.st_mtime_ns) != state:
            return None
        digest = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Inbox:
    """Scans ``root`` and hands each settled data file to ``ingest_file``.

    ``ingest_file(path)`` reads the file and commits its items to the store, returning how many were
    added. ``seen(digest)`` / ``remember(digest, name)`` record the sha256 of every ingested file (the
    service persists them in the store), so the same content dropped again, under any name, is moved to
    ``done/`` without being read. Without them the record lives in memory for the life of the process; a
    re-ingested file is still harmless, as the store drops items it already holds.
    """

    def __init__(
        self,
        root: Path,
        ingest_file: Callable[[Path], int],
        *,
        settle_s: float = 1.0,
        suffixes: Iterable[str] = DEFAULT_SUFFIXES,
        seen: Callable[[str], bool] | None = None,
        remember: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if (seen is None) != (remember is None):
            raise ValueError("pass both seen and remember, or neither")
        if seen is None or remember is None:
            digests: dict[str, str] = {}
            seen, remember = digests.__contains__, digests.__setitem__
        self.root = Path(root)
        self.done = self.root / "done"
        self.failed = self.root / "failed"
        for folder in (self.root, self.done, self.failed):
            folder.mkdir(parents=True, exist_ok=True)
        self._real_root = self.root.resolve()
        self._ingest_file = ingest_file
        self._seen = seen
        self._remember = remember
        self._settle_s = settle_s
        self._suffixes = tuple(s.lower() for s in suffixes)
        self._clock = clock
        # name -> ((size, mtime_ns), when that state was first seen)
        self._pending: dict[str, tuple[tuple[int, int], float]] = {}

    def scan(self) -> list[InboxResult]:
        """One pass over the inbox, in name order; returns what happened to each candidate file."""
        results = []
        present = set()
        with os.scandir(self.root) as entries:
            ordered = sorted(entries, key=lambda e: e.name)
        for entry in ordered:
            if not _well_named(entry.name):
                continue
            if entry.is_symlink():
                results.append(
                    self._fail(
                        entry.name,
                        "it is a symbolic link, and links are never followed",
                        "copy the file itself into the inbox",
                    )
                )
            elif entry.is_file(follow_symlinks=False) and self._inside(entry):
                present.add(entry.name)
                results.append(self._consider(entry))
        self._pending = {name: state for name, state in self._pending.items() if name in present}
        return results

    def watch(self, stop: threading.Event, interval_s: float = 1.0) -> None:
        """Scan every ``interval_s`` until ``stop`` is set; a failing scan is logged and retried.

        A scan fails (rather than moving files) when the store cannot record a digest or a move fails:
        the file stays in the inbox, and the store's dedup makes the retry add nothing twice.
        """
        while True:
            try:
                for result in self.scan():
                    if result.status != "waiting":
                        log.info("inbox: %s %s (%d added)", result.name, result.status, result.added)
            except Exception:
                log.exception("inbox scan of %s failed; retrying in %.1f s", self.root, interval_s)
            if stop.wait(interval_s):
                return

    def _inside(self, entry: os.DirEntry[str]) -> bool:
        return Path(entry.path).resolve().parent == self._real_root

    def _consider(self, entry: os.DirEntry[str]) -> InboxResult:
        name = entry.name
        info = entry.stat(follow_symlinks=False)
        state = (info.st_size, info.st_mtime_ns)
        now = self._clock()
        first = self._pending.get(name)
        if first is None or first[0] != state:
            self._pending[name] = (state, now)
            return InboxResult(name, "waiting")
        if now - first[1] < self._settle_s:
            return InboxResult(name, "waiting")
        del self._pending[name]
        if not name.lower().endswith(self._suffixes):
            return self._fail(
                name,
                f"its type ({Path(name).suffix or 'no suffix'}) is not a data file type",
                f"rename it to end with one of {', '.join(self._suffixes)}",
            )
        path = Path(entry.path)
        digest = _settled_digest(path, state)
        if digest is None:
            return InboxResult(name, "waiting")
        if self._seen(digest):
            self._move(path, self.done)
            return InboxResult(name, "duplicate file")
        try:
            added = self._ingest_file(path)
        except Exception as exc:
            return self._fail(name, str(exc) or type(exc).__name__, "correct the file and drop it into the inbox again")
        self._remember(digest, name)
        self._move(path, self.done)
        return InboxResult(name, "ingested", added=added)

    def _fail(self, name: str, why: str, fix: str) -> InboxResult:
        """Move ``name`` to failed/ with a note beside it (replacing, never following, an old note)."""
        moved = self._move(self.root / name, self.failed)
        note = (
            f"{name} was not ingested: {why}\nTo fix: {fix}. Moving it back from failed/ into {self.root} retries it.\n"
        )
        fd, tmp = tempfile.mkstemp(dir=self.failed, prefix=".note-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(note)
            os.replace(tmp, self.failed / _fitting(moved.name, ".error.txt", self.failed))
        except BaseException:
            os.unlink(tmp)
            raise
        return InboxResult(name, "failed", error=why)

    @staticmethod
    def _move(path: Path, folder: Path) -> Path:
        """Rename into ``folder``; on a name clash add ``.<timestamp>.<n>`` before the suffix (kept, so a
        file moved back from failed/ is still recognised). A name that would be over the folder's length
        limit has its stem cut (ending in '~'): a failed rename would leave the file in the inbox, to be
        taken (and fail) again at every scan."""
        target = folder / path.name
        stamp = time.strftime("%Y%m%dT%H%M%S")
        n = 0
        while os.path.lexists(target):
            n += 1
            target = folder / _fitting(path.stem, f".{stamp}.{n}{path.suffix}", folder)
        os.rename(path, target)
        return target


def _fitting(stem: str, tail: str, folder: Path) -> str:
    """``stem + tail``, the stem cut at a character boundary (and marked '~') when the name would be over
    the folder's file-name limit (in bytes); a tail too long to keep is cut too."""
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if len((stem + tail).encode("utf-8", "surrogateescape")) <= limit:
        return stem + tail
    if len(tail.encode("utf-8", "surrogateescape")) > limit // 2:
        stem, tail = stem + tail, ""
    room = limit - 1 - len(tail.encode("utf-8", "surrogateescape"))
    cut = stem.encode("utf-8", "surrogateescape")[:room].decode("utf-8", "ignore")
    return cut + "~" + tail
