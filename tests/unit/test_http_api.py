import hashlib
import http.client
import ipaddress
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from freeal_stream.service.client import (
    ServiceClient,
    ServiceError,
    check_service_url,
    find_service,
    write_service_file,
)
from freeal_stream.service.http_api import ApiHandlers, ApiServer, is_loopback

TOKEN = "test-token-0123456789abcdef"
SECRET = "hunter2-planted-secret"


class MemoryService:
    """In-memory handlers: dedup by id and by text hash, labels in arrival order."""

    def __init__(self) -> None:
        self.items: list[dict] = []

    def add_items(self, items: list[dict]) -> dict:
        ids = {item["id"] for item in self.items}
        hashes = {hashlib.sha1(item["text"].encode()).hexdigest() for item in self.items}
        added = 0
        for item in items:
            digest = hashlib.sha1(item["text"].encode()).hexdigest()
            item_id = str(item.get("id", digest))
            if item_id not in ids and digest not in hashes:
                self.items.append({"id": item_id, "text": item["text"], "label": "pending"})
                ids.add(item_id)
                hashes.add(digest)
                added += 1
        return {"received": len(items), "added": added, "duplicates": len(items) - added}

    def status(self) -> dict:
        return {"items": len(self.items)}

    def labels(self, since: int, limit: int) -> dict:
        page = self.items[since : since + limit]
        return {"items": page, "next": since + len(page)}

    def handlers(self) -> ApiHandlers:
        return ApiHandlers(add_items=self.add_items, status=self.status, labels=self.labels)


@pytest.fixture
def service():
    memory = MemoryService()
    with ApiServer(memory.handlers(), max_body_bytes=8192, max_items=5) as server:
        yield memory, server


