"""One job's running parts: Ray, the store actor, the LLM endpoint and the worker actors.

`run` and `serve` both open a session, hand it to the coordinator (`loop.FreeALRun`) and close it;
closing stops the store actor first, so the DuckDB file is free for the next process the moment the
command returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import typing
from dataclasses import dataclass
from typing import Any

from ray.actor import ActorHandle

from freeal_stream import budget as budget_policy
from freeal_stream.actors.annotators import AnnotatorPool, Annotators, wait_for_actors
from freeal_stream.actors.runtime import cluster_has_gpu, start_ray
from freeal_stream.actors.scorers import ScorerPool
from freeal_stream.actors.store_actor import start_store
from freeal_stream.actors.trainer import start_trainer
from freeal_stream.config import JobConfig, Price, job_to_dict
from freeal_stream.errors import ActorsDied
from freeal_stream.progress import Progress
from freeal_stream.store import StateError, Store

# Fields that may change between runs on the same state: they steer how far the job goes or where it
# runs, not what its finished rounds mean. Anything else changed would mix incompatible rounds.
RESUMABLE_FIELDS = {
    "budget",
    "freeal.rounds",
    "freeal.label_of_record",
    "freeal.target_accuracy",
    "freeal.warmup_epochs",
    "freeal.generation_time_s",
    "llm.concurrency",
    "llm.requests_per_minute",
    "llm.tokens_per_minute",
    "llm.timeout_s",
    "llm.max_retries",
    "llm.server_threads",
    "slm.threads",
    "slm.device",
    "slm.epochs",
    "name",
    "state_dir",
    "ray",
    "service",
    "llm.mode",
    "llm.batch_poll_s",
    "llm.batch_poll_max_s",
    "llm.batch_max_wait_s",
    "llm.batch_max_requests",
    "llm.batch_enqueued_tokens",
}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("classes", "params", "prices") and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


_NO_DEFAULT = object()


def _default_of(key: str) -> Any:
    """The default of job field 'section.name', so state written before a field existed resumes as if
    it had held the default all along."""
    section, _, name = key.partition(".")
    cls = typing.get_type_hints(JobConfig).get(section)
    if not name or not dataclasses.is_dataclass(cls):
        return _NO_DEFAULT
    for f in dataclasses.fields(cls):
        if f.name == name and f.default is not dataclasses.MISSING:
            return f.default
    return _NO_DEFAULT


def check_resumable(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Fields whose change makes the stored rounds meaningless for this job (empty = resumable)."""
    a, b = _flatten(stored), _flatten(current)
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k, _default_of(k)) != b.get(k, _default_of(k)))
    return [k for k in changed if k not in RESUMABLE_FIELDS and k.split(".")[0] not in RESUMABLE_FIELDS]


def api_key(job: JobConfig, local: bool) -> str | None:
    """The API key from the environment variable the job names (never from the job file)."""
    return os.environ.get(job.llm.api_key_env) or ("local-server" if local else None)


@dataclass
class Session:
    """One job's running parts, as `open_session` started them."""

    job: JobConfig
    store: Store  # the store actor's proxy: Store's methods, run by the one writer
    annotators: Annotators  # the live annotator pool or batch mode (llm.mode)
    scorers: ScorerPool
    trainer: ActorHandle  # the trainer actor (`actors.trainer.Trainer`)
    model_name: str  # the name the endpoint serves (the embedded server's own name)
    price: Price | None  # the model's token prices (None: no budget.prices entry)
    guard: budget_policy.BudgetGuard
    where: str  # where Ray runs, in words
    trainer_restarts: int = 0

    def replace_trainer(self) -> None:
        """A new trainer actor after the last one died (a restarted actor would re-run __init__ anyway)."""
        self.trainer_restarts += 1
        if self.trainer_restarts > self.job.ray.max_restarts:
            raise ActorsDied("trainer", self.trainer_restarts, self.job.ray.max_restarts)
        self.trainer = start_trainer(self.job.ray, self.job.slm.threads, cluster_has_gpu())


