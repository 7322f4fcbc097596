"""SIGKILL the driver mid-annotation and mid-training, rerun: every row labelled, nothing stored is paid
again, and the labels equal an uninterrupted run's (the test LLM is deterministic). SIGKILL of the store
actor mid-run (Ray restarts it, the run goes on) and a second `run` on the same state (refused) end the same."""

from __future__ import annotations

import csv
import dataclasses
import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import duckdb
import pytest
import yaml

from freeal_stream.testing.fake_openai_server import FakeOpenAIServer
from freeal_stream.testing.jobs import cli_process, make_job
from freeal_stream.testing.keyword_llm import respond

CONCURRENCY = 2


def slow_respond(body):
    return dataclasses.replace(respond(body), delay_s=0.1)


def job_in(tmp: Path, server: FakeOpenAIServer) -> Path:
    tmp.mkdir()
    return make_job(
        tmp,
        20,
        llm={"base_url": server.base_url, "model": "kw", "concurrency": CONCURRENCY},
        slm={"mode": "head", "epochs": 6},
        freeal={"rounds": 3, "query_fraction": 0.3, "generated_per_class": 4},
    )


def run_to_end(job: Path, log: Path) -> None:
    p = cli_process("run", str(job), log=log)
    assert p.wait(timeout=600) == 0, log.read_text()[-3000:]


def kill_when(job: Path, log: Path, ready) -> None:
    """Start a run and SIGKILL it the moment `ready(log text)` holds."""
    p = cli_process("run", str(job), log=log)
    wait_for(p, log, ready)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)


def stored_keys(state: Path) -> set[str]:
    deadline = time.monotonic() + 60
    while True:  # the store actor dies with the driver; the file frees a moment later
        try:
            con = duckdb.connect(str(state / "freeal.duckdb"), read_only=True)
            break
        except duckdb.IOException:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    keys = {r[0] for r in con.execute("SELECT key FROM llm_answers").fetchall()}
    con.close()
    return keys


def exported_labels(job: Path, tmp: Path) -> dict[str, str]:
    out = tmp / "labels.csv"
    p = cli_process("export", str(job), str(out), log=tmp / "export.log")
    assert p.wait(timeout=120) == 0
    with open(out, encoding="utf-8") as f:
        return {r["id"]: r["label"] for r in csv.DictReader(f)}


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Ray's raylet and workers of a local cluster are the driver's children)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def actor_pids(driver: int, actor_class: str) -> list[int]:
    """PIDs of this driver's Ray workers running `actor_class` (Ray sets the process title to ray::Class...)."""
    found = []
    for pid in descendants(driver):
        try:
            if f"ray::{actor_class}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def repeated_requests(server: FakeOpenAIServer) -> int:
    from freeal_stream.testing.fake_openai_server import body_hash

    counts: dict[str, int] = {}
    for body in server.requests:
        counts[body_hash(body)] = counts.get(body_hash(body), 0) + 1
    return sum(c - 1 for c in counts.values())


def wait_for(p, log: Path, ready) -> None:
    deadline = time.monotonic() + 600
    while not ready(log.read_text()):
        assert p.poll() is None, "the run ended before the expected point:\n" + log.read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    with FakeOpenAIServer(slow_respond) as server:
        job = job_in(tmp / "job", server)
        run_to_end(job, tmp / "run.log")
        return exported_labels(job, tmp), len(server.requests)


@pytest.mark.parametrize("kill_point", ["mid-annotation", "mid-training"])
def test_killed_run_resumes_to_the_same_labels_without_paying_twice(tmp_path, reference, kill_point):
    ref_labels, ref_requests = reference
    log = tmp_path / "run.log"
    with FakeOpenAIServer(slow_respond) as server:
        job = job_in(tmp_path / "job", server)
        if kill_point == "mid-annotation":
            start = {}

            def ready(text: str) -> bool:  # a few requests into round 2's annotation
                if "round 2/3:" in text and "n" not in start:
                    start["n"] = len(server.requests)
                return "n" in start and len(server.requests) >= start["n"] + 5
        else:

            def ready(text: str) -> bool:
                return "[round 2 train] SLM in head mode" in text

        kill_when(job, log, ready)
        paid_before_kill = stored_keys(tmp_path / "job" / "state")
        sent_before_kill = len(server.requests)
        run_to_end(job, log)
        assert "resum" in log.read_text().split("ingested")[-1]  # the rerun said it resumed
        repeated = repeated_requests(server)
    # only requests in flight at the kill (answered by the server, never stored) may go out again
    assert repeated <= CONCURRENCY
    assert (len(paid_before_kill) > 0 and sent_before_kill < len(server.requests)) or kill_point == "mid-training"
    assert len(server.requests) <= ref_requests + CONCURRENCY
    labels = exported_labels(job, tmp_path)
    assert len(labels) == 80 and all(labels.values())
    assert labels == ref_labels