def request(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    """(status, JSON body, headers) of a raw request, errors included."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers


def post_items(url: str, body: bytes, content_type: str = "application/json"):
    return request(url + "/items", "POST", body, {"Content-Type": content_type})


def test_round_trip_through_the_client(service, monkeypatch):
    _, server = service
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # ignored: a proxy would see the token
    client = ServiceClient(server.url)
    assert client.health()
    sent = [
        {"id": "a", "text": "refund please"},
        {"id": 7, "text": "where is my parcel", "gold": "shipping"},
        {"text": "no id given", "view": "another view"},
    ]
    assert client.add_items(sent) == {"received": 3, "added": 3, "duplicates": 0}
    assert client.add_items([*sent[:1], {"id": "b", "text": "refund please"}]) == {
        "received": 2,
        "added": 0,
        "duplicates": 2,
    }
    assert client.status() == {"items": 3}
    first = client.labels(since=0, limit=2)
    assert [item["id"] for item in first["items"]] == ["a", "7"] and first["next"] == 2
    rest = client.labels(since=first["next"], limit=10)
    assert [item["text"] for item in rest["items"]] == ["no id given"] and rest["next"] == 3
    assert client.labels(since=3)["items"] == []


def test_items_as_a_list_or_as_json_lines(service):
    memory, server = service
    status, body, _ = post_items(server.url, json.dumps([{"text": "one"}]).encode())
    assert status == 200 and body["added"] == 1
    lines = '{"id": 1, "text": "two\u2028still two"}\n\n{"id": 2, "text": "three"}\n'.encode()
    status, body, _ = post_items(server.url, lines, "application/x-ndjson")
    assert status == 200 and body == {"received": 2, "added": 2, "duplicates": 0}
    assert memory.items[1]["text"] == "two\u2028still two"


@pytest.mark.parametrize(
    "body, content_type, expected",
    [
        (b'{"items": [', "application/json", "not JSON"),
        (b'not json\n{"text": \n', "application/x-ndjson", "no line of the body is JSON"),
        (b"\xff\xfe", "application/json", "not UTF-8"),
        (b"[" * 6000, "application/json", "not JSON"),
        (b'[{"text": "x", "id": ' + b"9" * 5000 + b"}]", "application/json", "not JSON"),
        (b'{"items": []}', "application/json", "no items"),
        (b'{"rows": [{"text": "x"}]}', "application/json", '{"items": [...]}'),
        (b'{"items": [{"text": "x"}], "quarantined": [{"raw": 1}]}', "application/json", "quarantined must be"),
    ],
)
def test_an_unreadable_body_is_a_400_naming_what_is_wrong(service, body, content_type, expected):
    memory, server = service
    status, answer, _ = post_items(server.url, body, content_type)
    assert status == 400 and expected in answer["error"]
    assert memory.items == []


@pytest.mark.parametrize(
    "bad, content_type, expected",
    [
        (b"3", "application/json", "items[1]: must be a JSON object"),
        (b'{"id": "b"}', "application/json", "items[1].text"),
        (b'{"text": "   "}', "application/json", "items[1].text"),
        (b'{"text": 5}', "application/json", "items[1].text"),
        (b'{"text": "y", "id": true}', "application/json", "items[1].id"),
        (b'{"text": "y", "id": [1]}', "application/json", "items[1].id"),
        (b'{"text": "y", "view": 3}', "application/json", "items[1].view"),
        (b'{"text": "y", "gold": {}}', "application/json", "items[1].gold"),
        (b'{"txt": "y"}', "application/json", "items[1].txt: unknown field"),
        (b"not json", "application/x-ndjson", "line 2 is not JSON"),
    ],
)
def test_a_bad_item_is_quarantined_and_the_good_ones_are_taken(service, bad, content_type, expected):
    memory, server = service
    body = (b'[{"text": "x"}, ' + bad + b"]") if content_type == "application/json" else b'{"text": "x"}\n' + bad
    status, answer, _ = post_items(server.url, body, content_type)
    assert status == 200 and [item["text"] for item in memory.items] == ["x"]
    assert (answer["received"], answer["added"], answer["quarantined"]) == (2, 1, 1)
    assert expected in answer["problems"][0]["detail"]


def test_refused_items_reach_the_quarantine_handler_with_their_raw_content():
    memory, got = MemoryService(), []
    handlers = ApiHandlers(
        memory.add_items, memory.status, memory.labels, lambda rows, source: got.append((source, rows))
    )
    with ApiServer(handlers) as server:
        answer = ServiceClient(server.url).add_items(
            [{"text": "x"}, {"id": "b"}],
            source="f.csv",
            quarantined=[{"location": "line 3", "line": 3, "reason": "not UTF-8", "detail": "d", "raw": "\\xff"}],
        )
    assert answer["quarantined"] == 2 and answer["added"] == 1
    [(source, rows)] = got
    assert source == "f.csv" and [(r["location"], r["raw"]) for r in rows] == [
        ("line 3", "\\xff"),
        ("items[1]", '{"id": "b"}'),
    ]


def test_too_large_is_a_413(service):
    memory, server = service
    for size in (9000, 5_000_000):  # the large one would reset the connection were it not drained
        status, answer, _ = post_items(server.url, json.dumps([{"text": "x" * size}]).encode())
        assert status == 413 and "8192" in answer["error"]
    status, answer, _ = post_items(server.url, json.dumps([{"text": str(i)} for i in range(6)]).encode())
    assert status == 413 and "limit is 5" in answer["error"]
    assert memory.items == []
    assert ServiceClient(server.url).health()  # the server took the next request normally


def test_a_body_without_a_length_is_a_411(service):
    _, server = service
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(
            f"POST /items HTTP/1.1\r\nHost: {host}:{port}\r\n".encode() + b"Transfer-Encoding: chunked\r\n\r\n"
            b"5\r\n[1,2]\r\n0\r\n\r\n"
        )
        reply = conn.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.1 411") and b"Content-Length" in reply


def test_labels_query_is_validated(service):
    _, server = service
    for query, field in [
        ("since=-1", "since"),
        ("since=x", "since"),
        ("limit=0", "limit"),
        ("limit=10001", "limit"),
        ("limit=1&limit=2", "limit"),
    ]:
        status, answer, _ = request(f"{server.url}/labels?{query}")
        assert status == 400 and answer["field"] == field, query
    status, answer, _ = request(f"{server.url}/labels?sinse=1")
    assert status == 400 and "sinse" in answer["error"]
    assert request(f"{server.url}/labels?since=0&limit=10000")[0] == 200


def test_unknown_path_and_wrong_method(service):
    _, server = service
    status, answer, _ = request(server.url + "/nope")
    assert status == 404 and "/items" in answer["error"]
    status, _, headers = request(server.url + "/items")
    assert status == 405 and headers["Allow"] == "POST"
    assert request(server.url + "/status", "DELETE")[0] == 405


def test_a_handler_exception_is_a_generic_500(caplog):
    def broken(items):
        raise RuntimeError(f"cannot connect: password={SECRET}")

    handlers = ApiHandlers(add_items=broken, status=lambda: {}, labels=lambda since, limit: {})
    with caplog.at_level(logging.ERROR), ApiServer(handlers) as server:
        status, answer, _ = post_items(server.url, b'[{"text": "x"}]')
        with pytest.raises(ServiceError) as info:
            ServiceClient(server.url).add_items([{"text": "x"}])
    assert status == 500 and SECRET not in json.dumps(answer) and SECRET not in str(info.value)
    assert info.value.status == 500 and "internal error" in str(info.value)
    assert SECRET in caplog.text  # logged on the server side


def job_serving(host: str, token_env: str = "FREEAL_TEST_SERVICE_TOKEN"):
    from freeal_stream.config import parse_job

    return parse_job(
        {
            "name": "t",
            "data": {"path": "x.csv"},
            "task": {"description": "d", "classes": {"a": "a", "b": "b"}},
            "service": {"host": host, "token_env": token_env},
        },
        "job.yaml",
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", ""])
def test_a_non_loopback_bind_needs_a_token(host, monkeypatch):
    from freeal_stream.config import ConfigError
    from freeal_stream.serve import service_token

    monkeypatch.delenv("FREEAL_TEST_SERVICE_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="FREEAL_TEST_SERVICE_TOKEN"):  # the job's own variable, by name
        service_token(job_serving(host))
    with pytest.raises(ValueError, match="without a token"):  # the server itself refuses too
        ApiServer(MemoryService().handlers(), host=host)
    monkeypatch.setenv("FREEAL_TEST_SERVICE_TOKEN", TOKEN)
    assert service_token(job_serving(host)) == TOKEN


def test_loopback_names():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("")


def test_an_empty_token_is_refused(monkeypatch):
    from freeal_stream.config import ConfigError
    from freeal_stream.serve import service_token

    monkeypatch.setenv("FREEAL_TEST_SERVICE_TOKEN", " ")
    with pytest.raises(ConfigError, match="empty"):
        service_token(job_serving("127.0.0.1"))


def test_a_token_is_required_when_set(caplog):
    with caplog.at_level(logging.DEBUG), ApiServer(MemoryService().handlers(), token=TOKEN) as server:
        for headers in [
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": TOKEN},
            {"Authorization": f"Basic {TOKEN}"},
        ]:
            status, answer, response_headers = request(server.url + "/status", headers=headers)
            assert status == 401 and TOKEN not in json.dumps(answer), headers
            assert response_headers["WWW-Authenticate"] == "Bearer"
        assert request(server.url + "/nope")[0] == 401  # nothing but /health is open without the token
        # a body refused unread is drained, so the client reads the answer instead of a reset connection
        status, answer, _ = post_items(server.url, json.dumps([{"text": "x" * 5_000_000}]).encode())
        assert status == 401 and "token" in answer["error"]
        with pytest.raises(ServiceError) as info:
            ServiceClient(server.url, token="wrong").status()
        assert info.value.status == 401
        assert ServiceClient(server.url).health()  # /health needs no token
        client = ServiceClient(server.url, token=TOKEN)
        assert client.status() == {"items": 0}
        assert client.add_items([{"text": "x"}])["added"] == 1
        assert request(server.url + "/status", headers={"Authorization": f"bearer {TOKEN}"})[0] == 200
    assert TOKEN not in caplog.text


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_find_service(tmp_path: Path):
    assert find_service(tmp_path) is None  # no file
    with ApiServer(MemoryService().handlers()) as server:
        path = write_service_file(tmp_path, server.url, os.getpid())
        assert json.loads(path.read_text()) == {"url": server.url, "pid": os.getpid()}
        assert [p.name for p in tmp_path.iterdir()] == ["service.json"]  # no temporary file left
        assert find_service(tmp_path) == server.url

        write_service_file(tmp_path, server.url, dead_pid())  # the process that wrote it is gone
        assert find_service(tmp_path) is None
    write_service_file(tmp_path, f"http://127.0.0.1:{unused_port()}", os.getpid())  # alive, not serving
    assert find_service(tmp_path, timeout_s=1) is None
    (tmp_path / "service.json").write_text("{not json")
    assert find_service(tmp_path) is None


def test_the_client_reports_an_unreachable_service():
    client = ServiceClient(f"http://127.0.0.1:{unused_port()}", timeout_s=2)
    assert not client.health()
    with pytest.raises(ServiceError, match="cannot reach") as info:
        client.status()
    assert info.value.status is None
    with pytest.raises(ValueError):
        ServiceClient("127.0.0.1:8765")


# ---- the gate: Host, Origin, content types, limits, timeouts ------------------------------------------


def raw_request(server: ApiServer, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes; the whole reply (the server closes the connection after it, or on timeout)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as conn:
        conn.sendall(data)
        return conn.makefile("rb").read()


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def test_a_host_that_is_not_this_service_is_refused(service):
    """DNS rebinding: a page at attacker.example, re-pointed at 127.0.0.1, sends its own name as Host."""
    _, server = service
    port = server.url.rsplit(":", 1)[1]
    for host in (
        "attacker.example",
        f"attacker.example:{port}",
        f"127.0.0.1.attacker.example:{port}",
        "127.0.0.1:1",
        "",
        f"127.0.0.1:{port}@attacker.example",
    ):
        for path in ("/labels", "/health", "/items"):
            reply = raw_request(server, f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            assert status_of(reply) == 403 and b"service.allowed_hosts" in reply, (host, path, reply[:200])
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
        reply = raw_request(server, f"GET /labels HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        assert status_of(reply) == 200, host


def test_allowed_hosts_adds_names():
    with ApiServer(MemoryService().handlers(), allowed_hosts=["labels.internal", "proxy.internal:443"]) as server:
        port = server.url.rsplit(":", 1)[1]
        for host, expected in (
            (f"labels.internal:{port}", 200),
            ("proxy.internal:443", 200),
            ("labels.internal:1", 403),
            (f"other.internal:{port}", 403),
        ):
            reply = raw_request(server, f"GET /status HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            assert status_of(reply) == expected, host


def test_a_web_page_of_another_site_cannot_post_or_read(service):
    memory, server = service
    for origin in ("http://evil.example", "null", "http://127.0.0.1:1", "http://localhost.evil.example"):
        status, answer, headers = request(
            server.url + "/items", "POST", b'[{"text": "planted"}]', {"Content-Type": "text/plain", "Origin": origin}
        )
        assert status == 403 and "cross-origin" in answer["error"], origin
        assert not any(h.lower().startswith("access-control") for h in headers), headers
        assert request(server.url + "/labels", headers={"Origin": origin})[0] == 403
    status, _, headers = request(
        server.url + "/items",
        "OPTIONS",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert status == 403 and not any(h.lower().startswith("access-control") for h in headers)
    assert memory.items == []
    own = server.url.replace("127.0.0.1", "localhost")
    status, answer, _ = request(
        server.url + "/items", "POST", b'[{"text": "mine"}]', {"Content-Type": "application/json", "Origin": own}
    )
    assert status == 200 and answer["added"] == 1


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "application/jsonx", ""]
)
def test_only_json_bodies_are_parsed(service, content_type):
    memory, server = service
    status, answer, _ = post_items(server.url, b'[{"text": "x"}]', content_type)
    assert status == 415 and "application/json" in answer["error"], answer
    assert memory.items == []


def test_json_with_a_charset_is_taken(service):
    memory, server = service
    assert post_items(server.url, b'[{"text": "x"}]', "application/json; charset=utf-8")[0] == 200
    assert post_items(server.url, b'{"text": "y"}\n', "Application/X-NDJSON")[0] == 200
    assert len(memory.items) == 2


def test_a_stalled_body_is_a_408_with_one_log_line(caplog):
    memory = MemoryService()
    with caplog.at_level(logging.DEBUG), ApiServer(memory.handlers(), body_timeout_s=1) as server:
        host, port = server.url.removeprefix("http://").split(":")
        conns = []
        for _ in range(20):
            conn = socket.create_connection((host, int(port)), timeout=10)
            conn.sendall(
                f"POST /items HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                'Content-Length: 100\r\n\r\n[{"text": '.encode()
            )
            conns.append(conn)
        replies = [c.makefile("rb").read() for c in conns]
        for c in conns:
            c.close()
        assert ServiceClient(server.url).health()
    assert all(status_of(r) == 408 and b"did not arrive within 1 s" in r for r in replies), replies[0]
    lines = [r for r in caplog.records if "408" in r.getMessage()]
    assert len(lines) == 20 and all(r.exc_info is None for r in lines)
    assert "Traceback" not in caplog.text and memory.items == []


def test_idle_connections_are_closed_quietly(caplog):
    with (
        caplog.at_level(logging.DEBUG),
        ApiServer(MemoryService().handlers(), headers_timeout_s=1, max_connections=1000) as server,
    ):
        host, port = server.url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(200)]
        idle[0].sendall(b"GET /health HTTP/1.1\r\nHo")  # headers a byte at a time count as idle too
        assert all(c.recv(1) == b"" for c in idle)  # closed by the server after 1 s
        for c in idle:
            c.close()
        assert ServiceClient(server.url).health()
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_too_many_connections_get_a_503_not_a_queue():
    with ApiServer(MemoryService().handlers(), max_connections=3) as server:
        host, port = server.url.removeprefix("http://").split(":")
        held = [socket.create_connection((host, int(port)), timeout=10) for _ in range(3)]
        try:
            with pytest.raises(urllib.error.HTTPError) as info:  # uvicorn's own plain-text answer
                urllib.request.urlopen(server.url + "/health", timeout=10)
            assert info.value.code == 503
        finally:
            for c in held:
                c.close()
        time.sleep(0.2)
        assert ServiceClient(server.url).health()


def test_bodies_in_flight_are_bounded():
    """A body waits while others hold the bytes in flight; still waiting at the body timeout, it gets a 503."""
    memory = MemoryService()
    slow = threading.Event()

    def add_items(items):
        if slow.is_set():
            time.sleep(2.5)
        return memory.add_items(items)

    handlers = ApiHandlers(add_items, memory.status, memory.labels)
    with ApiServer(handlers, max_body_bytes=1000, max_body_bytes_in_flight=1000, body_timeout_s=1.5) as server:
        host, port = server.url.removeprefix("http://").split(":")
        stalled = socket.create_connection((host, int(port)), timeout=10)
        stalled.sendall(
            f"POST /items HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            "Content-Length: 900\r\n\r\n[".encode()
        )  # holds 900 bytes of the budget
        time.sleep(0.3)
        started = time.monotonic()
        assert post_items(server.url, json.dumps([{"text": "a" * 800}]).encode())[0] == 200
        assert time.monotonic() - started > 0.9  # it waited for the stalled one's 408
        assert status_of(stalled.makefile("rb").read()) == 408
        stalled.close()

        slow.set()  # a request holding its share for 2.5 s: the next one gives up at 1.5 s
        holder = threading.Thread(target=post_items, args=(server.url, json.dumps([{"text": "b" * 800}]).encode()))
        holder.start()
        time.sleep(0.3)
        status, answer, headers = post_items(server.url, json.dumps([{"text": "c" * 800}]).encode())
        assert status == 503 and headers["Retry-After"] == "1" and "retry" in answer["error"]
        holder.join()
        slow.clear()
        assert post_items(server.url, b'[{"text": "small"}]')[0] == 200  # every share was given back
    assert [len(item["text"]) for item in memory.items] == [800, 800, 5]


def test_a_lone_surrogate_quarantines_its_item_and_the_others_are_stored():
    memory, got = MemoryService(), []
    handlers = ApiHandlers(memory.add_items, memory.status, memory.labels, lambda rows, source: got.append(rows))
    with ApiServer(handlers) as server:
        body = (
            b'[{"text": "fine"}, {"text": "bad \\ud800 text"}, {"id": "\\udfff", "text": "bad id"}, '
            b'{"text": "also fine"}, {"\\ud800": 1, "text": "bad field"}]'
        )
        status, answer, _ = post_items(server.url, body)
        lines = b'{"text": "line fine"}\n{"text": "\\ud83d"}\n'
        status2, answer2, _ = post_items(server.url, lines, "application/x-ndjson")
    assert status == 200 and (answer["added"], answer["quarantined"]) == (2, 3), answer
    assert "items[1].text: holds a lone surrogate ('\\ud800' at character 4)" in answer["problems"][0]["detail"]
    assert answer["problems"][1]["detail"].startswith("items[2].id: holds a lone surrogate")
    assert status2 == 200 and (answer2["added"], answer2["quarantined"]) == (1, 1)
    assert [item["text"] for item in memory.items] == ["fine", "also fine", "line fine"]
    for row in [r for rows in got for r in rows]:  # what is recorded can be stored as UTF-8
        for value in row.values():
            if isinstance(value, str):
                value.encode("utf-8")
    assert "\\ud800" in got[0][0]["raw"]


def test_json_answers_never_hold_nan_or_infinity():
    def labels(since, limit):
        return {
            "items": [
                {"seq": 0, "id": "a", "label": "x", "source": "llm round 1", "confidence": float("nan")},
                {"seq": 1, "id": "b", "label": "y", "source": "llm round 1", "confidence": float("inf")},
                {"seq": 2, "id": "c", "label": "y", "source": "slm round 1", "confidence": 0.5},
            ],
            "next": 3,
        }

    handlers = ApiHandlers(lambda items: {}, lambda: {"spent": float("-inf"), "rates": [float("nan")]}, labels)
    with ApiServer(handlers) as server:
        for path in ("/labels", "/status"):
            with urllib.request.urlopen(server.url + path, timeout=10) as response:
                raw = response.read().decode()
            strict = json.loads(raw, parse_constant=lambda name, path=path: pytest.fail(f"{path} holds {name}"))
            if path == "/labels":
                assert [x["confidence"] for x in strict["items"]] == [None, None, 0.5]
            else:
                assert strict == {"spent": None, "rates": [None]}


def test_openapi_description_is_served_behind_the_token():
    with ApiServer(MemoryService().handlers()) as server:
        status, doc, _ = request(server.url + "/openapi.json")
        assert status == 200 and {"/items", "/status", "/labels", "/health"} <= set(doc["paths"])
        schema = doc["paths"]["/items"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert schema["properties"]["items"]["items"]["$ref"].split("/")[-1] in doc["components"]["schemas"]
        assert request(server.url + "/docs")[0] == 404  # its page would run a CDN's JavaScript in our origin
    with ApiServer(MemoryService().handlers(), token=TOKEN) as server:
        assert request(server.url + "/openapi.json")[0] == 401
        assert request(server.url + "/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200


def host_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one beyond loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ipaddress.ip_address(ip).is_loopback else ip


def test_a_service_file_naming_a_foreign_url_gets_neither_data_nor_token(tmp_path, capsys, monkeypatch):
    """service.json may be forged by anyone who can write the state folder: `status` / `ingest` refuse to
    follow it off this machine, before sending anything (not even the unauthenticated /health check)."""
    from freeal_stream.cli import main
    from freeal_stream.testing.jobs import make_job

    ip = host_address()
    listener = socket.socket()
    listener.bind((ip or "127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.5)
    foreign = f"http://{ip}:{listener.getsockname()[1]}" if ip else "http://10.255.255.1:8765"
    job = make_job(tmp_path, 2, service={"port": 8765})
    monkeypatch.setenv("FREEAL_SERVICE_TOKEN", TOKEN)
    try:
        for url in (
            foreign,
            "http://attacker.example:8765",
            "http://127.0.0.1.attacker.example:8765",
            "http://localhost.attacker.example:8765",
        ):
            write_service_file(tmp_path / "state", url, os.getpid())
            with pytest.raises(ServiceError, match="refusing to send it data or the token"):
                find_service(tmp_path / "state", host="127.0.0.1", port=8765)
            assert main(["status", str(job)]) == 2
            assert "neither this machine's loopback" in capsys.readouterr().err
            (tmp_path / "new.csv").write_text("text\nhello\n")
            assert main(["ingest", str(job), str(tmp_path / "new.csv")]) == 2
            assert "refusing" in capsys.readouterr().err
        with pytest.raises(socket.timeout):
            listener.accept()  # nothing ever connected
    finally:
        listener.close()


def test_the_service_file_may_name_loopback_or_the_jobs_own_address(tmp_path):
    with ApiServer(MemoryService().handlers()) as server:
        port = int(server.url.rsplit(":", 1)[1])
        for url in (server.url, f"http://localhost:{port}"):
            write_service_file(tmp_path, url, os.getpid())
            assert find_service(tmp_path) == url
    check_service_url("http://labels.internal:9000", tmp_path, "labels.internal", 9000)  # the job's own
    for url, host, port in (
        ("http://labels.internal:9001", "labels.internal", 9000),
        ("http://labels.internal:0", "labels.internal", 0),
        ("https://labels.internal", "labels.internal", 80),
    ):
        with pytest.raises(ServiceError):
            check_service_url(url, tmp_path, host, port)


def test_a_wildcard_bind_publishes_a_loopback_url():
    with ApiServer(MemoryService().handlers(), host="0.0.0.0", token=TOKEN) as server:
        port = server.url.rsplit(":", 1)[1]
        assert server.url == f"http://0.0.0.0:{port}" and server.local_url == f"http://127.0.0.1:{port}"
        assert ServiceClient(server.local_url, token=TOKEN).status() == {"items": 0}


def test_allowed_hosts_in_the_job_file():
    from freeal_stream.config import ConfigError, parse_job

    base = {"name": "j", "data": {"path": "x.csv"}, "task": {"description": "d", "classes": {"a": ["a"], "b": ["b"]}}}
    job = parse_job({**base, "service": {"allowed_hosts": ["labels.internal", "proxy:443"]}})
    assert job.service.allowed_hosts == ["labels.internal", "proxy:443"] and parse_job(base).service.allowed_hosts == []
    with pytest.raises(ConfigError, match="allowed_hosts"):
        parse_job({**base, "service": {"allowed_hosts": [" "]}})


def test_keep_alive_answers_are_not_delayed(service):
    """Nagle's algorithm with the client's delayed ACK would hold every answer back ~40 ms."""
    _, server = service
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    started = time.monotonic()
    for _ in range(20):
        conn.request("GET", "/health")
        assert conn.getresponse().read() == b'{"ok": true}'
    conn.close()
    assert time.monotonic() - started < 0.6
