"""A scriptable OpenAI-compatible chat server for fault-injection tests (offline, on 127.0.0.1).

Each incoming POST /v1/chat/completions takes the next scripted Reply (then falls back to
`responder`), so a test can play 429s, 5xx bursts, slow answers, dropped sockets, auth and model
errors, garbage bodies and logprobs. It records every body (and counts them by hash) and the most
requests it ever had in flight at once, so tests can assert what was (not) sent.

    with FakeOpenAIServer() as server:
        server.script(error(429, headers={"Retry-After": "0.2"}), ok("positive"))
        client = LLMClient(cfg, server.base_url, "key")
"""

from __future__ import annotations

import collections
import hashlib
import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """One scripted answer. `raw` replaces the JSON body; `drop` closes the socket without answering."""

    status: int = 200
    content: str | None = "positive"
    headers: dict[str, str] = field(default_factory=dict)
    error_message: str = ""
    error_code: str | None = None
    raw: bytes | None = None
    delay_s: float = 0.0
    drop: bool = False
    top_logprobs: list[list[tuple[str, float]]] | None = None  # per generated token; first = chosen
    cached_tokens: int | None = None
    finish_reason: str = "stop"
    patch: Callable[[dict[str, Any]], None] | None = None  # edits the completion body before it is sent


def ok(content: str | None = "positive", **kw: Any) -> Reply:
    return Reply(content=content, **kw)


def error(status: int, message: str = "scripted error", **kw: Any) -> Reply:
    return Reply(status=status, error_message=message, **kw)


def drop() -> Reply:
    return Reply(drop=True)


def slow(seconds: float, content: str = "positive") -> Reply:
    return Reply(content=content, delay_s=seconds)


def garbage(raw: bytes = b"<html>502 Bad Gateway (not JSON)</html>") -> Reply:
    return Reply(raw=raw)


def body_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class FakeOpenAIServer:
    """Context manager; `base_url` ends in /v1 like a real OpenAI-compatible endpoint."""

    def __init__(
        self,
        responder: Callable[[dict[str, Any]], Reply] | None = None,
        *,
        api_key: str | None = None,
        models: set[str] | None = None,
        reject_logprobs: bool = False,
    ):
        self.responder = responder or (lambda body: ok())
        self.api_key = api_key  # when set, any other bearer token gets 401
        self.models = models  # when set, any other model gets 404
        self.reject_logprobs = reject_logprobs
        self.requests: list[dict[str, Any]] = []
        self.hash_counts: collections.Counter[str] = collections.Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self._script: collections.deque[Reply] = collections.deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def script(self, *replies: Reply) -> None:
        """Queue replies for the next requests, in arrival order."""
        with self._lock:
            self._script.extend(replies)

    def __enter__(self) -> FakeOpenAIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()  # wakes handlers sleeping in a delay
        self._httpd.shutdown()
        self._httpd.server_close()

    def _choose(self, body: dict[str, Any], auth: str) -> Reply:
        if self.api_key is not None and auth != f"Bearer {self.api_key}":
            given = auth.removeprefix("Bearer ")
            # echoes the key like real providers do, so tests can check we never repeat it
            return error(401, f"Incorrect API key provided: {given}.", error_code="invalid_api_key")
        if self.models is not None and body.get("model") not in self.models:
            return error(404, f"The model `{body.get('model')}` does not exist.", error_code="model_not_found")
        if self.reject_logprobs and ("logprobs" in body or "top_logprobs" in body):
            return error(400, "logprobs is not supported by this server")
        with self._lock:
            if self._script:
                return self._script.popleft()
        return self.responder(body)

    def _completion(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        prompt_chars = sum(len(m.get("content") or "") for m in body.get("messages", []))
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_chars // 4 + 1,
            "completion_tokens": len((reply.content or "").split()) + 1,
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if reply.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": reply.cached_tokens}
        logprobs = None
        if reply.top_logprobs is not None and body.get("logprobs"):
            logprobs = {
                "content": [
                    {
                        "token": cands[0][0],
                        "logprob": cands[0][1],
                        "bytes": None,
                        "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in cands],
                    }
                    for cands in reply.top_logprobs
                ]
            }
        completion = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model"),
            "choices": [
                {
                    "index": 0,
                    "finish_reason": reply.finish_reason,
                    "logprobs": logprobs,
                    "message": {"role": "assistant", "content": reply.content},
                }
            ],
            "usage": usage,
        }
        if reply.patch is not None:
            reply.patch(completion)  # json.dumps writes NaN and Infinity as bare words, as some servers do
        return completion

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                with server._lock:
                    server.requests.append(body)
                    server.hash_counts[body_hash(body)] += 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._answer(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) before we answered
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _answer(self, body: dict[str, Any]) -> None:
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    return self._send(404, json.dumps({"error": {"message": f"no route {self.path}"}}).encode())
                reply = server._choose(body, self.headers.get("Authorization", ""))
                if reply.delay_s and server._stopping.wait(reply.delay_s):
                    return
                if reply.drop:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if reply.raw is not None:
                    return self._send(reply.status, reply.raw, reply.headers, "text/html")
                if reply.status != 200:
                    err = {
                        "message": reply.error_message,
                        "type": "invalid_request_error",
                        "param": None,
                        "code": reply.error_code,
                    }
                    return self._send(reply.status, json.dumps({"error": err}).encode(), reply.headers)
                self._send(200, json.dumps(server._completion(body, reply)).encode(), reply.headers)

            def _send(
                self,
                status: int,
                payload: bytes,
                headers: dict[str, str] | None = None,
                content_type: str = "application/json",
            ) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)

        return Handler