@pytest.mark.parametrize("actor", ["StoreActor", "Annotator", "Trainer"])
def test_an_actor_killed_mid_round_is_replaced_and_the_run_finishes(tmp_path, reference, actor):
    """SIGKILL of the store writer or an annotator mid-annotation, or of the trainer mid-training: Ray restarts
    or the coordinator replaces it, and the same run ends with the uninterrupted run's labels."""
    ref_labels, ref_requests = reference
    log = tmp_path / "run.log"
    with FakeOpenAIServer(slow_respond) as server:
        job = job_in(tmp_path / "job", server)
        p = cli_process("run", str(job), log=log)
        start = {}

        def ready(text: str) -> bool:
            if actor == "Trainer":
                return "[round 2 train] epoch 2/" in text
            if "round 2/3:" in text and "n" not in start:
                start["n"] = len(server.requests)
            return "n" in start and len(server.requests) >= start["n"] + 5

        wait_for(p, log, ready)
        victim = actor_pids(p.pid, actor)[0]
        os.kill(victim, signal.SIGKILL)
        assert p.wait(timeout=600) == 0, log.read_text()[-3000:]  # no rerun needed
        repeated = repeated_requests(server)
        assert repeated <= CONCURRENCY and len(server.requests) <= ref_requests + CONCURRENCY
    assert exported_labels(job, tmp_path) == ref_labels


def test_second_run_on_the_same_state_is_refused_and_the_first_is_unharmed(tmp_path, reference):
    ref_labels, _ = reference
    with FakeOpenAIServer(slow_respond) as server:
        job = job_in(tmp_path / "job", server)
        first = cli_process("run", str(job), log=tmp_path / "first.log")
        wait_for(first, tmp_path / "first.log", lambda text: "round 1/3:" in text)
        second = cli_process("run", str(job), log=tmp_path / "second.log")
        assert second.wait(timeout=180) == 2
        refusal = (tmp_path / "second.log").read_text()
        assert "is in use by another process" in refusal and "Traceback" not in refusal
        assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert exported_labels(job, tmp_path) == ref_labels


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs to fill up; skipped where mounting needs privileges this machine lacks."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path) -> Path:
    """Write zeros until the file system is full."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * (256 * 1024))
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def test_full_disk_mid_annotation_stops_cleanly_and_the_rerun_finishes(tmp_path, small_disk, reference):
    ref_labels, _ = reference
    log = tmp_path / "run.log"
    with FakeOpenAIServer(slow_respond) as server:
        job = job_in(tmp_path / "job", server)
        config = yaml.safe_load(job.read_text())
        config["state_dir"] = str(small_disk / "state")
        job.write_text(yaml.safe_dump(config, sort_keys=False))
        p = cli_process("run", str(job), log=log)
        start = {}

        def ready(text: str) -> bool:
            if "round 2/3:" in text and "n" not in start:
                start["n"] = len(server.requests)
            return "n" in start and len(server.requests) >= start["n"] + 3

        wait_for(p, log, ready)
        filler = fill(small_disk)
        assert p.wait(timeout=300) == 2, log.read_text()[-3000:]
        told = log.read_text().split("round 2/3:")[-1]
        assert "No space left on device" in told and "Traceback" not in told, told[-3000:]
        filler.unlink()
        run_to_end(job, log)
        assert repeated_requests(server) <= CONCURRENCY
    labels = exported_labels(job, tmp_path)
    assert len(labels) == 80 and labels == ref_labels
