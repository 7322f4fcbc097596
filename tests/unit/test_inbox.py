import csv
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from freeal_stream.service.inbox import Inbox, InboxResult

SETTLE = 1.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeStore:
    """Commits items from CSV files, dropping any whose id or text it already holds (like the real store)."""

    def __init__(self) -> None:
        self.items: dict[str, str] = {}
        self.calls: list[str] = []
        self.digests: dict[str, str] = {}

    def ingest_file(self, path: Path) -> int:
        self.calls.append(path.name)
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        hashes = {hashlib.sha1(t.encode()).hexdigest() for t in self.items.values()}
        added = 0
        for row in rows:
            digest = hashlib.sha1(row["text"].encode()).hexdigest()
            if row["id"] not in self.items and digest not in hashes:
                self.items[row["id"]] = row["text"]
                hashes.add(digest)
                added += 1
        return added

    def inbox(self, root: Path, clock: Clock, **kwargs) -> Inbox:
        return Inbox(
            root,
            self.ingest_file,
            settle_s=SETTLE,
            clock=clock,
            seen=self.digests.__contains__,
            remember=self.digests.__setitem__,
            **kwargs,
        )


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "text"])
        writer.writerows(rows)


def settled_scan(inbox: Inbox, clock: Clock) -> list[InboxResult]:
    """Two scans SETTLE seconds apart: the first sees the files, the second takes the unchanged ones."""
    inbox.scan()
    clock.now += SETTLE
    return inbox.scan()


@pytest.fixture
def env(tmp_path):
    store, clock = FakeStore(), Clock()
    return store, clock, store.inbox(tmp_path / "inbox", clock)


def test_folders_are_created(env):
    _, _, inbox = env
    assert inbox.root.is_dir() and inbox.done.is_dir() and inbox.failed.is_dir()


def test_a_growing_file_is_not_read_until_it_settles(env):
    store, clock, inbox = env
    path = inbox.root / "a.csv"
    path.write_text("id,text\n1,first\n")
    assert inbox.scan() == [InboxResult("a.csv", "waiting")]
    clock.now += SETTLE
    with open(path, "a") as f:
        f.write("2,second\n")  # still being written: its size changed since the last scan
    assert inbox.scan() == [InboxResult("a.csv", "waiting")]
    clock.now += SETTLE / 2
    assert inbox.scan() == [InboxResult("a.csv", "waiting")]  # unchanged, but not for long enough yet
    assert store.calls == []
    clock.now += SETTLE / 2
    assert inbox.scan() == [InboxResult("a.csv", "ingested", added=2)]
    assert store.items == {"1": "first", "2": "second"}


def test_partial_names_and_dotfiles_are_ignored_until_renamed(env):
    store, clock, inbox = env
    for name in ("a.csv.tmp", "b.csv.part", "c.csv.partial", "d.csv.crdownload", ".e.csv"):
        write_csv(inbox.root / name, [(name, f"text of {name}")])
    for _ in range(3):
        assert inbox.scan() == []
        clock.now += SETTLE
    assert store.calls == [] and (inbox.root / "a.csv.tmp").exists()
    os.rename(inbox.root / "a.csv.tmp", inbox.root / "a.csv")
    assert settled_scan(inbox, clock) == [InboxResult("a.csv", "ingested", added=1)]


def test_the_file_moves_to_done_only_after_the_callback_returns(tmp_path):
    clock, seen_during_ingest = Clock(), []

    def ingest(path: Path) -> int:
        seen_during_ingest.append((path.exists(), (path.parent / "done" / path.name).exists()))
        return 1

    inbox = Inbox(tmp_path, ingest, settle_s=SETTLE, clock=clock)
    write_csv(tmp_path / "a.csv", [("1", "x")])
    assert settled_scan(inbox, clock) == [InboxResult("a.csv", "ingested", added=1)]
    assert seen_during_ingest == [(True, False)]
    assert not (tmp_path / "a.csv").exists() and (inbox.done / "a.csv").exists()


