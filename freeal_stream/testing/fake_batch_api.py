"""A local OpenAI files + batches service that runs each batch line against an upstream chat endpoint.

Like vLLM's `run-batch`, but behind the HTTP endpoints the openai SDK calls, so a batch's labels are real
(from freeal_stream/testing/keyword_llm.py or the embedded llama.cpp server) and the client code under test is the one a
user runs against OpenAI. Faithful where the client can tell: files are uploaded as multipart with
purpose `batch`; a batch goes validating -> in_progress -> finalizing -> completed (or failed at
validation, expired with partial results, cancelling -> cancelled); lines are validated as OpenAI does
(JSON, unique custom_id, POST to the batch's endpoint, one model per file, <= 50,000 lines and 200 MB);
rows run concurrently and come back in any order; answers go to the output file, rows the upstream
refused to the error file with their response, rows never run to the error file with `batch_expired` or
`batch_cancelled`; a model's enqueued prompt tokens may be capped (`token_limit_exceeded`); lists are
newest first with cursor paging. POST /v1/chat/completions passes through, so live mode can use the same URL.

Faults for tests, one BatchScript per batch in creation order: expire after n rows, hold (run nothing
until `release()`: a batch that never finishes), fail validation. `hook(stage, method, path)` runs
before a request is handled ("before") and after, before the answer is sent ("handled"): a test can
kill its client there. Counters: uploads, batches_created, rows_run (batch rows sent upstream),
chat_requests (live requests passed through).

    python -m freeal_stream.testing.fake_batch_api --port 8089 --upstream keyword   # or: --upstream local | URL
"""

from __future__ import annotations

import argparse
import collections
import email.parser
import email.policy
import json
import math
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_LINES = 50_000
MAX_BYTES = 200 * 1000 * 1000
ENDPOINTS = ("/v1/chat/completions",)
_UNFINISHED = {
    "expired": ("batch_expired", "This request could not be executed before the completion window expired."),
    "cancelled": ("batch_cancelled", "This request was cancelled before it could be executed."),
}


@dataclass
class BatchScript:
    """How one batch misbehaves (the default runs it to completion)."""

    expire_after_rows: int | None = None  # run this many rows, then expire (the rest: batch_expired)
    hold: bool = False  # stay in_progress, running nothing, until release()
    fail_code: str | None = None  # fail validation with this error code


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def _now() -> int:
    return int(time.time())


def prompt_tokens(body: dict[str, Any]) -> int:
    """~4 characters a token, as an enqueued-token limit would count a line's prompt."""
    return math.ceil(sum(len(str(m.get("content") or "")) for m in body.get("messages", [])) / 4)


