"""Talk to a running service's HTTP API, and publish or find the service running for a state folder."""

from __future__ import annotations

import http.client
import ipaddress
import json
import math
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from freeal_stream.errors import UserError

SERVICE_FILE = "service.json"


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None, as JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class ServiceError(UserError):
    """The service refused a request (``status``: the HTTP code) or could not be reached (``status`` None)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # urllib would resend the Authorization header to wherever a redirect points


class ServiceClient:
    """A client of the HTTP API. It ignores proxy settings, which would otherwise see the token."""

    def __init__(self, base_url: str, token: str | None = None, timeout_s: float = 10.0):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"not a service URL: {base_url!r} (expected e.g. http://127.0.0.1:8765)")
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._timeout_s = timeout_s
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())

    def add_items(
        self,
        items: Sequence[Mapping[str, Any]],
        source: str | None = None,
        quarantined: Sequence[Mapping[str, Any]] = (),
    ) -> dict[str, Any]:
        """Send items ({"text", optional "id", "view", "gold"}); returns the service's counts.

        `quarantined` rows ({"location", "line", "reason", "detail", "raw"}, e.g. a file's unreadable lines)
        are recorded by the service under `source`, so no bad row is lost on the way.
        """
        payload: dict[str, Any] = {"items": [dict(item) for item in items]}
        if source is not None:
            payload["source"] = source
        if quarantined:
            payload["quarantined"] = [dict(row) for row in quarantined]
        return self._call("POST", "/items", payload)

    def status(self) -> dict[str, Any]:
        return self._call("GET", "/status")

    def labels(self, since: int = 0, limit: int = 1000) -> dict[str, Any]:
        """Labels after position ``since``: {"items": [...], "next": <the since of the next page>}."""
        return self._call("GET", "/labels?" + urlencode({"since": since, "limit": limit}))

    def health(self) -> bool:
        """Whether the service answers; never raises."""
        try:
            return self._call("GET", "/health").get("ok") is True
        except ServiceError:
            return False

    def _call(self, method: str, path: str, payload: Any = None) -> dict[str, Any]:
        data = None if payload is None else json.dumps(json_safe(payload), allow_nan=False).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self._token is not None:
            request.add_header("Authorization", f"Bearer {self._token}")
        try:
            with self._opener.open(request, timeout=self._timeout_s) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise ServiceError(_server_message(exc), exc.code) from None
        except (OSError, http.client.HTTPException) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise ServiceError(f"cannot reach the service at {self.base_url}: {reason}") from None
        except ValueError:
            raise ServiceError(f"{method} {path}: the service's answer is not JSON") from None
        if not isinstance(answer, dict):
            raise ServiceError(f"{method} {path}: the service's answer is not a JSON object")
        return answer


def _server_message(exc: urllib.error.HTTPError) -> str:
    try:
        message = json.loads(exc.read())["error"]
    except (OSError, ValueError, KeyError, TypeError):
        message = exc.reason
    return f"HTTP {exc.code}: {message}"


def write_service_file(state_dir: Path, url: str, pid: int) -> Path:
    """Publish a running service's URL and pid in ``state_dir/service.json`` (atomically; no token)."""
    path = state_dir / SERVICE_FILE
    state_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".service-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"url": url, "pid": pid}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def is_loopback_literal(host: str) -> bool:
    """A literal loopback IP, or `localhost`; any other name could be pointed elsewhere by whoever runs DNS."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_service_url(url: str, where: Path, host: str | None = None, port: int | None = None) -> None:
    """Refuse a service URL that is neither on this machine's loopback nor the job's own ``host:port``.

    The URL comes from a file in the state folder, which someone else may have written: items and the token
    must not follow it to their machine.
    """
    parts = urlsplit(url)
    try:
        url_host, url_port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        url_host, url_port = "", 0
    if is_loopback_literal(url_host) or ((host or "").lower().strip("[]") == url_host and port == url_port != 0):
        return
    configured = f"the job's service.host:service.port ({host}:{port})" if host else "a job's service address"
    raise ServiceError(
        f"{where} names the service URL {url!r}, which is neither this machine's loopback nor "
        f"{configured}: refusing to send it data or the token. Fix: delete the file if no service "
        "of yours runs, or set service.host and service.port to where yours listens"
    )


def find_service(
    state_dir: Path, timeout_s: float = 2.0, *, host: str | None = None, port: int | None = None
) -> str | None:
    """The URL of the service published in ``state_dir``, if its process is alive and it answers /health.

    A stale file (dead pid, nothing answering) is ignored, not removed: a service starting meanwhile may
    have just written a fresh one, and it replaces the file on start anyway. A URL beyond loopback and the
    job's service ``host:port`` is refused (ServiceError) before anything is sent to it.
    """
    path = state_dir / SERVICE_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        url, pid = info["url"], info["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(url, str) or isinstance(pid, bool) or not isinstance(pid, int) or not _alive(pid):
        return None
    check_service_url(url, path, host, port)
    try:
        client = ServiceClient(url, timeout_s=timeout_s)
    except ValueError:
        return None
    return url if client.health() else None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False  # kill(0 or negative) would address a whole process group
    if os.name == "nt":
        return True  # os.kill there terminates rather than probes; /health decides instead
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    return True
