import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from freeal_stream.service.client import ServiceClient, ServiceError, find_service, write_service_file
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
        page = self.items[since:since + limit]
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
    memory, server = service
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # ignored: a proxy would see the token
    client = ServiceClient(server.url)
    assert client.health()
    sent = [{"id": "a", "text": "refund please"}, {"id": 7, "text": "where is my parcel", "gold": "shipping"},
            {"text": "no id given", "view": "another view"}]
    assert client.add_items(sent) == {"received": 3, "added": 3, "duplicates": 0}
    assert client.add_items(sent[:1] + [{"id": "b", "text": "refund please"}]) == {
        "received": 2, "added": 0, "duplicates": 2}
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


@pytest.mark.parametrize("body, content_type, expected", [
    (b'{"items": [', "application/json", "not JSON"),
    (b'not json\n{"text": \n', "application/x-ndjson", "no line of the body is JSON"),
    (b'\xff\xfe', "application/json", "not UTF-8"),
    (b'[' * 6000, "application/json", "not JSON"),
    (b'[{"text": "x", "id": ' + b'9' * 5000 + b'}]', "application/json", "not JSON"),
    (b'{"items": []}', "application/json", "no items"),
    (b'{"rows": [{"text": "x"}]}', "application/json", '{"items": [...]}'),
    (b'{"items": [{"text": "x"}], "quarantined": [{"raw": 1}]}', "application/json", "quarantined must be"),
])
def test_an_unreadable_body_is_a_400_naming_what_is_wrong(service, body, content_type, expected):
    memory, server = service
    status, answer, _ = post_items(server.url, body, content_type)
    assert status == 400 and expected in answer["error"]
    assert memory.items == []


@pytest.mark.parametrize("bad, content_type, expected", [
    (b'3', "application/json", "items[1]: must be a JSON object"),
    (b'{"id": "b"}', "application/json", "items[1].text"),
    (b'{"text": "   "}', "application/json", "items[1].text"),
    (b'{"text": 5}', "application/json", "items[1].text"),
    (b'{"text": "y", "id": true}', "application/json", "items[1].id"),
    (b'{"text": "y", "id": [1]}', "application/json", "items[1].id"),
    (b'{"text": "y", "view": 3}', "application/json", "items[1].view"),
    (b'{"text": "y", "gold": {}}', "application/json", "items[1].gold"),
    (b'{"txt": "y"}', "application/json", "items[1].txt: unknown field"),
    (b'not json', "application/x-ndjson", "line 2 is not JSON"),
])
def test_a_bad_item_is_quarantined_and_the_good_ones_are_taken(service, bad, content_type, expected):
    memory, server = service
    body = (b'[{"text": "x"}, ' + bad + b']') if content_type == "application/json" else b'{"text": "x"}\n' + bad
    status, answer, _ = post_items(server.url, body, content_type)
    assert status == 200 and [item["text"] for item in memory.items] == ["x"]
    assert (answer["received"], answer["added"], answer["quarantined"]) == (2, 1, 1)
    assert expected in answer["problems"][0]["detail"]


def test_refused_items_reach_the_quarantine_handler_with_their_raw_content():
    memory, got = MemoryService(), []
    handlers = ApiHandlers(memory.add_items, memory.status, memory.labels, lambda rows, source: got.append(
        (source, rows)))
    with ApiServer(handlers) as server:
        answer = ServiceClient(server.url).add_items(
            [{"text": "x"}, {"id": "b"}], source="f.csv",
            quarantined=[{"location": "line 3", "line": 3, "reason": "not UTF-8", "detail": "d", "raw": "\\xff"}])
    assert answer["quarantined"] == 2 and answer["added"] == 1
    [(source, rows)] = got
    assert source == "f.csv" and [(r["location"], r["raw"]) for r in rows] == [("line 3", "\\xff"),
                                                                                ("items[1]", '{"id": "b"}')]


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
        conn.sendall(b"POST /items HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\n[1,2]\r\n0\r\n\r\n")
        reply = conn.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.0 411") and b"Content-Length" in reply


def test_labels_query_is_validated(service):
    _, server = service
    for query, field in [("since=-1", "since"), ("since=x", "since"), ("limit=0", "limit"),
                         ("limit=10001", "limit"), ("limit=1&limit=2", "limit")]:
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


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", ""])
def test_a_non_loopback_bind_needs_a_token(host):
    with pytest.raises(ValueError, match="FREEAL_SERVICE_TOKEN"):
        ApiServer(MemoryService().handlers(), host=host)


def test_loopback_names():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("")


def test_an_empty_token_is_refused():
    with pytest.raises(ValueError, match="empty"):
        ApiServer(MemoryService().handlers(), token=" ")


def test_a_token_is_required_when_set(caplog):
    with caplog.at_level(logging.DEBUG), ApiServer(MemoryService().handlers(), token=TOKEN) as server:
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}]:
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