class FakeBatchAPI:
    """Context manager; `base_url` ends in /v1."""

    def __init__(
        self,
        upstream: str,
        *,
        api_key: str | None = None,
        workers: int = 2,
        step_s: float = 0.05,
        enqueued_token_limit: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        hook: Callable[[str, str, str], None] | None = None,
    ):
        self.upstream = upstream.rstrip("/")
        self.api_key, self.workers, self.step_s = api_key, workers, step_s
        self.enqueued_token_limit = enqueued_token_limit
        self.hook = hook
        self.files: dict[str, dict[str, Any]] = {}
        self.contents: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.uploads = self.batches_created = self.rows_run = self.chat_requests = 0
        self._scripts: collections.deque[BatchScript] = collections.deque()
        self._tokens: dict[str, int] = {}  # batch id -> enqueued prompt tokens while it runs
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._stopping = threading.Event()
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        assert isinstance(host, str)  # an AF_INET server; only AF_UNIX addresses are bytes
        return f"http://{host}:{port}/v1"

    def script(self, *scripts: BatchScript) -> None:
        """Behaviours for the next batches created, in order."""
        with self._lock:
            self._scripts.extend(scripts)

    def release(self) -> None:
        """Let held batches run."""
        self._released.set()

    def __enter__(self) -> FakeBatchAPI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._released.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    # ---- files ----------------------------------------------------------------------------------------
    def _add_file(self, content: bytes, filename: str, purpose: str) -> dict[str, Any]:
        f: dict[str, Any] = {
            "id": f"file-{uuid.uuid4().hex[:24]}",
            "object": "file",
            "bytes": len(content),
            "created_at": _now(),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }
        with self._lock:
            self.files[f["id"]] = f
            self.contents[f["id"]] = content
        return f

    def _upload(self, content_type: str, body: bytes) -> dict[str, Any]:
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + body
        )
        if not msg.is_multipart():
            raise ApiError(400, "the upload must be multipart/form-data", param="file")
        fields = {part.get_param("name", header="content-disposition"): part for part in msg.iter_parts()}
        if "file" not in fields or "purpose" not in fields:
            raise ApiError(400, "missing required parameter: 'file' and 'purpose'", param="file")
        purpose_bytes = fields["purpose"].get_payload(decode=True)
        assert isinstance(purpose_bytes, bytes)  # a non-multipart part decodes to bytes
        purpose = purpose_bytes.decode()
        if purpose not in ("batch", "fine-tune", "assistants", "vision", "user_data"):
            raise ApiError(400, f"'{purpose}' is not a valid purpose", param="purpose")
        content = fields["file"].get_payload(decode=True) or b""
        assert isinstance(content, bytes)  # as for purpose
        if purpose == "batch" and len(content) > MAX_BYTES:
            raise ApiError(400, f"file is {len(content)} bytes; a batch file may hold at most {MAX_BYTES}")
        with self._lock:
            self.uploads += 1
        return self._add_file(content, fields["file"].get_filename() or "upload", purpose)

    def _file(self, file_id: str) -> dict[str, Any]:
        if file_id not in self.files:
            raise ApiError(404, f"No such File object: {file_id}", param="id")
        return self.files[file_id]

    # ---- batches ----------------------------------------------------------------------------------------
    def _create(self, body: dict[str, Any]) -> dict[str, Any]:
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str) or not file_id:
            raise ApiError(400, "input_file_id is required", param="input_file_id")  # as OpenAI answers
        if body.get("endpoint") not in ENDPOINTS:
            raise ApiError(400, f"endpoint must be one of {list(ENDPOINTS)}", param="endpoint")
        if body.get("completion_window") != "24h":
            raise ApiError(400, "completion_window must be '24h'", param="completion_window")
        metadata = body.get("metadata") or {}
        if len(metadata) > 16 or any(len(k) > 64 or len(str(v)) > 512 for k, v in metadata.items()):
            raise ApiError(400, "metadata: at most 16 keys of <= 64 characters, values <= 512", param="metadata")
        if self._file(file_id)["purpose"] != "batch":
            raise ApiError(400, f"file {file_id} was not uploaded with purpose 'batch'", param="input_file_id")
        now = _now()
        b = {
            "id": f"batch_{uuid.uuid4().hex[:24]}",
            "object": "batch",
            "endpoint": body["endpoint"],
            "errors": None,
            "input_file_id": file_id,
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 86400,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": metadata or None,
            "model": None,
            "usage": None,
        }
        with self._lock:
            self.batches[b["id"]] = b
            self.batches_created += 1
            script = self._scripts.popleft() if self._scripts else BatchScript()
        threading.Thread(target=self._run, args=(b["id"], script), daemon=True).start()
        return dict(b)

    def _cancel(self, batch_id: str) -> dict[str, Any]:
        with self._lock:
            b = self._batch(batch_id)
            if b["status"] in ("validating", "in_progress"):
                b.update(status="cancelling", cancelling_at=_now())
            elif b["status"] not in ("cancelling", "cancelled"):
                raise ApiError(409, f"Cannot cancel a batch with status '{b['status']}'.")
            return dict(b)

    def _batch(self, batch_id: str) -> dict[str, Any]:
        if batch_id not in self.batches:
            raise ApiError(404, f"No batch found with id '{batch_id}'.", param="batch_id")
        return self.batches[batch_id]

    def _set(self, batch_id: str, **fields: Any) -> None:
        with self._lock:
            self.batches[batch_id].update(fields)

    def _validate(self, b: dict[str, Any], script: BatchScript) -> list[dict[str, Any]]:
        """The file's lines, or ApiError-like error rows (code, message, line) for a failed batch."""
        raw = self.contents[b["input_file_id"]].splitlines()
        if script.fail_code:
            raise _Invalid([{"code": script.fail_code, "message": "scripted validation failure", "line": None}])
        if len(raw) > MAX_LINES:
            raise _Invalid(
                [{"code": "too_many_requests", "message": f"{len(raw)} lines; at most {MAX_LINES}", "line": None}]
            )
        lines, seen, models, errors = [], set(), set(), []
        for n, text in enumerate(raw, 1):
            try:
                line = json.loads(text)
                assert isinstance(line, dict) and isinstance(line.get("body"), dict)
            except (ValueError, AssertionError):
                errors.append({"code": "invalid_json_line", "message": "not a JSON object with a body", "line": n})
                continue
            if not isinstance(line.get("custom_id"), str) or line["custom_id"] in seen:
                errors.append({"code": "duplicate_custom_id", "message": "custom_id missing or repeated", "line": n})
            if line.get("method") != "POST" or line.get("url") != b["endpoint"]:
                errors.append({"code": "invalid_url", "message": f"must POST to {b['endpoint']}", "line": n})
            seen.add(line.get("custom_id"))
            models.add(line["body"].get("model"))
            lines.append(line)
        if len(models) > 1:
            errors.append(
                {
                    "code": "mismatched_model",
                    "message": f"one model per file, got {sorted(map(str, models))}",
                    "line": None,
                }
            )
        if errors:
            raise _Invalid(errors[:100])
        tokens = sum(prompt_tokens(line["body"]) for line in lines)
        model = next(iter(models), None)
        with self._lock:
            queued = sum(t for bid, t in self._tokens.items() if self.batches[bid]["model"] == model)
            if self.enqueued_token_limit and queued + tokens > self.enqueued_token_limit:
                raise _Invalid(
                    [
                        {
                            "code": "token_limit_exceeded",
                            "line": None,
                            "message": f"Enqueued token limit reached for {model}. Limit: {self.enqueued_token_limit} "
                            f"enqueued tokens; {queued} in flight, this batch {tokens}. Please try again "
                            "once some in_progress batches have been completed.",
                        }
                    ]
                )
            self._tokens[b["id"]] = tokens
            b["model"] = model
        return lines

    def _run(self, batch_id: str, script: BatchScript) -> None:
        b = self.batches[batch_id]
        time.sleep(self.step_s)
        try:
            lines = self._validate(b, script)
        except _Invalid as e:
            self._set(batch_id, status="failed", failed_at=_now(), errors={"object": "list", "data": e.errors})
            return
        with self._lock:
            if b["status"] == "cancelling":
                lines = []
            else:
                b.update(status="in_progress", in_progress_at=_now())
            b["request_counts"] = {"total": len(lines), "completed": 0, "failed": 0}
        if script.hold:
            while not self._released.wait(0.05):
                if b["status"] == "cancelling":
                    break
        results: dict[str, tuple[bool, dict[str, Any]]] = {}
        todo = collections.deque(lines)
        started = [0]

        def work() -> None:
            while not self._stopping.is_set():
                with self._lock:
                    if (
                        not todo
                        or b["status"] == "cancelling"
                        or (script.expire_after_rows is not None and started[0] >= script.expire_after_rows)
                    ):
                        return
                    line = todo.popleft()
                    started[0] += 1
                ok, row = self._execute(line)
                with self._lock:
                    results[line["custom_id"]] = (ok, row)
                    b["request_counts"]["completed" if ok else "failed"] += 1

        threads = [threading.Thread(target=work, daemon=True) for _ in range(self.workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self._stopping.is_set():
            return
        final = "cancelled" if b["status"] == "cancelling" else "expired" if todo else "completed"
        if final == "completed":
            self._set(batch_id, status="finalizing", finalizing_at=_now())
            time.sleep(self.step_s)
        self._finish(b, lines, results, final)

    def _execute(self, line: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """One row, run by the upstream: (answered with 200, its output or error line)."""
        with self._lock:
            self.rows_run += 1
        status, body = self._upstream("/chat/completions", json.dumps(line["body"]).encode())
        row = {
            "id": f"batch_req_{uuid.uuid4().hex[:24]}",
            "custom_id": line["custom_id"],
            "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex[:24]}", "body": body},
            "error": None,
        }
        return status == 200, row

    def _upstream(self, path: str, data: bytes) -> tuple[int, Any]:
        req = urllib.request.Request(
            self.upstream + path, data=data, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        except OSError as e:
            return 502, {"error": {"message": f"upstream unreachable: {e}", "type": "server_error"}}
        try:
            return status, json.loads(raw)
        except ValueError:
            return (502 if status == 200 else status), {"error": {"message": raw[:200].decode(errors="replace")}}

    def _finish(
        self, b: dict[str, Any], lines: list[dict[str, Any]], results: dict[str, tuple[bool, dict]], final: str
    ) -> None:
        out = [row for ok, row in results.values() if ok]
        err = [row for ok, row in results.values() if not ok]
        if final in _UNFINISHED:
            code, message = _UNFINISHED[final]
            err += [
                {
                    "id": f"batch_req_{uuid.uuid4().hex[:24]}",
                    "custom_id": line["custom_id"],
                    "response": None,
                    "error": {"code": code, "message": message},
                }
                for line in lines
                if line["custom_id"] not in results
            ]
        fields: dict[str, Any] = {"status": final, f"{final}_at": _now()}
        for rows, kind in ((out, "output"), (err, "error")):
            if rows:
                content = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
                fields[f"{kind}_file_id"] = self._add_file(content, f"{b['id']}_{kind}.jsonl", "batch_output")["id"]
        usage = [r["response"]["body"].get("usage") or {} for r in out]
        fields["usage"] = {
            "input_tokens": sum(u.get("prompt_tokens", 0) for u in usage),
            "input_tokens_details": {
                "cached_tokens": sum((u.get("prompt_tokens_details") or {}).get("cached_tokens", 0) for u in usage)
            },
            "output_tokens": sum(u.get("completion_tokens", 0) for u in usage),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": sum(u.get("total_tokens", 0) for u in usage),
        }
        with self._lock:
            self._tokens.pop(b["id"], None)
            b.update(fields)

    # ---- HTTP ---------------------------------------------------------------------------------------------
    def _route(self, method: str, path: str, query: dict[str, str], headers: Any, body: bytes) -> tuple[int, Any]:
        parts = path.rstrip("/").split("/")[2:]  # after /v1
        if method == "POST" and parts == ["chat", "completions"]:
            with self._lock:
                self.chat_requests += 1
            return self._upstream("/chat/completions", body)
        if parts[:1] == ["files"]:
            if method == "POST" and len(parts) == 1:
                return 200, self._upload(headers.get("Content-Type", ""), body)
            if method == "GET" and len(parts) == 1:
                items = [f for f in self.files.values() if f["purpose"] == query.get("purpose", f["purpose"])]
                return 200, _page(items, query, query.get("order", "desc"))
            if method == "GET" and len(parts) == 2:
                return 200, self._file(parts[1])
            if method == "GET" and len(parts) == 3 and parts[2] == "content":
                self._file(parts[1])
                return 200, self.contents[parts[1]]
            if method == "DELETE" and len(parts) == 2:
                self._file(parts[1])
                with self._lock:
                    del self.files[parts[1]]
                return 200, {"id": parts[1], "object": "file", "deleted": True}
        if parts[:1] == ["batches"]:
            if method == "POST" and len(parts) == 1:
                return 200, self._create(json.loads(body or b"{}"))
            if method == "GET" and len(parts) == 1:
                return 200, _page(list(self.batches.values()), query, "desc")
            if method == "GET" and len(parts) == 2:
                with self._lock:
                    return 200, json.loads(json.dumps(self._batch(parts[1])))
            if method == "POST" and len(parts) == 3 and parts[2] == "cancel":
                return 200, self._cancel(parts[1])
        raise ApiError(404, f"no route {method} {path}")

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self, method: str) -> None:
                url = urllib.parse.urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if server.hook:
                    server.hook("before", method, url.path)
                auth = self.headers.get("Authorization", "")
                try:
                    if server.api_key is not None and auth != f"Bearer {server.api_key}":
                        raise ApiError(
                            401, f"Incorrect API key provided: {auth.removeprefix('Bearer ')}.", "invalid_api_key"
                        )
                    status, payload = server._route(
                        method, url.path, dict(urllib.parse.parse_qsl(url.query)), self.headers, body
                    )
                except ApiError as e:
                    status, payload = (
                        e.status,
                        {
                            "error": {
                                "message": e.message,
                                "type": "invalid_request_error",
                                "param": e.param,
                                "code": e.code,
                            }
                        },
                    )
                if server.hook:
                    server.hook("handled", method, url.path)
                raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header(
                        "Content-Type", "application/octet-stream" if isinstance(payload, bytes) else "application/json"
                    )
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client is gone (a test killed it)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

        return Handler


class _Invalid(Exception):
    def __init__(self, errors: list[dict[str, Any]]):
        super().__init__(errors)
        self.errors = errors


def _page(items: list[dict[str, Any]], query: dict[str, str], order: str) -> dict[str, Any]:
    """A cursor page (`after` = the last id seen), in creation order or newest first."""
    items = list(items) if order == "asc" else list(reversed(items))
    if "after" in query:
        ids = [i["id"] for i in items]
        items = items[ids.index(query["after"]) + 1 :] if query["after"] in ids else []
    limit = int(query.get("limit", 20))
    page = [json.loads(json.dumps(i)) for i in items[:limit]]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m freeal_stream.testing.fake_batch_api",
        description="a local OpenAI files + batches API on 127.0.0.1 (for tests and demos)",
    )
    ap.add_argument("--port", type=int, default=8089)
    ap.add_argument(
        "--upstream",
        default="keyword",
        help="who answers each line: 'keyword' (freeal_stream/testing/keyword_llm.py, instant), "
        "'local' (the embedded llama.cpp server) or the base URL of any OpenAI-compatible chat "
        "endpoint",
    )
    ap.add_argument("--workers", type=int, default=1, help="rows run at once")
    args = ap.parse_args(argv)
    import contextlib
    import signal

    # Ctrl-C (or a SIGTERM) stops it even when it was started with SIGINT ignored, as a shell's background job is
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)

    with contextlib.ExitStack() as stack:
        upstream = args.upstream
        if upstream == "keyword":
            from freeal_stream.testing.fake_openai_server import FakeOpenAIServer
            from freeal_stream.testing.keyword_llm import respond

            upstream = stack.enter_context(FakeOpenAIServer(respond)).base_url
        elif upstream == "local":
            from freeal_stream.local_llm import LocalLLMServer

            upstream = stack.enter_context(LocalLLMServer()).base_url
        api = stack.enter_context(FakeBatchAPI(upstream, workers=args.workers, port=args.port, step_s=0.5))
        print(f"batch API on {api.base_url} (rows answered by {upstream}); Ctrl-C stops it", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
