"""A provider's files and batches endpoints, through the openai SDK: upload, create, find, poll, download.

These calls are few and safe to repeat, so the SDK's own retries (with backoff) cover short blips; what
still fails raises FatalLLMError naming the endpoint and the fix (BatchAPIUnavailable when it may pass on
its own). Every upload and batch carries our submission id (the file's name, the batch's metadata), so a
run killed between upload and create finds what it had sent instead of sending it again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

import openai
from openai.types import Batch

from freeal_stream.config import LLMConfig
from freeal_stream.llm.batch_format import ENDPOINT
from freeal_stream.llm.client import _NO_KEY, FatalLLMError
from freeal_stream.llm.retry import classify

METADATA_KEY = "freeal_submission"
LOOKUP_SLACK_S = 3600.0  # how far before a submission was recorded its upload or batch may be dated
T = TypeVar("T")


class _Dated(Protocol):
    created_at: int  # a file's or batch's creation time (Unix seconds)


DatedT = TypeVar("DatedT", bound=_Dated)


class BatchAPIUnavailable(FatalLLMError):
    """The batch endpoints failed in a way that may pass (5xx, 429, timeout, connection)."""


def file_name(submission: str) -> str:
    return f"freeal-{submission}.jsonl"


class BatchAPI:
    def __init__(self, cfg: LLMConfig, base_url: str, api_key: str | None):
        self.base_url, self._key = base_url, api_key
        self.client = openai.OpenAI(
            base_url=base_url, api_key=api_key or _NO_KEY, max_retries=cfg.max_retries, timeout=cfg.timeout_s
        )
        self.key_env = cfg.api_key_env

    def upload(self, submission: str, content: bytes) -> str:
        """The new input file's id."""
        f = self._call(
            "upload the batch file",
            lambda: self.client.files.create(
                file=(file_name(submission), content, "application/jsonl"), purpose="batch"
            ),
        )
        return f.id

    def create(self, submission: str, file_id: str) -> Batch:
        return self._call(
            "create the batch",
            lambda: self.client.batches.create(
                input_file_id=file_id, endpoint=ENDPOINT, completion_window="24h", metadata={METADATA_KEY: submission}
            ),
        )

    def retrieve(self, batch_id: str) -> Batch:
        return self._call(f"poll batch {batch_id}", lambda: self.client.batches.retrieve(batch_id))

    def download(self, file_id: str) -> bytes:
        return self._call(f"download file {file_id}", lambda: self.client.files.content(file_id).read())

    def find_file(self, submission: str, since: float) -> str | None:
        """The id of an input file uploaded for `submission` (a run killed before it recorded the id)."""
        pages = self._call("list files", lambda: self.client.files.list(purpose="batch", order="desc"))
        for f in self._newer(pages, since):
            if f.filename == file_name(submission):
                return f.id
        return None

    def find_batch(self, submission: str, file_id: str, since: float) -> Batch | None:
        """The batch created for `submission` (a run killed before it recorded the batch id)."""
        pages = self._call("list batches", lambda: self.client.batches.list(limit=100))
        for b in self._newer(pages, since):
            if (b.metadata or {}).get(METADATA_KEY) == submission or b.input_file_id == file_id:
                return b
        return None

    def _newer(self, pages: Iterable[DatedT], since: float) -> Iterable[DatedT]:
        """Items of a newest-first listing down to `since` (less slack), pages fetched as needed."""
        it = iter(pages)
        while True:
            item = self._call("list", lambda: next(it, None))
            if item is None or item.created_at < since - LOOKUP_SLACK_S:
                return
            yield item

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except openai.OpenAIError as exc:
            failure = classify(exc)
        where = f"{self.base_url} (while trying to {what})"
        if failure.status in (401, 403):  # the server's text is left out: providers echo the key in it
            raise FatalLLMError(
                f"HTTP {failure.status} from {where}: the API key was refused or lacks permission; "
                f"check the key in the environment variable {self.key_env}"
            )
        message = failure.message.replace(self._key, "[key]") if self._key else failure.message
        if failure.status == 404 and what in (
            "upload the batch file",
            "create the batch",
            "list files",
            "list batches",
        ):
            raise FatalLLMError(
                f"HTTP 404 from {where}: {message}. This endpoint has no OpenAI files/batches "
                "API; use llm.mode live for it"
            )
        if failure.transient:
            raise BatchAPIUnavailable(
                f"{where}: {failure.kind}: {message}. Every submission is recorded in the state; run again to resume"
            )
        raise FatalLLMError(f"{where}: {failure.kind}: {message}")
