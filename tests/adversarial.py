"""The adversarial pass of SECURITY.md, run for real: a `serve` of a small job (local Ray, the fake LLM) is
attacked from outside while it runs, and each attempt prints one table row with what was observed.

    RAY_AUTH_MODE=disabled OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \\
        .venv/bin/python -m tests.adversarial          # about 3 minutes on 2 cores

Not a test module (pytest does not collect it): the attempts are covered one by one by tests/unit/test_http_api.py
and tests/integration/test_ray_loopback.py; this is the whole pass against one real running service.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil

from freeal_stream.service.client import SERVICE_FILE, ServiceClient, find_service, write_service_file
from freeal_stream.testing.fake_openai_server import FakeOpenAIServer
from freeal_stream.testing.jobs import ROOT, cli_process, make_job, wait_for
from freeal_stream.testing.keyword_llm import respond
from freeal_stream.testing.sockets import is_loopback, listening
from tests.integration.test_ray_loopback import job_processes
from tests.unit.test_http_api import host_address

BAIT = "Overflow bait: my invoice shows a double charge"
ROWS: list[tuple[str, str]] = []


def attempt(what: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    def run(fn: Callable[[], str]) -> Callable[[], str]:
        try:
            outcome = fn()
        except Exception as exc:  # an attempt that crashes the harness is an outcome too
            outcome = f"harness error: {type(exc).__name__}: {exc}"
        ROWS.append((what, outcome))
        print(f"| {len(ROWS)} | {what} | {outcome} |", flush=True)
        return fn

    return run


def llm(body: dict) -> object:
    """The keyword LLM, except that it gives the bait text an `Infinity` logprob (confidence NaN)."""
    reply = respond(body)
    if BAIT in body["messages"][-1]["content"] and getattr(reply, "content", None):
        return dataclasses.replace(reply, top_logprobs=[[(reply.content, float("inf"))]])
    return reply


def raw(url: str, data: bytes, timeout: float = 15) -> tuple[int | None, bytes, float]:
    """(status or None when closed without an answer, the reply, seconds) of raw bytes sent to the API."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=timeout) as conn:
        conn.sendall(data)
        try:
            reply = conn.makefile("rb").read()
        except OSError:
            reply = b""
    status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else None
    return status, reply, time.monotonic() - started


def get(
    url: str, headers: dict[str, str] | None = None, method: str = "GET", body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "freeal_stream.cli", *args],
        capture_output=True,
        text=True,
        env=full,
        cwd=ROOT,
        timeout=timeout,
    )


def first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "")[:150]


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="freeal-adversarial-"))
    log = tmp / "serve.log"
    ip = host_address()
    with FakeOpenAIServer(llm) as server:
        job = make_job(
            tmp,
            4,
            llm={"base_url": server.base_url, "model": "kw", "logprobs": True},
            slm={"mode": "head", "epochs": 3},
            freeal={"rounds": 1, "query_fraction": 1.0, "generated_per_class": 2},
            service={"port": 0, "min_new_items": 100000, "poll_s": 0.5},
        )
        with open(tmp / "items.csv", "a", encoding="utf-8") as f:
            f.write(f"bait-1,{BAIT},billing\n")
        proc = cli_process("serve", str(job), log=log)
        try:
            url = wait_for(lambda: find_service(tmp / "state"), 240, "the service", log)
            api = ServiceClient(url)
            wait_for(lambda: any(r["phase"] == "done" for r in api.status()["rounds"]), 300, "round 1", log)
            attack(url, api, job, proc, log, ip)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    after_stop(job, tmp)
    print(f"\n{len(ROWS)} attempts; serve log: {log}")


