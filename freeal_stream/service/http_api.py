"""HTTP API through which clients add unlabelled items to a running service and read its labels.

FastAPI on uvicorn, in a background thread. Bound to a loopback address it needs no token, as only local
users can reach it (a token, if set, is still required). Bound to any other address it refuses to start
without one, and every endpoint but /health then needs ``Authorization: Bearer <token>``. The token is
never logged or echoed.

Before any routing, a request must name an allowed Host (the bound address, localhost, 127.0.0.1 or [::1]
with the port, or one of ``allowed_hosts``: a web page whose DNS name was rebound to 127.0.0.1 names its
own) and carry no Origin but those hosts' (a browser page of another site gets 403; no CORS headers are ever
sent). Bodies: JSON or JSON lines only (else 415), with a Content-Length (else 411) of at most
``max_body_bytes`` (else 413), received in full within ``body_timeout_s`` (else 408, one log line); at
most ``max_body_bytes_in_flight`` bytes of bodies are read and parsed at once (later ones wait, then 503),
and at most ``max_connections`` connections are served at once (503). A connection that sends no request
headers within ``headers_timeout_s`` is closed. JSON answers never hold NaN or Infinity (null instead).

Endpoints (JSON in and out; the OpenAPI description at /openapi.json):
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

import asyncio
import contextlib
import functools
import hmac
import ipaddress
import json
import logging
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from freeal_stream.errors import FreealError
from freeal_stream.service.client import json_safe
from freeal_stream.sources import MAX_LISTED_PROBLEMS

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 << 20
# One large body parsed at a time (parsing holds the GIL, so two at once are no faster): 32 MB of JSON is up
# to ~500 MB of Python objects when the items are tiny, ~120 MB with 1,000-character texts.
MAX_BODY_BYTES_IN_FLIGHT = MAX_BODY_BYTES
MAX_CONNECTIONS = 64
BODY_TIMEOUT_S = 60.0
HEADERS_TIMEOUT_S = 10.0
MAX_ITEMS = 50_000
MAX_LABELS_LIMIT = 10_000
_ITEM_FIELDS = ("gold", "id", "text", "view")
# ValueError includes integers too long to convert; RecursionError, arrays nested too deeply
_JSON_ERRORS = (ValueError, RecursionError)
_NDJSON_TYPES = {"application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines"}
_BODY_TYPES = {"application/json"} | _NDJSON_TYPES
_ROUTES = ("/health", "/items", "/labels", "/status")
# A body refused unread (401, 404, 413...) and smaller than this is read and dropped, so the client gets the
# answer rather than a reset connection (closing a socket with unread data resets it).
_DRAIN_LIMIT = 256 << 20
_DRAIN_IDLE_S = 2.0
_BODY_READ = "freeal.body_read"  # set in the request's scope once its body has been read to the end


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

    def __init__(
        self, status: int, message: str, detail: dict[str, Any] | None = None, headers: dict[str, str] | None = None
    ):
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


def json_bytes(value: Any) -> bytes:
    """The JSON a client gets: strict (no NaN / Infinity tokens), ASCII (a lone surrogate is escaped)."""
    return json.dumps(json_safe(value), allow_nan=False).encode()


def _utf8_safe(row: dict[str, Any]) -> dict[str, Any]:
    """A quarantine row whose strings have any lone surrogate written as its escape, so it can be stored."""
    return {
        k: v.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(v, str) else v for k, v in row.items()
    }


def _surrogate_at(text: str) -> int | None:
    """The position of the first lone surrogate in ``text`` (valid JSON, but not Unicode text), if any."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def parse_items(body: bytes | bytearray, content_type: str, max_items: int = MAX_ITEMS) -> PostedItems:
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
            raise ApiError(
                400, f"the body is not JSON: {exc} (for JSON lines, send Content-Type application/x-ndjson)"
            ) from None
        del text  # a large body is held once, as parsed objects
        items = doc
        if isinstance(doc, dict) and "items" in doc and set(doc) <= {"items", "source", "quarantined"}:
            items, source, sent_aside = doc["items"], doc.get("source", source), doc.get("quarantined", [])
            _check_envelope(source, sent_aside)
            sent_aside = [_utf8_safe(row) for row in sent_aside]
        if not isinstance(items, list):
            raise ApiError(400, 'the body must be {"items": [...]} or a JSON list of items')
        lines = list(range(len(items)))
        where = [f"items[{index}]" for index in lines]
    if not items and not rejected and not sent_aside:
        raise ApiError(400, "the request holds no items")
    if len(items) + len(rejected) + len(sent_aside) > max_items:
        raise ApiError(
            413,
            f"{len(items) + len(rejected) + len(sent_aside)} items in one request; the limit is "
            f"{max_items}: split the batch",
        )
    good = []
    for line, place, item in zip(lines, where, items):
        try:
            _check_item(place, item)
            good.append(item)
        except ApiError as exc:
            rejected.append(
                _utf8_safe(
                    {
                        "location": place,
                        "line": line,
                        "reason": "invalid item",
                        "field": exc.field,
                        "detail": str(exc),
                        "raw": json.dumps(item, ensure_ascii=False),
                    }
                )
            )
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
                rejected.append(
                    {
                        "location": f"line {number}",
                        "line": number,
                        "reason": "broken JSON line",
                        "field": None,
                        "detail": f"line {number} is not JSON: {exc}",
                        "raw": line,
                    }
                )
    if rejected and not items:
        raise ApiError(400, f"no line of the body is JSON ({rejected[0]['detail']})", {"line": rejected[0]["line"]})
    return items, lines


