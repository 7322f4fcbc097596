"""`freeal-stream serve`: keep labelling as data arrives.

Data comes in through the inbox folder and the HTTP API, both on background threads that hand batches
to the store actor (so an item is committed the moment it is accepted). The main thread runs rounds:
first the job's own rounds, then one more whenever enough new items wait (`service.min_new_items`) or
new items have waited `service.round_every_s`. A round takes its pool when it starts, so an item that
arrives mid-round is stored at once and joins the next round; it is never half-labelled.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from freeal_stream.config import ConfigError, JobConfig
from freeal_stream.intake import add_api_items, ingest_data_file, quarantine_rows
from freeal_stream.loop import FreeALRun
from freeal_stream.progress import Progress
from freeal_stream.service.client import write_service_file
from freeal_stream.service.http_api import ApiHandlers, ApiServer, is_loopback
from freeal_stream.service.inbox import Inbox
from freeal_stream.session import Session
from freeal_stream.status import job_status
from freeal_stream.store import StateError


def service_token(job: JobConfig) -> str | None:
    """The bearer token the API will require, read from `service.token_env`: the one place the token rule lives.

    Checked before anything starts: an empty token is refused, and so is no token on an address other machines
    can reach (anyone reaching it could add items and read labels).
    """
    svc = job.service
    token = os.environ.get(svc.token_env)
    if token is not None and not token.strip():
        raise ConfigError(
            job.source_file,
            "service.token_env",
            f"the environment variable {svc.token_env} is set but empty",
            f"set {svc.token_env} to a long random string, or unset it (loopback only)",
        )
    if not token and not is_loopback(svc.host):
        raise ConfigError(
            job.source_file,
            "service.host",
            f"'{svc.host}' is reachable from other machines and no token is set",
            f"set the environment variable {svc.token_env} to a long random "
            "string (clients send it as 'Authorization: Bearer ...'), or use host 127.0.0.1",
        )
    return token or None


class Service:
    """The running service around one session."""

    def __init__(self, session: Session, progress: Progress, token: str | None = None):
        self.s, self.job, self.store, self.progress = session, session.job, session.store, progress
        self.rounds = FreeALRun(session, progress)
        self.token = token  # from service_token(job), checked before the session started
        self.stop = threading.Event()
        self.class_names = self.job.task.class_names

    # ---- ways in ----------------------------------------------------------------------------------
    def add_items(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return add_api_items(self.store, self.job, items)

    def quarantine(self, rows: list[dict[str, Any]], source: str) -> None:
        quarantine_rows(self.store, rows, source)

    def ingest_file(self, path: Path) -> int:
        return ingest_data_file(self.store, self.job, path, self.progress.say)

    def status(self) -> dict[str, Any]:
        return {**job_status(self.store, self.job), "service": {"waiting_for_a_round": self.store.unscored_count()}}

    def labels(self, since: int, limit: int) -> dict[str, Any]:
        return self.store.labels_since(since, limit, self.class_names, self.job.freeal.label_of_record)

    # ---- rounds -----------------------------------------------------------------------------------
    def _due(self, waiting: int, first_seen: float | None) -> bool:
        svc = self.job.service
        if waiting >= svc.min_new_items:
            return True
        return bool(
            waiting
            and svc.round_every_s
            and first_seen is not None
            and time.monotonic() - first_seen >= svc.round_every_s
        )

    def serve(self) -> None:
        """Run until `stop` is set (SIGTERM / Ctrl-C): the job's rounds, then rounds as data arrives."""
        svc = self.job.service
        token = self.token
        inbox = Inbox(
            self.job.inbox_path,
            self.ingest_file,
            settle_s=max(0.5, svc.poll_s),
            seen=self.store.file_ingested,
            remember=self.store.remember_file,
        )
        api = ApiServer(
            ApiHandlers(self.add_items, self.status, self.labels, self.quarantine),
            host=svc.host,
            port=svc.port,
            token=token,
            token_env=svc.token_env,
            allowed_hosts=svc.allowed_hosts,
        )
        try:
            url = api.start()
        except OSError as e:
            raise StateError(
                f"cannot listen on {svc.host}:{svc.port} ({e.strerror}). Fix: stop what uses that "
                "port, or set service.port in the job file (0 = any free port)"
            ) from None
        service_file = write_service_file(self.job.state_path, api.local_url, os.getpid())
        watcher = threading.Thread(target=inbox.watch, args=(self.stop, svc.poll_s), daemon=True, name="inbox")
        watcher.start()
        self.progress.say(
            f"serving {self.job.name}: API {url} ({'token required' if token else 'no token'}), inbox {inbox.root}"
        )
        try:
            self.rounds.run()  # the job's own rounds first (resumed if they were under way)
            first_seen: float | None = None
            while not self.stop.is_set():
                waiting = self.store.unscored_count()
                first_seen = (first_seen or time.monotonic()) if waiting else None
                if self._due(waiting, first_seen):
                    round_ = self.rounds.next_round()
                    self.progress.say(f"{waiting} new items: starting round {round_}")
                    if not self.rounds.run_round(round_):
                        n = self.rounds.label_new_with_slm()
                        self.progress.say(
                            f"no round possible now (budget spent or nothing to annotate): {n} new "
                            "items labelled by the latest SLM; the LLM sees new items once a round "
                            "can run"
                        )
                        if not n:  # no SLM yet to label them: look again later, not in a tight loop
                            self.stop.wait(max(30.0, svc.poll_s))
                    first_seen = None
                    continue
                self.stop.wait(svc.poll_s)
        finally:
            self.stop.set()
            api.stop()
            watcher.join(timeout=10)
            if service_file.exists():
                service_file.unlink()
