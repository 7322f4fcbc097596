"""HTTP API through which clients add unlabelled items to a running service and read its labels.

Bound to a loopback address it needs no token, as only local users can reach it (a token, if set, is still
required). Bound to any other address it refuses to start without one, and every endpoint but /health then
needs ``Authorization: Bearer <token>``. The token is never logged or echoed.

Endpoints (JSON in and out):
    POST /items    {"items": [{"id", "text", "view", "gold"}, ...]}, a JSON list of items, or JSON lines with
                   Content-Type application/x-ndjson. Only ``text`` is required. A bad item (or a JSON line
                   that does not parse) is quarantined, not refused: the answer counts it and names its
                   field; only a body that is not JSON at all is a 400. The object form may also carry
                   "source" (a name) and "quarantined" (rows a client's file reader set aside), which
                   `freeal-stream ingest` sends so a file's bad rows are recorded under its name.
    GET  /status   the service's status
    GET  /labels   ?since=<int, default 0>&limit=<int, default 1000, at most 10000>
    GET  /health   {"ok": true}, no token needed
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import socket
import socketserver
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from freeal_stream.errors import FreealError
from freeal_stream.sources import MAX_LISTED_PROBLEMS

log = logging.getLogger(__name__)

TOKEN_ENV = "FREEAL_SERVICE_TOKEN"
MAX_BODY_BYTES = 32 << 20
MAX_ITEMS = 50_000
MAX_LABELS_LIMIT = 10_000
# A body refused unread (401, 404, 413...) and smaller than this is read and dropped, so the client gets the
# answer rather than a reset connection (closing a socket with unread data resets it).
_DRAIN_LIMIT = 256 << 20
_ITEM_FIELDS = ("gold", "id", "text", "view")
# ValueError includes integers too long to convert; RecursionError, arrays nested too deeply
_JSON_ERRORS = (ValueError, RecursionError)
_NDJSON_TYPES = {"application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines"}


@dataclass(frozen=True)
class ApiHandlers:
    """What the API calls; the service wires these to its store. Each returns a JSON-serialisable dict.

    ``add_items`` gets validated items, ids possibly absent (it derives them from the content hash) and
    returns e.g. {"received": n, "added": k, "duplicates": d}; ``labels(since, limit)`` returns
    {"items": [...], "next": int}.
    """

    add_items: Callable[[list[dict[str, Any]]], dict[str, Any]]
    status: Callable[[], dict[str, Any]]
    labels: Callable[[int, int], dict[str, Any]]
    # records refused items: (rows of {"location", "line", "reason", "detail", "raw"}, source name)
    quarantine: Callable[[list[dict[str, Any]], str], None] | None = None


@dataclass(frozen=True)
class PostedItems:
    """A POST /items body: the valid items, and the refused ones as quarantine rows."""

    items: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    source: str = "POST /items"


class ApiError(FreealError):
    """A request the API refuses, with the status code and what to tell the client."""

    def __init__(self, status: int, message: str, detail: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.field = (detail or {}).get("field")
        self.body = {"error": message, **(detail or {})}
        self.headers = headers or {}


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback one (so only this machine can connect)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None) if host else []
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def parse_items(body: bytes, content_type: str, max_items: int = MAX_ITEMS) -> PostedItems:
    """The items of a POST /items body, bad ones set aside with the item and field at fault.

    Raises ApiError only when the body as a whole cannot be read (not UTF-8, not JSON, the wrong shape).
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the body is not UTF-8 (bad byte at offset {exc.start})") from None
    rejected: list[dict[str, Any]] = []
    source, sent_aside = "POST /items", []
    if content_type in _NDJSON_TYPES:
        items, lines = _ndjson_items(text, rejected)
        where = [f"line {n}" for n in lines]
    else:
        try:
            doc = json.loads(text)
        except _JSON_ERRORS as exc:
            raise ApiError(400, f"the body is not JSON: {exc} (for JSON lines, send Content-Type "
                                "application/x-ndjson)") from None
        items = doc
        if isinstance(doc, dict) and "items" in doc and set(doc) <= {"items", "source", "quarantined"}:
            items, source, sent_aside = doc["items"], doc.get("source", source), doc.get("quarantined", [])
            _check_envelope(source, sent_aside)
        if not isinstance(items, list):
            raise ApiError(400, 'the body must be {"items": [...]} or a JSON list of items')
        lines = list(range(len(items)))
        where = [f"items[{index}]" for index in lines]
    if not items and not rejected and not sent_aside:
        raise ApiError(400, "the request holds no items")
    if len(items) + len(rejected) + len(sent_aside) > max_items:
        raise ApiError(413, f"{len(items) + len(rejected) + len(sent_aside)} items in one request; the limit is "
                            f"{max_items}: split the batch")
    good = []
    for line, place, item in zip(lines, where, items):
        try:
            _check_item(place, item)
            good.append(item)
        except ApiError as exc:
            rejected.append({"location": place, "line": line, "reason": "invalid item", "field": exc.field,
                             "detail": str(exc), "raw": json.dumps(item, ensure_ascii=False)})
    return PostedItems(good, list(sent_aside) + rejected, source)