_ASIDE_FIELDS = {"location": str, "reason": str, "detail": str, "raw": str}


def _check_envelope(source: Any, rows: Any) -> None:
    """The optional "source" and "quarantined" parts of an object body (a program's, not a person's input)."""
    if not isinstance(source, str) or not 0 < len(source) <= 300 or _surrogate_at(source) is not None:
        raise ApiError(
            400, "source must be a non-empty string of at most 300 characters of Unicode text", {"field": "source"}
        )
    if not isinstance(rows, list) or not all(
        isinstance(r, dict)
        and all(isinstance(r.get(k), t) for k, t in _ASIDE_FIELDS.items())
        and (r.get("line") is None or (isinstance(r["line"], int) and not isinstance(r["line"], bool)))
        for r in rows
    ):
        raise ApiError(
            400, "quarantined must be a list of {location, line, reason, detail, raw} objects", {"field": "quarantined"}
        )


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
    if "id" in item and (isinstance(item["id"], bool) or not isinstance(item["id"], (str, int)) or item["id"] == ""):
        raise bad("id", "must be a non-empty string or an integer (or left out to derive it from the text)")
    if not isinstance(item.get("view"), (str, type(None))):
        raise bad("view", "must be a string or null")
    gold = item.get("gold")
    if isinstance(gold, bool) or not isinstance(gold, (str, int, type(None))):
        raise bad("gold", "must be a string, an integer or null")
    for name in _ITEM_FIELDS:
        value = item.get(name)
        if isinstance(value, str) and (at := _surrogate_at(value)) is not None:
            raise bad(
                name,
                f"holds a lone surrogate ({value[at]!a} at character {at}), which is not "
                "Unicode text. Fix: send the text as valid UTF-8",
            )


