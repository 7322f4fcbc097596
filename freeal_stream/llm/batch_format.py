"""Batch files: requests as JSONL lines, split into files a provider accepts, and result lines read back.

A line is {"custom_id": the request key, "method": "POST", "url": "/v1/chat/completions", "body": the live
request's body}, so a batch answer is the same request, stored under the same key, as a live one (vLLM's
`run-batch` reads and writes the same format). A provider takes one model per file, at most 50,000 lines
and 200 MB a file, and answers in any order: results are matched back by custom_id.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

from freeal_stream.llm.client import ChatAnswer, ChatRequest, FatalLLMError, _read_answer, request_body
from freeal_stream.llm.ratelimit import estimate_tokens
from freeal_stream.llm.retry import BadResponse, status_failure

log = logging.getLogger(__name__)

ENDPOINT: Final = "/v1/chat/completions"  # Final: a Literal where the SDK wants one
MAX_FILE_BYTES = 200 * 1000 * 1000  # OpenAI's cap per input file (decimal MB: errs low)
UNFINISHED = "batch_unfinished"  # a row the batch never ran (expired, cancelled, failed batch, missing)


class BatchFileError(FatalLLMError):
    """One request cannot go in any batch file (it alone passes a per-file limit)."""


def request_json(request: ChatRequest) -> str:
    """A request as stored with its submission, so a later run can resend or store it without rebuilding it."""
    return json.dumps(asdict(request), ensure_ascii=False, separators=(",", ":"))


def request_from_json(text: str) -> ChatRequest:
    d = json.loads(text)
    return ChatRequest(**{**d, "messages": tuple((role, content) for role, content in d["messages"])})


def jsonl_line(request: ChatRequest) -> bytes:
    line = {"custom_id": request.key(), "method": "POST", "url": ENDPOINT, "body": request_body(request)}
    return (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def prompt_tokens(request: ChatRequest) -> int:
    """Estimated input tokens: what a provider's enqueued-token limit counts."""
    return estimate_tokens(request.messages, 0)


@dataclass(frozen=True)
class BatchFile:
    """Consecutive requests of one model that fit in one input file."""

    requests: tuple[ChatRequest, ...]
    prompt_tokens: int

    @property
    def model(self) -> str:
        return self.requests[0].model

    def content(self) -> bytes:
        return b"".join(jsonl_line(r) for r in self.requests)


def plan_files(
    requests: Sequence[ChatRequest], max_requests: int, max_bytes: int = MAX_FILE_BYTES, max_tokens: int = 0
) -> list[BatchFile]:
    """Requests in order, cut into files of one model each within every limit (max_tokens 0 = none)."""
    files: list[BatchFile] = []
    part: list[ChatRequest] = []
    size = tokens = 0
    for r in requests:
        n_bytes, n_tokens = len(jsonl_line(r)), prompt_tokens(r)
        if n_bytes > max_bytes or (max_tokens and n_tokens > max_tokens):
            raise BatchFileError(
                f"request {r.key()[:12]} alone (~{n_tokens} prompt tokens, {n_bytes} bytes) passes "
                f"a batch file's limit ({max_bytes} bytes, {max_tokens or 'no'} enqueued tokens). "
                "Fix: raise llm.batch_enqueued_tokens to the provider's limit, or shorten "
                "data.max_text_chars / freeal.demos_per_prompt"
            )
        if part and (
            r.model != part[0].model
            or len(part) >= max_requests
            or size + n_bytes > max_bytes
            or (max_tokens and tokens + n_tokens > max_tokens)
        ):
            files.append(BatchFile(tuple(part), tokens))
            part, size, tokens = [], 0, 0
        part.append(r)
        size, tokens = size + n_bytes, tokens + n_tokens
    if part:
        files.append(BatchFile(tuple(part), tokens))
    return files


@dataclass(frozen=True)
class RowResult:
    """One result line: an answer, or a failure (`retry`: worth sending again in a new batch)."""

    key: str
    answer: ChatAnswer
    retry: bool = False


def failed(key: str, error: str, latency_s: float = 0.0) -> ChatAnswer:
    return ChatAnswer.failure(key, error, attempts=1, latency_s=latency_s)


def _row(line: dict[str, Any], latency_s: float, requests: Mapping[str, ChatRequest]) -> RowResult:
    key = str(line["custom_id"])
    response, error = line.get("response"), line.get("error")
    if response is None:  # not run: expired, cancelled, or the provider gave up on it
        code = (error or {}).get("code") or "unknown"
        log.info("batch row %s not run: %s", key[:12], code)
        return RowResult(key, failed(key, UNFINISHED, latency_s), retry=True)
    status = int(response.get("status_code") or 0)
    if status != 200:
        message = str(((response.get("body") or {}).get("error") or {}).get("message", ""))[:200]
        f = status_failure(status, message)
        log.info("batch row %s: HTTP %d %s", key[:12], status, message)
        return RowResult(key, failed(key, f.kind, latency_s), retry=f.transient)
    try:  # read and checked by the same code as a live answer
        return RowResult(key, _read_answer(response.get("body"), requests[key], key, 1, latency_s))
    except BadResponse as exc:
        log.info("batch row %s: not a chat completion (%s)", key[:12], str(exc)[:200])
        return RowResult(key, failed(key, "bad_response", latency_s), retry=True)


def read_results(content: bytes, latency_s: float, requests: Mapping[str, ChatRequest]) -> list[RowResult]:
    """The rows of an output or error file for `requests` (by key); a line that is not JSON, or names no request
    sent in that file, is skipped: its row counts as missing."""
    rows = []
    for n, raw in enumerate(content.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
            rows.append(_row(line, latency_s, requests))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("batch result line %d unreadable (%s); its request counts as not run", n, exc)
    return rows