def _ndjson_items(text: str, rejected: list[dict[str, Any]]) -> tuple[list[Any], list[int]]:
    """Parsed lines and their line numbers; broken lines go to `rejected` (all of them broken: a 400)."""
    items, lines = [], []
    # split on "\n" only: str.splitlines would also split on U+2028 inside a JSON string
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                items.append(json.loads(line))
                lines.append(number)
            except _JSON_ERRORS as exc:
                rejected.append({"location": f"line {number}", "line": number, "reason": "broken JSON line",
                                 "field": None, "detail": f"line {number} is not JSON: {exc}", "raw": line})
    if rejected and not items:
        raise ApiError(400, f"no line of the body is JSON ({rejected[0]['detail']})", {"line": rejected[0]["line"]})
    return items, lines


_ASIDE_FIELDS = {"location": str, "reason": str, "detail": str, "raw": str}


def _check_envelope(source: Any, rows: Any) -> None:
    """The optional "source" and "quarantined" parts of an object body (a program's, not a person's input)."""
    if not isinstance(source, str) or not 0 < len(source) <= 300:
        raise ApiError(400, "source must be a non-empty string of at most 300 characters", {"field": "source"})
    if not isinstance(rows, list) or not all(
            isinstance(r, dict) and all(isinstance(r.get(k), t) for k, t in _ASIDE_FIELDS.items())
            and (r.get("line") is None or (isinstance(r["line"], int) and not isinstance(r["line"], bool)))
            for r in rows):
        raise ApiError(400, "quarantined must be a list of {location, line, reason, detail, raw} objects",
                       {"field": "quarantined"})


def _check_item(where: str, item: Any) -> None:
    def bad(name: str, why: str) -> ApiError:
        return ApiError(400, f"{where}.{name}: {why}", {"field": name})

    if not isinstance(item, dict):
        raise ApiError(400, f"{where}: must be a JSON object")
    for name in item:
        if name not in _ITEM_FIELDS:
            raise bad(name, f"unknown field; an item has {', '.join(_ITEM_FIELDS)}")
    text = item.get("text")
    if not isinstance(text, str) or not text.strip():
        raise bad("text", "missing or empty; every item needs a non-empty string text")
    if "id" in item and (isinstance(item["id"], bool) or not isinstance(item["id"], (str, int))
                         or item["id"] == ""):
        raise bad("id", "must be a non-empty string or an integer (or left out to derive it from the text)")
    if not isinstance(item.get("view"), (str, type(None))):
        raise bad("view", "must be a string or null")
    gold = item.get("gold")
    if isinstance(gold, bool) or not isinstance(gold, (str, int, type(None))):
        raise bad("gold", "must be a string, an integer or null")