def post_items(handlers: ApiHandlers, posted: PostedItems) -> dict[str, Any]:
    """Quarantine the refused items, store the rest, and answer with both counts (and the first problems)."""
    if posted.rejected and handlers.quarantine is not None:
        handlers.quarantine(posted.rejected, posted.source)
    answer: dict[str, Any] = (
        handlers.add_items(posted.items) if posted.items else {"received": 0, "added": 0, "duplicates": 0, "flagged": 0}
    )
    if not posted.rejected:
        return answer
    refused = [
        {"location": r["location"], "action": "quarantined", "reason": r["reason"], "detail": r["detail"]}
        for r in posted.rejected[:MAX_LISTED_PROBLEMS]
    ]
    return {
        **answer,
        "received": answer["received"] + len(posted.rejected),
        "quarantined": answer.get("quarantined", 0) + len(posted.rejected),
        "problems": (refused + answer.get("problems", []))[:MAX_LISTED_PROBLEMS],
    }


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


# ---- the ASGI application ---------------------------------------------------------------------------


class _Json(Response):
    media_type = "application/json; charset=utf-8"

    def render(self, content: Any) -> bytes:
        return json_bytes(content)


_NO_SNIFF = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def _answer(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> _Json:
    return _Json(body, status, {**_NO_SNIFF, **(headers or {})})


def _refusal(exc: ApiError) -> _Json:
    return _answer(exc.body, exc.status, exc.headers)


async def _refuse(exc: ApiError, scope: Scope, receive: Receive, send: Send, timeout_s: float) -> None:
    """Answer a refused request, after reading and dropping what is left of its body (up to a limit; a
    client that stops sending for _DRAIN_IDLE_S gets the answer at once)."""
    dropped, deadline = 0, time.monotonic() + timeout_s
    while not scope.get(_BODY_READ) and dropped <= _DRAIN_LIMIT and "close" not in exc.headers.get("Connection", ""):
        try:
            message = await asyncio.wait_for(receive(), min(_DRAIN_IDLE_S, max(0.0, deadline - time.monotonic())))
        except TimeoutError:
            break
        dropped += len(message.get("body", b""))
        scope[_BODY_READ] = message["type"] != "http.request" or not message.get("more_body", False)
    await _refusal(exc)(scope, receive, send)


class _Refused(Response):
    """A refusal raised while routing or handling, answered once the rest of the body is dropped."""

    def __init__(self, exc: ApiError, timeout_s: float):
        super().__init__()
        self.exc, self.timeout_s = exc, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _refuse(self.exc, scope, receive, send, self.timeout_s)


class _Gate:
    """Host allow-list, Origin check and bearer token, before any routing (a refused request learns nothing)."""

    def __init__(self, app: ASGIApp, api: ApiServer):
        self.app, self.api = app, api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                self.api.check_caller(Headers(scope=scope), scope["path"])
            except ApiError as exc:
                await _refuse(exc, scope, receive, send, self.api.body_timeout_s)
                return
        await self.app(scope, receive, send)


class _ByteBudget:
    """How many bytes of request bodies may be read and parsed at once; a request waits for its share."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._freed: asyncio.Condition | None = None  # made on the server's event loop

    @contextlib.asynccontextmanager
    async def share(self, size: int, wait_s: float) -> AsyncIterator[None]:
        if self._freed is None:
            self._freed = asyncio.Condition()
        size = min(size, self.limit)
        async with self._freed:
            try:
                await asyncio.wait_for(self._freed.wait_for(lambda: self.used + size <= self.limit), wait_s)
            except TimeoutError:
                raise ApiError(
                    503,
                    f"too many large requests at once ({self.used} bytes being read); retry shortly",
                    headers={"Retry-After": "1"},
                ) from None
            self.used += size
        try:
            yield
        finally:
            async with self._freed:
                self.used -= size
                self._freed.notify_all()


class _Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's headers: uvicorn has none, so a client
    that connects and sends nothing (or its headers a byte at a time) would hold a connection for ever."""

    def __init__(self, *args: Any, headers_timeout_s: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.headers_timeout_s = headers_timeout_s

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._await_request()

    def _await_request(self) -> None:
        self.loop.call_later(self.headers_timeout_s, self._close_if_idle, self.cycle)

    def _close_if_idle(self, cycle: Any) -> None:
        if self.cycle is cycle and not self.transport.is_closing():  # no new request since
            self.transport.close()


class _ItemIn(BaseModel):
    text: str
    id: str | int | None = None
    view: str | None = None
    gold: str | int | None = None


class _ItemsIn(BaseModel):
    items: list[_ItemIn]
    source: str | None = None
    quarantined: list[dict[str, Any]] = []


class _Problem(BaseModel):
    location: str
    action: str
    reason: str
    detail: str


class _ItemsOut(BaseModel):
    received: int
    added: int
    duplicates: int
    quarantined: int = 0
    flagged: int = 0
    problems: list[_Problem] = []


class _Label(BaseModel):
    seq: int
    id: str
    label: str | None
    source: str | None
    confidence: float | None


class _LabelsOut(BaseModel):
    items: list[_Label]
    next: int


class _ErrorOut(BaseModel):
    error: str
    field: str | None = None


_ITEMS_SCHEMA = _ItemsIn.model_json_schema(ref_template="#/components/schemas/{model}")
_ITEMS_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {k: v for k, v in _ITEMS_SCHEMA.items() if k != "$defs"}},
            "application/x-ndjson": {"schema": {"type": "string", "description": "one item object per line"}},
        },
    }
}
_LABELS_QUERY = {
    "parameters": [
        {"name": "since", "in": "query", "schema": {"type": "integer", "minimum": 0, "default": 0}},
        {
            "name": "limit",
            "in": "query",
            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LABELS_LIMIT, "default": 1000},
        },
    ]
}
_ERRORS: dict[int | str, dict[str, Any]] = {"default": {"model": _ErrorOut}}