def spent_now(store: Store, job: JobConfig) -> budget_policy.Spent:
    return budget_policy.spent_from_usage(store.usage_by_model(), job.budget)


def _open_store(job: JobConfig, wait_s: float = 15.0) -> Store:
    """The store actor for the job's state, refusing an incompatible config change.

    A file still held is retried for `wait_s`: after a `kill -9` the dead run's actors take a moment
    (~2-3 s measured) to notice and let go of it.
    """
    path = job.state_path / "freeal.duckdb"
    deadline = time.monotonic() + wait_s
    while True:  # probed here, so a held file never becomes a failed actor (and its traceback)
        try:
            Store(path).close()
            break
        except StateError:
            if time.monotonic() > deadline:
                raise StateError(
                    f"{path} is in use by another process. Fix: wait for the other freeal-stream run "
                    "or service on this state directory to finish (or stop it), or use another "
                    "state_dir"
                ) from None
            time.sleep(1.0)
    store = start_store(path)
    current = job_to_dict(job)
    stored = store.get_meta("job")
    if stored is not None:
        diff = check_resumable(json.loads(stored), current)
        if diff:
            store.close()
            raise StateError(
                f"{job.state_path}: state was made by a different job config; changed fields: "
                f"{', '.join(diff)}. Fix: revert them, or set a new state_dir to start afresh"
            )
    store.set_meta("job", json.dumps(current))
    return store


@contextlib.contextmanager
def open_session(job: JobConfig, progress: Progress, address: str | None = None):
    """Start everything a job needs; stop it all (store first) on the way out."""
    with contextlib.ExitStack() as stack:
        where, started = start_ray(job.ray, address)
        if started:
            import ray

            stack.callback(ray.shutdown)
        store = _open_store(job)
        stack.callback(store.close)
        base_url, model, local = _llm_endpoint(job, stack, progress)
        price = budget_policy.price_for(job.budget, model, batch=job.llm.mode == "batch")
        guard = budget_policy.BudgetGuard(job.budget, lambda: spent_now(store, job))
        llm_cfg = dataclasses.replace(job.llm, model=model)
        if job.llm.mode == "batch":
            from freeal_stream.llm.batch import BatchAnnotators

            annotators: Annotators = BatchAnnotators(
                llm_cfg,
                base_url,
                api_key(job, local),
                store,
                guard=guard,
                price=job.budget.prices.get(model),
                say=progress.say,
            )
        else:
            annotators = AnnotatorPool(
                llm_cfg,
                base_url,
                api_key(job, local),
                store,
                size=job.ray.annotators,
                chunk_size=job.ray.chunk_size,
                max_restarts=job.ray.max_restarts,
                resources=job.ray.annotator_resources,
                guard=guard,
                price=price,
            )
        stack.callback(annotators.shutdown)
        if isinstance(annotators, AnnotatorPool):
            wait_for_actors(annotators)
        scorers = ScorerPool(
            job.slm.max_length,
            job.slm.threads,
            size=job.ray.scorers,
            resources=job.ray.scorer_resources,
            max_restarts=job.ray.max_restarts,
        )
        trainer = start_trainer(job.ray, job.slm.threads, cluster_has_gpu())
        progress.say(
            f"running on {where}: {annotators.size} annotators, {job.ray.scorers} scorers, 1 trainer, 1 store writer"
        )
        yield Session(job, store, annotators, scorers, trainer, model, price, guard, where)


def _llm_endpoint(job: JobConfig, stack: contextlib.ExitStack, progress: Progress) -> tuple[str, str, bool]:
    """(base_url, model name, is_local): the job's endpoint, or the embedded server started for this run."""
    if job.llm.base_url:
        return job.llm.base_url, job.llm.model, False
    from freeal_stream.local_llm import LocalLLMServer

    server = LocalLLMServer(model=job.llm.model, context_size=job.llm.context_size, threads=job.llm.server_threads)
    progress.say(f"starting the embedded llama.cpp server ({job.llm.model}) on 127.0.0.1")
    base_url = server.start()
    stack.callback(server.stop)
    return base_url, server.model_name, True
