"""Nothing a job starts listens beyond loopback: a real `run` (local Ray, head mode, the fake LLM), with
every listening TCP socket of the driver and of every Ray process of its session collected while it runs.
Also the rule for joining a cluster: over the network only with Ray's token authentication."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from freeal_stream.actors.runtime import RayJoinError, address_host, check_can_join
from freeal_stream.testing.fake_openai_server import FakeOpenAIServer
from freeal_stream.testing.jobs import cli_process, make_job
from freeal_stream.testing.keyword_llm import respond
from freeal_stream.testing.sockets import is_loopback, listening


def job_processes(driver: psutil.Process) -> list[psutil.Process]:
    """The driver, its descendants, and any process naming the driver's Ray session folder (in case Ray
    ever starts one outside the tree)."""
    procs = {driver.pid: driver}
    try:
        procs.update({p.pid: p for p in driver.children(recursive=True)})
    except psutil.Error:
        return list(procs.values())
    sessions = {
        arg.split("=", 1)[1].rstrip("/")
        for p in list(procs.values())
        for arg in _cmdline(p)
        if arg.startswith("--session-dir=")
    }
    if sessions:
        for p in psutil.process_iter():
            if any(s in arg for arg in _cmdline(p) for s in sessions):
                procs[p.pid] = p
    return list(procs.values())


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


@pytest.mark.integration
def test_every_socket_a_job_listens_on_is_loopback(tmp_path: Path):
    log = tmp_path / "run.log"
    with FakeOpenAIServer(respond) as server:
        job = make_job(
            tmp_path,
            4,
            llm={"base_url": server.base_url, "model": "kw"},
            slm={"mode": "head", "epochs": 3},
            freeal={"rounds": 1, "generated_per_class": 2},
        )
        proc = cli_process("run", str(job), log=log)
        driver = psutil.Process(proc.pid)
        seen: set[tuple[str, str, int]] = set()
        names: set[str] = set()
        while proc.poll() is None:
            procs = job_processes(driver)
            names |= {_name(p) for p in procs}
            seen |= listening(procs)
            time.sleep(0.3)
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert {"gcs_server", "raylet"} <= names, names  # Ray's processes were really looked at
    assert len({port for _, _, port in seen}) >= 4, seen  # GCS, raylet, workers, agents...
    exposed = sorted(s for s in seen if not is_loopback(s[1]))
    assert not exposed, f"listening beyond loopback: {exposed}"


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return ""


@pytest.mark.parametrize(
    "address, host",
    [
        ("10.0.0.5:6379", "10.0.0.5"),
        ("ray://head.example:10001", "head.example"),
        ("[::1]:6379", "::1"),
        ("127.0.0.1:6379", "127.0.0.1"),
        ("auto", None),
        ("head:notaport", None),
    ],
)
def test_address_host(address, host):
    assert address_host(address) == host


def test_joining_a_cluster_over_the_network_needs_ray_token_auth(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    for loopback in ("127.0.0.1:6379", "[::1]:6379", "localhost:6379"):
        check_can_join(loopback)  # this machine only: no token needed
    for remote in ("192.0.2.7:6379", "auto", "ray://head.example:10001", "127.0.0.1.evil.example:6379"):
        with pytest.raises(RayJoinError, match="RAY_AUTH_MODE=token"):
            check_can_join(remote)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(RayJoinError, match="no token is set"):
        check_can_join("192.0.2.7:6379")
    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("\n")
    with pytest.raises(RayJoinError, match="no token is set"):  # an empty file is no token
        check_can_join("192.0.2.7:6379")
    token.write_text("cluster-token\n")
    check_can_join("192.0.2.7:6379")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "absent"))
    with pytest.raises(RayJoinError):  # Ray reads the named file, not the default one
        check_can_join("192.0.2.7:6379")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-the-env")
    check_can_join("192.0.2.7:6379")


def test_run_refuses_a_cluster_without_token_auth_before_any_work(tmp_path, monkeypatch, capsys):
    from freeal_stream.cli import main

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    job = make_job(tmp_path, 2)
    assert main(["run", str(job), "--address", "192.0.2.7:6379"]) == 2
    err = capsys.readouterr().err
    assert "refusing to join the Ray cluster at '192.0.2.7:6379'" in err and "Traceback" not in err
    assert not (tmp_path / "state").exists()  # refused before the store, the LLM or Ray start