def _build_app(api: ApiServer) -> FastAPI:
    # no /docs page: FastAPI's loads its JavaScript from a CDN, which would then run in this API's origin
    app = FastAPI(
        title="freeal-stream service",
        version="1",
        docs_url=None,
        redoc_url=None,
        description=(__doc__ or "").split("\n\n")[0],
    )
    app.add_middleware(_Gate, api=api)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = FastAPI.openapi(app)
            app.openapi_schema.setdefault("components", {}).setdefault("schemas", {}).update(_ITEMS_SCHEMA["$defs"])
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]   # the request body is described, parsed by parse_items
    refusal = functools.partial(_Refused, timeout_s=api.body_timeout_s)

    @app.exception_handler(ApiError)
    async def refused(request: Request, exc: ApiError) -> Response:
        return refusal(exc)

    @app.exception_handler(HTTPException)
    async def routing(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            return refusal(ApiError(405, f"{request.url.path} takes {allowed}", headers={"Allow": allowed}))
        if exc.status_code == 404:
            return refusal(
                ApiError(404, f"no such endpoint; there are {', '.join(_ROUTES)} (described at /openapi.json)")
            )
        return refusal(ApiError(exc.status_code, str(exc.detail)))

    @app.post(
        "/items",
        openapi_extra=_ITEMS_BODY,
        responses={200: {"model": _ItemsOut}, **_ERRORS},
        summary="add items; bad ones are quarantined one by one, the rest stored",
    )
    async def items(request: Request) -> Response:
        return _answer(await api.take_items(request))

    @app.get("/status", responses={200: {"model": dict[str, Any]}, **_ERRORS}, summary="the service's status")
    async def status() -> Response:
        return _answer(await _call("GET /status", api.handlers.status))

    @app.get(
        "/labels",
        openapi_extra=_LABELS_QUERY,
        responses={200: {"model": _LabelsOut}, **_ERRORS},
        summary="labels in ingestion order, from position `since`",
    )
    async def labels(request: Request) -> Response:
        since, limit = _labels_query(request.url.query)
        return _answer(await _call("GET /labels", api.handlers.labels, since, limit))

    @app.get("/health", responses={200: {"model": dict[str, bool]}}, summary="whether the service answers")
    async def health() -> Response:
        return _answer({"ok": True})

    return app


async def _call(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on a worker thread; an unexpected error is logged here and answered as a bare 500."""
    try:
        return await run_in_threadpool(fn, *args)
    except ApiError:
        raise
    except Exception:
        log.exception("API %s failed", what)
        raise ApiError(500, "internal error; see the service log") from None


def _body_length(headers: Headers) -> int | None:
    """The declared body size; None for a chunked body, or a missing or invalid Content-Length."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return None
    try:
        length = int(headers.get("content-length", ""))
    except ValueError:
        return None
    return length if length >= 0 else None


def _host_names(host: str, port: int, extra: Iterable[str]) -> frozenset[str]:
    """The Host header values a request may carry: ``name:port`` for the bound host and the loopback names,
    and each of ``extra`` (with ``:port`` added when it names none)."""

    def bracket(name: str) -> str:  # an IPv6 address is written [::1] in a Host header
        try:
            return f"[{name}]" if ipaddress.ip_address(name).version == 6 else name
        except ValueError:
            return name

    allowed = {f"{name}:{port}".lower() for name in (bracket(host), "localhost", "127.0.0.1", "[::1]")}
    for entry in extra:
        entry = bracket(entry.strip())
        has_port = bool(re.fullmatch(r".*[^:]:\d+", entry)) and not entry.endswith("]")
        allowed.add((entry if has_port else f"{entry}:{port}").lower())
    return frozenset(allowed)


class ApiServer:
    """The HTTP API on a background thread: ``start()`` returns its base URL, ``stop()`` ends it."""

    def __init__(
        self,
        handlers: ApiHandlers,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        *,
        token_env: str = "FREEAL_SERVICE_TOKEN",
        allowed_hosts: Sequence[str] = (),
        max_body_bytes: int = MAX_BODY_BYTES,
        max_items: int = MAX_ITEMS,
        max_body_bytes_in_flight: int = MAX_BODY_BYTES_IN_FLIGHT,
        max_connections: int = MAX_CONNECTIONS,
        body_timeout_s: float = BODY_TIMEOUT_S,
        headers_timeout_s: float = HEADERS_TIMEOUT_S,
    ):
        if token is None and not is_loopback(host):  # the rule and its message: serve.service_token
            raise ValueError(f"refusing to serve on {host!r} without a token")
        self.handlers = handlers
        self.host = host
        self.port = port
        self.token, self.token_env = token, token_env
        self.allowed_hosts = tuple(allowed_hosts)
        self.max_body_bytes = max_body_bytes
        self.max_items = max_items
        self.max_connections = max_connections
        self.body_timeout_s = body_timeout_s
        self.headers_timeout_s = headers_timeout_s
        self.max_body_bytes_in_flight = max(max_body_bytes_in_flight, 1)
        self._hosts: frozenset[str] = frozenset()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._bound: tuple[str, int] | None = None

    @property
    def url(self) -> str:
        """The base URL, e.g. http://127.0.0.1:8765 (valid once started)."""
        if self._bound is None:
            raise RuntimeError("the API server is not running")
        host, port = self._bound
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def local_url(self) -> str:
        """The URL a client on this machine should use: the loopback address when bound to all interfaces."""
        host, port = self._bound or (self.host, self.port)
        wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
        if host not in wildcard:
            return self.url
        local = wildcard[host]
        return f"http://[{local}]:{port}" if ":" in local else f"http://{local}:{port}"

    def check_caller(self, headers: Headers, path: str) -> None:
        """Refuse a request naming another Host (DNS rebinding), from another site's page, or without the token."""
        host = headers.get("host", "").lower()
        if "*" not in self.allowed_hosts and host not in self._hosts:
            raise ApiError(
                403,
                f"Host {host or '(none)'!r} is not one this service answers to. Fix: reach it "
                "by the address it listens on, or add the name to service.allowed_hosts",
            )
        origin = headers.get("origin")
        if origin is not None and origin.lower() not in {
            f"{scheme}://{h}" for h in self._hosts for scheme in ("http", "https")
        }:
            raise ApiError(403, "cross-origin requests are refused (a web page cannot use this API)")
        if path != "/health" and self.token is not None:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if not (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())):
                raise ApiError(
                    401,
                    f"missing or wrong token: send 'Authorization: Bearer <{self.token_env}>'",
                    headers={"WWW-Authenticate": "Bearer"},
                )

    async def take_items(self, request: Request) -> dict[str, Any]:
        """Read a POST /items body within the limits (length, type, bytes in flight, time), then store it."""
        length = _body_length(request.headers)
        if length is None:
            raise ApiError(411, "send the body with a valid Content-Length (chunked bodies are not taken)")
        if length > self.max_body_bytes:
            raise ApiError(
                413,
                f"the body is {length} bytes; the limit is {self.max_body_bytes}: "
                "split the items over several requests",
            )
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media not in _BODY_TYPES:
            raise ApiError(
                415,
                f"Content-Type {media or '(none)'!r} is not taken: send application/json, or "
                "application/x-ndjson for JSON lines",
            )
        started = time.monotonic()
        async with self._budget.share(length, self.body_timeout_s):
            body = await self._read_body(request, length, self.body_timeout_s - (time.monotonic() - started))
            posted = await _call("parsing POST /items", parse_items, body, media, self.max_items)
            del body
            return await _call("POST /items", post_items, self.handlers, posted)

    async def _read_body(self, request: Request, length: int, timeout_s: float) -> bytearray:
        body = bytearray()
        deadline = time.monotonic() + timeout_s
        more = True
        while more:
            try:
                message = await asyncio.wait_for(request.receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                client = request.client.host if request.client else "?"
                log.warning(
                    "API: POST /items from %s: %d of %d body bytes in %.0f s; answered 408",
                    client,
                    len(body),
                    length,
                    timeout_s,
                )
                raise ApiError(
                    408,
                    f"the body did not arrive within {timeout_s:.0f} s ({len(body)} of {length} bytes)",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] == "http.disconnect":
                request.scope[_BODY_READ] = True
                raise ApiError(400, "the client left before sending its whole body")
            body += message.get("body", b"")
            more = message.get("more_body", False)
        request.scope[_BODY_READ] = True
        if len(body) < length:
            raise ApiError(400, "the body ended before its Content-Length")
        return body

    def start(self) -> str:
        """Bind and serve in a daemon thread; returns the base URL. A bind error (port taken) is an OSError."""
        if self._server is not None:
            raise RuntimeError("the API server is already running")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio turns Nagle off only on sockets that say TCP (else 40 ms per answer)
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self._bound = (sock.getsockname()[0], sock.getsockname()[1])
        self._budget = _ByteBudget(self.max_body_bytes_in_flight)  # its lock belongs to the new event loop
        self._hosts = _host_names(self.host, self._bound[1], self.allowed_hosts)
        config = uvicorn.Config(
            _build_app(self),
            lifespan="off",
            ws="none",
            log_config=None,
            access_log=False,
            server_header=False,
            # uvicorn calls `http` as a protocol factory; its stub wants the class itself
            http=functools.partial(_Protocol, headers_timeout_s=self.headers_timeout_s),  # type: ignore[arg-type]
            limit_concurrency=self.max_connections,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="freeal-api", daemon=True
        )
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                self._server = self._thread = self._bound = None
                raise OSError(f"the API server on {self.host}:{self.port} did not start; see the log")
            time.sleep(0.01)
        log.info("API listening on %s", self.url)
        return self.url

    def stop(self) -> None:
        """Stop serving and close the socket; requests in flight get up to 5 s to finish."""
        if self._server is None:
            return
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = self._bound = None

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
