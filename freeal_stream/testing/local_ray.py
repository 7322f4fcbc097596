"""A local Ray for tests and benchmarks, started the way a job starts its own (freeal_stream.actors.runtime):
on 127.0.0.1 only, and never a cluster left running on this machine or named by $RAY_ADDRESS."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import ray

from freeal_stream.actors.runtime import start_ray
from freeal_stream.config import RayConfig


@contextmanager
def local_ray(cpus: int = 2) -> Iterator[None]:
    """A fresh local Ray with `cpus` logical CPUs for the block; shut down after it."""
    ray.shutdown()
    start_ray(RayConfig(local_cpus=cpus), address="local")
    try:
        yield
    finally:
        ray.shutdown()