def test_the_same_content_dropped_again_adds_nothing(env):
    store, clock, inbox = env
    rows = [("1", "first"), ("2", "second")]
    write_csv(inbox.root / "a.csv", rows)
    assert settled_scan(inbox, clock) == [InboxResult("a.csv", "ingested", added=2)]

    write_csv(inbox.root / "copy.csv", rows)  # same content, another name
    write_csv(inbox.root / "a.csv", rows)  # same name again
    assert settled_scan(inbox, clock) == [
        InboxResult("a.csv", "duplicate file"),
        InboxResult("copy.csv", "duplicate file"),
    ]
    assert store.calls == ["a.csv"] and len(store.items) == 2
    done = sorted(p.name for p in inbox.done.iterdir())
    assert len(done) == 3 and "a.csv" in done and "copy.csv" in done
    clashed = next(name for name in done if name not in ("a.csv", "copy.csv"))
    assert clashed.startswith("a.") and clashed.endswith(".1.csv")

    # other content overlapping the first file: read, but only the new item is added
    write_csv(inbox.root / "b.csv", [("1", "first"), ("3", "third")])
    assert settled_scan(inbox, clock) == [InboxResult("b.csv", "ingested", added=1)]


def test_a_failing_callback_moves_the_file_to_failed_with_a_note(tmp_path):
    clock = Clock()

    def ingest(path: Path) -> int:
        raise ValueError("a.csv: no column 'text'; name the text column 'text'")

    inbox = Inbox(tmp_path, ingest, settle_s=SETTLE, clock=clock)
    (tmp_path / "a.csv").write_text("id,body\n1,x\n")
    [result] = settled_scan(inbox, clock)
    assert result.status == "failed" and "no column 'text'" in (result.error or "")
    assert (inbox.failed / "a.csv").read_text() == "id,body\n1,x\n"
    note = (inbox.failed / "a.csv.error.txt").read_text()
    assert "no column 'text'" in note and "To fix" in note and "Traceback" not in note

    # a second failure under the same name keeps both files, each with its own note
    (tmp_path / "a.csv").write_text("id,body\n2,y\n")
    [result] = settled_scan(inbox, clock)
    assert result.status == "failed"
    names = {p.name for p in inbox.failed.iterdir()}
    clashed = next(n for n in names if n.endswith(".1.csv"))
    assert f"{clashed}.error.txt" in names and len(names) == 4


def test_an_unsupported_file_type_fails_with_a_note(env):
    store, clock, inbox = env
    (inbox.root / "notes.txt").write_text("hello")
    [result] = settled_scan(inbox, clock)
    assert result.status == "failed" and ".txt" in (result.error or "")
    assert ".csv" in (inbox.failed / "notes.txt.error.txt").read_text()
    assert store.calls == []


def test_a_symlink_out_of_the_inbox_is_not_followed(env, tmp_path):
    store, _, inbox = env
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.csv"
    write_csv(secret, [("1", "secret")])
    (inbox.root / "link.csv").symlink_to(secret)
    (inbox.root / "dirlink").symlink_to(outside)
    results = inbox.scan()  # a link is refused at once: there is nothing to wait for
    assert {r.name: r.status for r in results} == {"dirlink": "failed", "link.csv": "failed"}
    assert store.calls == [] and store.items == {}
    assert (inbox.failed / "link.csv").is_symlink()  # the link was moved, its target left alone
    assert secret.read_text().startswith("id,text") and (outside / "secret.csv").exists()
    assert "symbolic link" in (inbox.failed / "link.csv.error.txt").read_text()


def test_subfolders_and_fifos_are_left_alone(env):
    store, clock, inbox = env
    (inbox.root / "sub").mkdir()
    write_csv(inbox.root / "sub" / "a.csv", [("1", "x")])
    os.mkfifo(inbox.root / "pipe.csv")
    assert settled_scan(inbox, clock) == []
    assert (inbox.root / "sub" / "a.csv").exists() and (inbox.root / "pipe.csv").exists()
    assert store.calls == []


class Crash(BaseException):
    """The process dying: not an Exception, so nothing catches it."""


