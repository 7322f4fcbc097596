"""Connecting to Ray: a cluster when one is named, else a local Ray right-sized for this machine.

A local Ray listens on 127.0.0.1 only, as anyone who can reach a Ray process can run code in it. A cluster
reached over the network must use Ray's token authentication (RAY_AUTH_MODE=token), or it is not joined.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import ray
from ray._private import ray_constants

from freeal_stream.config import RayConfig
from freeal_stream.errors import UserError
from freeal_stream.service.client import is_loopback_literal

log = logging.getLogger(__name__)

# Ray's switch for single-machine platforms: with it off, Ray keeps a loopback node IP instead of swapping in
# the host's address, and then every Ray process (GCS, raylet, workers, agents, object manager, metrics)
# binds to that IP alone (checked with `ss -ltnp` and by tests/integration/test_ray_loopback.py).
_CLUSTERS_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@dataclass(frozen=True)
class Secret:
    """A value (an API key) that must travel to actors but never be printed, logged or stored."""

    value: str

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__


class RayJoinError(UserError):
    """Joining this Ray cluster would run the job on a cluster anyone on the network can use."""


def start_ray(cfg: RayConfig, address: str | None = None) -> tuple[str, bool]:
    """Join the cluster at `address` / `ray.address` / $RAY_ADDRESS, or start a local Ray.

    Returns (where, whether this call started Ray: then the caller shuts it down when done).

    The local Ray listens on loopback only and gets no dashboard and this process's environment (so workers
    import this very checkout); actors that only wait on HTTP or DuckDB ask for 0 CPUs, so 2 cores are enough.
    """
    if ray.is_initialized():
        return "the Ray this process is connected to", False
    target = address or cfg.address or os.environ.get("RAY_ADDRESS")
    if target and target != "local":
        check_can_join(target)
        ray.init(address=target, logging_level=logging.WARNING, log_to_driver=False)
        return f"Ray cluster at {target}", False
    loopback_only_ray()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback only; else Ray writes a token under ~/.ray
    cpus = max(2, cfg.local_cpus or os.cpu_count() or 1)  # the trainer and a scorer take one logical CPU each
    ray.init(
        address="local",
        num_cpus=cpus,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=False,
        configure_logging=True,
    )  # "local": never $RAY_ADDRESS, which ray.init reads
    return f"local Ray ({cpus} CPUs)", True


def loopback_only_ray() -> None:
    """Make the Ray nodes this process starts single-machine ones, whose every process binds 127.0.0.1.

    Without this Ray swaps a loopback node IP for the host's address and its processes listen on all
    interfaces. The environment variable reaches the processes Ray starts; the flag, this process, which has
    imported Ray already.
    """
    os.environ[_CLUSTERS_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def check_can_join(address: str) -> None:
    """Refuse to join a cluster beyond this machine unless Ray's token authentication is on, with a token.

    A Ray cluster runs whatever code any client that reaches it sends; only its token stops that.
    """
    host = address_host(address)
    if host is not None and is_loopback_literal(host):
        return
    mode = os.environ.get("RAY_AUTH_MODE", "")
    if mode.lower() == "token" and ray_token_configured():
        return
    missing = (
        f"RAY_AUTH_MODE is {mode!r}, not 'token'"
        if mode.lower() != "token"
        else "no token is set ($RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token)"
    )
    raise RayJoinError(
        f"refusing to join the Ray cluster at {address!r} without Ray's token authentication ({missing}): "
        "anyone who can reach a Ray cluster can run code on it. Fix: start the cluster with RAY_AUTH_MODE=token "
        "(ray_cluster.yaml does), then here `export RAY_AUTH_MODE=token` and put the cluster's token in "
        "~/.ray/auth_token (or $RAY_AUTH_TOKEN_PATH, or $RAY_AUTH_TOKEN); `ray get-auth-token --generate` "
        "makes one. See SECURITY.md"
    )


def address_host(address: str) -> str | None:
    """The host of a Ray address (`host:port`, `[v6]:port`, `ray://host:port`); None for `auto` and the like."""
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        return parts.hostname if parts.port is not None else None
    except ValueError:
        return None


def ray_token_configured() -> bool:
    """Whether Ray finds a token, in its order: $RAY_AUTH_TOKEN, the file $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return True
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return bool(path.read_text(encoding="utf-8").strip())
    except (OSError, UnicodeDecodeError):
        return False


def cluster_has_gpu() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0