def post_items(handlers: ApiHandlers, posted: PostedItems) -> dict[str, Any]:
    """Quarantine the refused items, store the rest, and answer with both counts (and the first problems)."""
    if posted.rejected and handlers.quarantine is not None:
        handlers.quarantine(posted.rejected, posted.source)
    answer = (handlers.add_items(posted.items) if posted.items
              else {"received": 0, "added": 0, "duplicates": 0, "flagged": 0})
    if not posted.rejected:
        return answer
    refused = [{"location": r["location"], "action": "quarantined", "reason": r["reason"], "detail": r["detail"]}
               for r in posted.rejected[:MAX_LISTED_PROBLEMS]]
    return {**answer, "received": answer["received"] + len(posted.rejected),
            "quarantined": answer.get("quarantined", 0) + len(posted.rejected),
            "problems": (refused + answer.get("problems", []))[:MAX_LISTED_PROBLEMS]}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily, api: ApiServer):
        self.address_family = family
        self.api = api
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer's own looks up the host's FQDN, which can stall for seconds on a badly set-up resolver
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 30  # seconds a client may stall mid-request before its thread is freed
    server_version = "freeal-stream"
    sys_version = ""

    def do_GET(self) -> None:
        self._answer()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _answer(self) -> None:
        headers: dict[str, str] = {}
        self._body_read = False
        try:
            status, payload = 200, json.dumps(self._route()).encode()
        except ApiError as exc:
            status, payload, headers = exc.status, json.dumps(exc.body).encode(), exc.headers
        except Exception:
            log.exception("API %s %s failed", self.command, urlsplit(self.path).path)
            status, payload = 500, json.dumps({"error": "internal error; see the service log"}).encode()
        if not self._body_read:
            self._drop_body()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _route(self) -> dict[str, Any]:
        url = urlsplit(self.path)
        api = self.server.api
        if url.path != "/health":
            self._authorize(api.token)
        routes: dict[str, tuple[str, Callable[[], dict[str, Any]]]] = {
            "/items": ("POST", lambda: post_items(api.handlers, self._items())),
            "/status": ("GET", api.handlers.status),
            "/labels": ("GET", lambda: api.handlers.labels(*_labels_query(url.query))),
            "/health": ("GET", lambda: {"ok": True}),
        }
        if url.path not in routes:
            raise ApiError(404, f"no such endpoint; there are {', '.join(sorted(routes))}")
        method, call = routes[url.path]
        if self.command != method:
            raise ApiError(405, f"{url.path} takes {method}", headers={"Allow": method})
        return call()

    def _authorize(self, token: str | None) -> None:
        if token is None:
            return
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())):
            raise ApiError(401, f"missing or wrong token: send 'Authorization: Bearer <{TOKEN_ENV}>'",
                           headers={"WWW-Authenticate": "Bearer"})

    def _items(self) -> PostedItems:
        api = self.server.api
        length = self._body_length()
        if length is None:
            raise ApiError(411, "send the body with a valid Content-Length (chunked bodies are not taken)")
        if length > api.max_body_bytes:
            raise ApiError(413, f"the body is {length} bytes; the limit is {api.max_body_bytes}: "
                                "split the items over several requests")
        body = self.rfile.read(length)
        self._body_read = True
        if len(body) < length:
            raise ApiError(400, "the body ended before its Content-Length")
        return parse_items(body, self.headers.get_content_type(), api.max_items)

    def _body_length(self) -> int | None:
        """The declared body size; None for a chunked body, or a missing or invalid Content-Length."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return None
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return None
        return length if length >= 0 else None

    def _drop_body(self) -> None:
        length = self._body_length() or 0
        try:
            while 0 < length <= _DRAIN_LIMIT:
                chunk = self.rfile.read(min(length, 1 << 20))
                if not chunk:
                    return
                length -= len(chunk)
        except OSError:
            return  # the client stalled or left; the connection closes after the answer anyway


def _labels_query(query: str) -> tuple[int, int]:
    params = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(params) - {"since", "limit"})
    if unknown:
        raise ApiError(400, f"unknown query parameter {unknown[0]!r}; /labels takes since and limit")

    def number(name: str, default: int, low: int, high: int) -> int:
        values = params.get(name, [str(default)])
        try:
            if len(values) != 1:
                raise ValueError
            value = int(values[0])
        except ValueError:
            raise ApiError(400, f"{name} must be one integer", {"field": name}) from None
        if not low <= value <= high:
            raise ApiError(400, f"{name} must be between {low} and {high}", {"field": name})
        return value

    return number("since", 0, 0, 2**63 - 1), number("limit", 1000, 1, MAX_LABELS_LIMIT)


class ApiServer:
    """The HTTP API on a background thread: ``start()`` returns its base URL, ``stop()`` ends it."""

    def __init__(self, handlers: ApiHandlers, host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None, *, max_body_bytes: int = MAX_BODY_BYTES,
                 max_items: int = MAX_ITEMS):
        if token is not None and not token.strip():
            raise ValueError(f"the service token is empty: set the env var {TOKEN_ENV} to a long random "
                             "string")
        if token is None and not is_loopback(host):
            raise ValueError(f"refusing to serve on {host!r} without a token, as anyone who can reach it "
                             f"could add items and read labels: set the env var {TOKEN_ENV} to a long random "
                             "string, or bind to 127.0.0.1")
        self.handlers = handlers
        self.host = host
        self.port = port
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.max_items = max_items
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL, e.g. http://127.0.0.1:8765 (valid once started)."""
        if self._httpd is None:
            raise RuntimeError("the API server is not running")
        host, port = self._httpd.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"

    def start(self) -> str:
        """Bind and serve in a daemon thread; returns the base URL."""
        if self._httpd is not None:
            raise RuntimeError("the API server is already running")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._httpd = _Server((self.host, self.port), family, self)
        # a short poll interval makes stop() quick (serve_forever notices shutdown between polls)
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="freeal-api",
                                        daemon=True)
        self._thread.start()
        log.info("API listening on %s", self.url)
        return self.url

    def stop(self) -> None:
        """Stop serving and close the socket; requests in flight finish on their own threads."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
