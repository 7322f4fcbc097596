"""Connecting to Ray: a cluster when one is named, else a local Ray right-sized for this machine."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray

from freeal_stream.config import RayConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Secret:
    """A value (an API key) that must travel to actors but never be printed, logged or stored."""

    value: str

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__


def start_ray(cfg: RayConfig, address: str | None = None) -> tuple[str, bool]:
    """Join the cluster at `address` / `ray.address` / $RAY_ADDRESS, or start a local Ray.

    Returns (where, whether this call started Ray: then the caller shuts it down when done).

    The local Ray gets no dashboard and this process's environment (so workers import this very
    checkout); actors that only wait on HTTP or DuckDB ask for 0 CPUs, so 2 cores are enough.
    """
    if ray.is_initialized():
        return "the Ray this process is connected to", False
    target = address or cfg.address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")   # else Ray writes an auth token under ~/.ray
    if target:
        ray.init(address=target, logging_level=logging.WARNING, log_to_driver=False)
        return f"Ray cluster at {target}", False
    cpus = max(2, cfg.local_cpus or os.cpu_count() or 1)   # the trainer and a scorer take one logical CPU each
    # address "local": a new Ray of our own, even when `ray start` left a cluster running on this machine (without
    # it ray.init joins that cluster, and refuses the num_cpus given)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False, configure_logging=True)
    return f"local Ray ({cpus} CPUs)", True


def cluster_has_gpu() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0
