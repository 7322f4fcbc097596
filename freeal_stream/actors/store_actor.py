"""The one process that writes the job's DuckDB file, and a proxy that looks like a `Store` to callers.

DuckDB lets one process write a file, so every actor and the coordinator send the store actor their
batches; calls run one at a time, in arrival order. If the actor dies Ray restarts it (its `__init__`
reopens the file; DuckDB's WAL replays what was committed) and retries the call; every write is an
idempotent upsert, so a retried call cannot duplicate anything.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, cast

import duckdb
import ray
from ray.exceptions import RayTaskError

from freeal_stream.store import StateError, Store

# What crosses to the store actor: Store's public methods, nothing else (not its connection).
STORE_METHODS = frozenset(name for name, _ in inspect.getmembers(Store, inspect.isfunction) if not name.startswith("_"))


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=3)
class StoreActor:
    def __init__(self, path: str):
        self.path = path
        self.store = Store(Path(path))

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if method not in STORE_METHODS:
            raise AttributeError(f"Store.{method} is not part of the store's interface")
        try:
            return getattr(self.store, method)(*args, **kwargs)
        except duckdb.Error as e:
            if "No space left on device" in str(e):
                # DuckDB rolls the failed commit back; every earlier commit is in the file or its WAL
                raise StateError(
                    f"{self.path}: No space left on device. Everything committed before is kept; "
                    "free space on that disk and run again to resume"
                ) from None
            raise

    def pid(self) -> int:
        import os

        return os.getpid()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def close(self) -> None:
        self.store.close()


class StoreProxy:
    """A `Store` whose methods run in the store actor: exactly Store's public methods (generated below, so the
    two cannot drift apart), typed as `Store` by `start_store`. Picklable, so actors hold one too (the answer
    cache)."""

    def __init__(self, handle: Any):
        self.handle = handle

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return ray.get(self.handle.call.remote(method, *args, **kwargs))
        except RayTaskError as e:  # raise what the Store raised, as an in-process Store would
            raise (e.cause or e) from None

    def close(self) -> None:
        """Close the file and stop the actor, so the next process can open the file."""
        try:
            ray.get(self.handle.close.remote())
        finally:
            ray.kill(self.handle, no_restart=True)


def _forward(name: str) -> Any:
    def call(self: StoreProxy, *args: Any, **kwargs: Any) -> Any:
        return self._call(name, *args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = getattr(Store, name).__doc__
    return call


for _name in STORE_METHODS - {"close"}:
    setattr(StoreProxy, _name, _forward(_name))


def start_store(path: Path) -> Store:
    """Start the store actor for `path` on this node (the state directory lives here)."""
    node = ray.get_runtime_context().get_node_id()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # mypy does not apply the @ray.remote class decorator, so it cannot see ActorClass.options
    handle = StoreActor.options(  # type: ignore[attr-defined]
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
    ).remote(str(path))
    ray.get(handle.pid.remote())  # surfaces StateError (file held by another process) here
    return cast(Store, StoreProxy(handle))
