"""The one process that writes the job's DuckDB file, and a proxy that looks like a `Store` to callers.

DuckDB lets one process write a file, so every actor and the coordinator send the store actor their
batches; calls run one at a time, in arrival order. If the actor dies Ray restarts it (its `__init__`
reopens the file; DuckDB's WAL replays what was committed) and retries the call; every write is an
idempotent upsert, so a retried call cannot duplicate anything.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import ray
from ray.exceptions import RayTaskError

from freeal_stream.store import StateError, Store


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=3)
class StoreActor:
    def __init__(self, path: str):
        self.path = path
        self.store = Store(Path(path))

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if method.startswith("_") or method in ("con",):
            raise AttributeError(f"Store.{method} is not part of the store's interface")
        try:
            return getattr(self.store, method)(*args, **kwargs)
        except duckdb.Error as e:
            if "No space left on device" in str(e):
                # DuckDB rolls the failed commit back; every earlier commit is in the file or its WAL
                raise StateError(f"{self.path}: No space left on device. Everything committed before is kept; "
                                 "free space on that disk and run again to resume") from None
            raise

    def pid(self) -> int:
        import os

        return os.getpid()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def close(self) -> None:
        self.store.close()


class StoreProxy:
    """Store's methods, run by the store actor; picklable, so actors hold one too (the answer cache)."""

    def __init__(self, handle: Any):
        self.handle = handle

    def __getattr__(self, method: str) -> Any:
        if method.startswith("_"):
            raise AttributeError(method)

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return ray.get(self.handle.call.remote(method, *args, **kwargs))
            except RayTaskError as e:   # raise what the Store raised, as an in-process Store would
                raise (e.cause or e) from None

        call.__name__ = method
        return call

    def close(self) -> None:
        """Close the file and stop the actor, so the next process can open the file."""
        try:
            ray.get(self.handle.close.remote())
        finally:
            ray.kill(self.handle, no_restart=True)


def start_store(path: Path) -> StoreProxy:
    """Start the store actor for `path` on this node (the state directory lives here)."""
    node = ray.get_runtime_context().get_node_id()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    handle = StoreActor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
        str(path))
    proxy = StoreProxy(handle)
    ray.get(handle.pid.remote())   # surfaces StateError (file held by another process) here
    return proxy