def attack(url: str, api: ServiceClient, job: Path, proc: subprocess.Popen, log: Path, ip: str | None) -> None:
    port = url.rsplit(":", 1)[1]
    host = f"127.0.0.1:{port}"
    driver = psutil.Process(proc.pid)
    sockets = listening(job_processes(driver))
    gcs = next((p for name, _, p in sockets if name == "gcs_server"), None)

    @attempt("`ss -ltnp` of the running service: every listening socket of the driver and its Ray processes")
    def _() -> str:
        exposed = [s for s in sockets if not is_loopback(s[1])]
        names = sorted({n.split(".")[0] for n, _, _ in sockets})
        return f"{len(sockets)} sockets ({', '.join(names)}), " + (
            f"EXPOSED: {exposed}" if exposed else "all on 127.0.0.1 / ::ffff:127.0.0.1"
        )

    @attempt(f"TCP connect from the host's address ({ip}) to each of those ports")
    def _() -> str:
        if ip is None:
            return "skipped: this machine has no address beyond loopback"
        refused, others = 0, []
        for _, _, p in sockets:
            try:
                socket.create_connection((ip, p), timeout=2).close()
                others.append(f"{p}: {owner(ip, p, driver)}")
            except OSError:
                refused += 1
        return f"{refused} of {len(sockets)} refused" + (f"; open: {', '.join(others)}" if others else "")

    @attempt("`ray.init(address='<host ip>:<GCS port>')` from another process, then run a task (the RCE of issue 14)")
    def _() -> str:
        if ip is None or gcs is None:
            return "skipped: no host address or no GCS port found"
        code = f"import ray; ray.init(address='{ip}:{gcs}'); print('RAN', ray.get(ray.remote(lambda: 1).remote()))"
        env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_gcs_rpc_server_connect_timeout_s="5")
        try:
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
            return "RAN A TASK" if "RAN" in r.stdout else f"failed (exit {r.returncode}): {first_line(r.stderr)}"
        except subprocess.TimeoutExpired:
            return "never connected (gave up after 60 s)"

    for name, p in (("Ray Client server", 10001), ("Ray dashboard", 8265), ("dashboard agent HTTP", 52365)):

        @attempt(f"{name} (port {p}) on the host's address and on 127.0.0.1")
        def _(p: int = p) -> str:
            out = []
            for where in filter(None, (ip, "127.0.0.1")):
                try:
                    socket.create_connection((where, p), timeout=2).close()
                    out.append(f"{where}: open ({owner(where, p, driver)})")
                except OSError:
                    out.append(f"{where}: refused")
            return ", ".join(out)

    remote = f"{ip or '192.0.2.7'}:{gcs or 6379}"
    for what, args, env in (
        (f"`run --address {remote}` with RAY_AUTH_MODE=disabled", ["--address", remote], {}),
        (f"`RAY_ADDRESS={remote} run`", [], {"RAY_ADDRESS": remote}),
        ("`run --address auto` without a token", ["--address", "auto"], {}),
        ("`run --address ray://head.example:10001`", ["--address", "ray://head.example:10001"], {}),
        (
            "`run --address 127.0.0.1.evil.example:6379` (a name that looks like loopback)",
            ["--address", "127.0.0.1.evil.example:6379"],
            {},
        ),
        (
            f"`run --address {remote}` with RAY_AUTH_MODE=token and an empty ~/.ray/auth_token",
            ["--address", remote],
            {"RAY_AUTH_MODE": "token", "HOME": str(_empty_token_home())},
        ),
    ):

        @attempt(what)
        def _(args: list[str] = args, env: dict[str, str] = env) -> str:
            other = make_job(Path(tempfile.mkdtemp()), 2)
            r = cli("run", str(other), *args, env=env)
            return f"exit {r.returncode}: {first_line(r.stderr)}"

    for what, header in (
        ("DNS rebinding: `Host: attacker.example`", "Host: attacker.example"),
        (f"`Host: 127.0.0.1.attacker.example:{port}`", f"Host: 127.0.0.1.attacker.example:{port}"),
        ("HTTP/1.0 request without a Host", None),
    ):

        @attempt(f"{what} on GET /labels")
        def _(header: str | None = header) -> str:
            line = "GET /labels HTTP/1.0\r\n" if header is None else f"GET /labels HTTP/1.1\r\n{header}\r\n"
            status, reply, _ = raw(url, f"{line}Connection: close\r\n\r\n".encode())
            return f"{status}: {reply.split(b'{', 1)[-1][:70].decode(errors='replace')}"

    items_before = api.status()["items"]
    for origin, ctype in (("http://evil.example", "text/plain"), ("null", "application/json")):

        @attempt(f"browser-style POST /items with `Origin: {origin}`, Content-Type {ctype}")
        def _(origin: str = origin, ctype: str = ctype) -> str:
            status, headers, _ = get(
                url + "/items",
                {"Origin": origin, "Content-Type": ctype},
                "POST",
                b'[{"text": "planted by a web page"}]',
            )
            cors = [h for h in headers if h.lower().startswith("access-control")]
            return f"{status}, CORS headers {cors or 'none'}, items stored {api.status()['items'] - items_before}"

    @attempt("CORS preflight `OPTIONS /items` from another origin")
    def _() -> str:
        status, headers, _ = get(
            url + "/items", {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}, "OPTIONS"
        )
        return f"{status}, CORS headers {[h for h in headers if h.lower().startswith('access-control')] or 'none'}"

    for ctype in ("text/plain", "multipart/form-data; boundary=x", "application/x-www-form-urlencoded"):

        @attempt(f"POST /items with a JSON body sent as {ctype.split(';')[0]} (no Origin)")
        def _(ctype: str = ctype) -> str:
            status, _, body = get(url + "/items", {"Content-Type": ctype}, "POST", b'[{"text": "x"}]')
            return f"{status}: {json.loads(body)['error'][:60]}"

    for what, data in (
        (
            "chunked body",
            f"POST /items HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\n[1,2]\r\n0\r\n\r\n",
        ),
        (
            "`Content-Length: 40000000` (headers only)",
            f"POST /items HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            "Content-Length: 40000000\r\nConnection: close\r\n\r\n",
        ),
        (
            "request smuggling: Content-Length and Transfer-Encoding both",
            f"POST /items HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 4\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
        ),
        (
            "`Content-Length: -1`",
            f"POST /items HTTP/1.1\r\nHost: {host}\r\nContent-Length: -1\r\nConnection: close\r\n\r\n",
        ),
        (
            "a 1 MB header",
            f"GET /status HTTP/1.1\r\nHost: {host}\r\nX-Big: {'a' * 1_000_000}\r\nConnection: close\r\n\r\n",
        ),
        (
            "path tricks `/items/../status`, `//status`, `/%2e%2e/status`",
            f"GET /%2e%2e/status HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n",
        ),
    ):

        @attempt(what)
        def _(data: str = data, what: str = what) -> str:
            status, reply, _ = raw(url, data.encode())
            if "path tricks" in what:
                others = [get(url + path)[0] for path in ("/items/../status", "//status")]
                return f"{[*others, status]} (no file is ever served)"
            return f"{status}: {reply.split(b'{', 1)[-1][:60].decode(errors='replace') if status else 'closed'}"

    @attempt("slowloris: request headers one byte every 0.5 s")
    def _() -> str:
        h, p = url.removeprefix("http://").rsplit(":", 1)
        started = time.monotonic()
        with socket.create_connection((h, int(p)), timeout=30) as conn:
            try:
                for byte in f"GET /status HTTP/1.1\r\nHost: {host}\r\nX-Slow: {'a' * 100}".encode():
                    conn.sendall(bytes([byte]))
                    time.sleep(0.5)
                return "still open after 50 s"
            except OSError:
                return f"closed by the service after {time.monotonic() - started:.0f} s"

    lines_before = log.read_text().count("\n")

    @attempt("3,000 idle connections opened at once")
    def _() -> str:
        h, p = url.removeprefix("http://").rsplit(":", 1)
        conns = []
        for _ in range(3000):
            try:
                conns.append(socket.create_connection((h, int(p)), timeout=30))
            except OSError:
                break
        opened = len(conns)
        health_during = get(url + "/health")[0]
        started = time.monotonic()
        closed = sum(1 for c in conns if c.recv(1) == b"")
        waited = time.monotonic() - started
        for c in conns:
            c.close()
        text = log.read_text()
        new = text.count("\n") - lines_before
        return (
            f"{opened} opened; /health meanwhile {health_during}; {closed} closed by the service within "
            f"{waited:.0f} s; {new} log lines, {text.count('Traceback')} tracebacks; /health after "
            f"{get(url + '/health')[0]}"
        )

    @attempt("stalled body: `Content-Length: 100`, 10 bytes sent, then nothing")
    def _() -> str:
        before = log.read_text().count("\n")
        status, _, took = raw(
            url,
            f"POST /items HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            'Content-Length: 100\r\n\r\n[{"text":'.encode(),
            timeout=120,
        )
        text = log.read_text()
        return (
            f"{status} after {took:.0f} s; {text.count(chr(10)) - before} log line(s), "
            f"{text.count('Traceback')} tracebacks"
        )

    @attempt("a lone surrogate (`\\ud800`) in one item of three, against the real DuckDB store")
    def _() -> str:
        status, _, body = get(
            url + "/items",
            {"Content-Type": "application/json"},
            "POST",
            b'[{"text": "surrogate test one"}, {"id": "sur", "text": "bad \\ud800 here"}, '
            b'{"text": "surrogate test three"}]',
        )
        answer = json.loads(body)
        return (
            f"{status}: added {answer.get('added')}, quarantined {answer.get('quarantined')} "
            f"({answer['problems'][0]['detail'][:60] if answer.get('problems') else ''})"
        )

    @attempt("an `Infinity` logprob from the LLM (confidence NaN): GET /labels")
    def _() -> str:
        status, _, body = get(url + "/labels?since=0&limit=10000")
        bad = [t for t in ("NaN", "Infinity") if t in body.decode()]
        item = next(x for x in json.loads(body)["items"] if x["id"] == "bait-1")
        return f"{status}; bait item {item['source']}, confidence {item['confidence']}; NaN tokens: {bad or 'none'}"

    @attempt("50,001 items in one POST")
    def _() -> str:
        status, _, body = get(
            url + "/items",
            {"Content-Type": "application/json"},
            "POST",
            json.dumps([{"text": f"t{i}"} for i in range(50_001)]).encode(),
        )
        return f"{status}: {json.loads(body)['error'][:60]}"

    @attempt("GET /openapi.json and /docs (service on loopback, no token)")
    def _() -> str:
        return (
            f"{get(url + '/openapi.json')[0]} and {get(url + '/docs')[0]} (/openapi.json is behind the token when "
            "one is set; no /docs page, whose JavaScript would come from a CDN)"
        )

    state = job.parent / "state"
    real = (state / SERVICE_FILE).read_text()
    for forged in (f"http://{ip or '10.255.255.1'}:{gcs or 8765}", "http://localhost.attacker.example:8765"):

        @attempt(f"forged service.json naming {forged}, then `status` and `ingest` with the token set")
        def _(forged: str = forged) -> str:
            write_service_file(state, forged, proc.pid)
            (state.parent / "new.csv").write_text("text\nhello there\n")
            try:
                s = cli("status", str(job), env={"FREEAL_SERVICE_TOKEN": "secret-token-123"})
                i = cli("ingest", str(job), str(state.parent / "new.csv"), env={"FREEAL_SERVICE_TOKEN": "x"})
            finally:
                (state / SERVICE_FILE).write_text(real)
            return f"status exit {s.returncode}, ingest exit {i.returncode}: {first_line(s.stderr)[:110]}"

    @attempt("`serve` with `service.host: 0.0.0.0` and no token")
    def _() -> str:
        other = make_job(Path(tempfile.mkdtemp()), 2, service={"host": "0.0.0.0"})
        env = {k: v for k, v in os.environ.items() if k != "FREEAL_SERVICE_TOKEN"}
        r = subprocess.run(
            [sys.executable, "-m", "freeal_stream.cli", "serve", str(other)],
            capture_output=True,
            text=True,
            env=dict(env, PYTHONPATH=str(ROOT)),
            cwd=ROOT,
            timeout=60,
        )
        return f"exit {r.returncode}: {first_line(r.stderr)[:110]}"


def owner(ip: str, port: int, driver: psutil.Process) -> str:
    """Whose listening socket answered at ip:port: this job's, or another process's on this machine."""
    ours = {p.pid for p in job_processes(driver)}
    pids = {
        c.pid
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
        and c.laddr.port == port
        and c.laddr.ip in (ip, f"::ffff:{ip}", "0.0.0.0", "::")
    }
    if pids & ours:
        return "THIS JOB"
    names = sorted({psutil.Process(pid).name() for pid in pids if pid})
    return f"another process on this machine {names or '(unknown)'}, not this job"


def _empty_token_home() -> Path:
    home = Path(tempfile.mkdtemp())
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("\n")
    return home


def after_stop(job: Path, tmp: Path) -> None:
    @attempt("`export` to JSONL after the `Infinity` logprob")
    def _() -> str:
        out = tmp / "labels.jsonl"
        r = cli("export", str(job), str(out))
        text = out.read_text()
        bait = next(json.loads(line) for line in text.splitlines() if '"bait-1"' in line)
        return (
            f"exit {r.returncode}; bait confidence {bait['confidence']}; NaN tokens: "
            f"{[t for t in ('NaN', 'Infinity', 'nan') if t in text] or 'none'}"
        )


if __name__ == "__main__":
    main()