def test_a_crash_between_commit_and_move_reingests_without_duplicates(tmp_path):
    store, clock = FakeStore(), Clock()
    root = tmp_path / "inbox"

    def commit_then_die(path: Path) -> int:
        store.ingest_file(path)
        raise Crash

    inbox = Inbox(
        root,
        commit_then_die,
        settle_s=SETTLE,
        clock=clock,
        seen=store.digests.__contains__,
        remember=store.digests.__setitem__,
    )
    write_csv(root / "a.csv", [("1", "first"), ("2", "second")])
    with pytest.raises(Crash):
        settled_scan(inbox, clock)
    assert (root / "a.csv").exists() and len(store.items) == 2 and store.digests == {}

    restarted = store.inbox(root, clock)
    assert settled_scan(restarted, clock) == [InboxResult("a.csv", "ingested", added=0)]
    assert len(store.items) == 2 and (restarted.done / "a.csv").exists()


def test_a_crash_after_the_digest_is_recorded_moves_the_file_without_reading_it(tmp_path):
    store, clock = FakeStore(), Clock()
    root = tmp_path / "inbox"

    def remember_then_die(digest: str, name: str) -> None:
        store.digests[digest] = name
        raise Crash

    inbox = Inbox(
        root,
        store.ingest_file,
        settle_s=SETTLE,
        clock=clock,
        seen=store.digests.__contains__,
        remember=remember_then_die,
    )
    write_csv(root / "a.csv", [("1", "first")])
    with pytest.raises(Crash):
        settled_scan(inbox, clock)
    assert (root / "a.csv").exists()

    restarted = store.inbox(root, clock)
    assert settled_scan(restarted, clock) == [InboxResult("a.csv", "duplicate file")]
    assert store.calls == ["a.csv"] and (restarted.done / "a.csv").exists()


def test_seen_and_remember_go_together(tmp_path):
    with pytest.raises(ValueError, match="both"):
        Inbox(tmp_path, lambda p: 0, seen=lambda d: False)


def test_watch_ingests_in_the_background_until_stopped(tmp_path):
    store = FakeStore()
    inbox = Inbox(tmp_path, store.ingest_file, settle_s=0.05)
    stop = threading.Event()
    thread = threading.Thread(target=inbox.watch, args=(stop, 0.02))
    thread.start()
    try:
        write_csv(tmp_path / "a.csv.tmp", [("1", "x")])
        os.rename(tmp_path / "a.csv.tmp", tmp_path / "a.csv")
        deadline = time.monotonic() + 10
        while not (inbox.done / "a.csv").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()
    assert store.items == {"1": "x"}


@pytest.mark.parametrize("stem", ["a" * 247, "é" * 120 + "b", "x" * 200 + ".part2"])
def test_a_file_with_a_name_near_the_length_limit_moves_once_with_its_note(tmp_path, stem):
    """A 251-byte name: its note (name + '.error.txt') and its clash name (name + '.<time>.<n>') would be
    over the 255 bytes a name may have; every move and note must still happen once, then the inbox is empty."""
    clock = Clock()
    store = FakeStore()

    def ingest(path: Path) -> int:
        if "bad" in path.read_text():
            raise ValueError("bad file")
        return store.ingest_file(path)

    inbox = Inbox(tmp_path / "inbox", ingest, settle_s=SETTLE, clock=clock)
    name = f"{stem}.csv"
    for n, content in enumerate(["id,text\n1,bad\n", "id,text\n2,bad too\n", "id,text\n3,fine\n", "id,text\n4,ok\n"]):
        (inbox.root / name).write_text(content)
        results = settled_scan(inbox, clock)
        assert [r.status for r in results] == ["failed" if n < 2 else "ingested"], results
        assert not (inbox.root / name).exists() and clock.now < 200
    failed = sorted(p.name for p in inbox.failed.iterdir())
    assert len(failed) == 4 and sum(n.endswith(".error.txt") for n in failed) == 2
    assert all(len(n.encode()) <= 255 for n in failed) and not any(n.startswith(".note-") for n in failed)
    assert all(n.endswith(".csv") or n.endswith(".error.txt") for n in failed)
    assert len(list(inbox.done.iterdir())) == 2 and set(store.items) == {"3", "4"}
