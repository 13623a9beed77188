"""Run the CPU ``tritonserver`` bundled in ``nvidia-pytriton`` on a model repository.

Only Python-backend models can be loaded by that binary, so models are loaded
explicitly by name (``--model-control-mode=explicit``): the ``_ort`` twins that
``write_model_repository`` writes for GPU hosts stay on disk, unloaded. The models' files
are checked against their manifests (:func:`verify_repository`) before the server starts.
On GPU hosts use NVIDIA's Triton container instead (``cluster/README.md``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from adcore.serving.repository import verify_repository

LOOPBACK = "127.0.0.1"
STUB_PY_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"  # the stub must match this interpreter
EXIT_TIMEOUT_S = 3  # tritonserver's own grace for in-flight requests on shutdown
_POLL_S = 0.1
_LOG_TAIL_CHARS = 4000
# Loopback only: never route health checks through an HTTP(S)_PROXY from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class TritonStartError(RuntimeError):
    """tritonserver exited or did not become ready in time; the message carries its log tail."""


def find_tritonserver() -> Path:
    """Path of the ``tritonserver`` binary shipped in the ``nvidia-pytriton`` wheel."""
    try:
        import pytriton  # noqa: PLC0415 (optional dependency)
    except ImportError as exc:
        raise FileNotFoundError(
            "tritonserver not found: the CPU Triton server comes with nvidia-pytriton; "
            "install it with `pip install adcore[triton]`"
        ) from exc
    binary = Path(pytriton.__file__).parent / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise FileNotFoundError(f"tritonserver not found at {binary}; reinstall with `pip install adcore[triton]`")
    return binary


def build_backends_dir(dest: Path) -> Path:
    """Backends folder = pytriton's python backend + the stub built for this Python version."""
    dist = find_tritonserver().parents[1]
    stub = dist / "python_backend_stubs" / STUB_PY_VERSION / "triton_python_backend_stub"
    if not stub.is_file():
        raise FileNotFoundError(f"no Triton Python-backend stub for Python {STUB_PY_VERSION} at {stub}")
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for src in (dist / "backends" / "python").iterdir():
        if src.is_file():
            shutil.copy2(src, python_dir / src.name)
    # The stub finds its bundled libraries through an $ORIGIN-relative rpath: link, do not copy.
    target = python_dir / "triton_python_backend_stub"
    if target.exists() or target.is_symlink():
        target.unlink()
    target.symlink_to(stub)
    return dest


def server_env() -> dict[str, str]:
    """Environment in which the stub loads this interpreter's libpython and sees the venv's packages."""
    env = os.environ.copy()
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_process_group(pid: int, grace_s: float = EXIT_TIMEOUT_S + 5, popen: subprocess.Popen | None = None) -> None:
    """SIGINT the server, wait ``grace_s``, then SIGKILL its whole group (stubs can outlive the server).

    ``pid`` must lead its own session (``start_new_session=True``), so pgid == pid and nothing
    outside this server's group is touched.
    """
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _pid_running(pid, popen):
        time.sleep(_POLL_S)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if popen is not None:
        popen.wait()
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and process_group_alive(pid):
        time.sleep(_POLL_S)


def _pid_running(pid: int, popen: subprocess.Popen | None) -> bool:
    if popen is not None:
        return popen.poll() is None
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


class LocalTriton:
    """A ``tritonserver`` process on loopback ports, serving ``models`` from ``repository``.

    Usage::

        with LocalTriton(repo, models=["fusion"]) as server:
            client = TritonClient(server.http_url, "fusion")

    Args:
        repository: Model repository (``<repo>/<model>/config.pbtxt``).
        models: Models to load; default: every folder with a config.pbtxt whose backend is "python".
        workdir: Holds the log and the backends folder; a temporary one (removed on stop) by default.
        ready_timeout_s: How long ``start`` waits for server and models to be ready.
        extra_args: More tritonserver flags, e.g. ``["--log-verbose=1"]``.
    """

    def __init__(
        self,
        repository: str | os.PathLike,
        models: list[str] | None = None,
        workdir: str | os.PathLike | None = None,
        ready_timeout_s: float = 60.0,
        extra_args: list[str] | None = None,
    ):
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise FileNotFoundError(f"Triton model repository not found: {self.repository}")
        self.models = list(models) if models else python_backend_models(self.repository)
        if not self.models:
            raise ValueError(f"{self.repository}: no Python-backend model to load (give models=...)")
        for name in self.models:
            if not (self.repository / name / "config.pbtxt").is_file():
                raise FileNotFoundError(f"{self.repository / name / 'config.pbtxt'} missing for model {name!r}")
        self.ready_timeout_s = ready_timeout_s
        self.extra_args = list(extra_args or [])
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else None
        self._popen: subprocess.Popen | None = None
        self._log_file = None
        self.http_port = self.grpc_port = self.metrics_port = 0
        self.shm_prefix = ""

    @property
    def http_url(self) -> str:
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    @property
    def log_path(self) -> Path | None:
        return self.workdir / "tritonserver.log" if self.workdir else None

    def command(self) -> list[str]:
        args = [
            str(find_tritonserver()),
            f"--model-repository={self.repository}",
            "--model-control-mode=explicit",
            *[f"--load-model={m}" for m in self.models],
            "--exit-on-error=false",  # a model this binary cannot load must not take the server down
            f"--backend-directory={self.workdir / 'backends'}",
            f"--http-address={LOOPBACK}",
            f"--http-port={self.http_port}",
            f"--grpc-address={LOOPBACK}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={LOOPBACK}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            # Unique shared-memory names: several servers may run on one machine.
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]
        return args + self.extra_args

    def start(self) -> LocalTriton:
        """Check the models' files, start the server and wait until it and every model are ready.

        Raises:
            RepositoryError: a model's files differ from its manifest (nothing is started).
        """
        if self._popen is not None:
            raise RuntimeError("LocalTriton already started")
        remove_bytecode(self.repository, self.models)
        verify_repository(self.repository, self.models)
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="adcore-triton-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        build_backends_dir(self.workdir / "backends")
        self.http_port, self.grpc_port, self.metrics_port = _distinct_free_ports(3)
        self.shm_prefix = f"adcore{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 (kept open for the process' lifetime)
        self._popen = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=server_env(),
            cwd=self.workdir,
            start_new_session=True,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server and every process of its group; idempotent."""
        if self._popen is not None:
            stop_process_group(self._popen.pid, popen=self._popen)
            self._popen = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        remove_shm_regions(self.shm_prefix)
        remove_bytecode(self.repository, self.models)
        if self._own_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def detach(self) -> dict:
        """Forget the process without stopping it (for the CLI); returns what ``stop`` by pid needs."""
        state = {
            "pid": self.pid,
            "http_url": self.http_url,
            "grpc_url": self.grpc_url,
            "metrics_port": self.metrics_port,
            "models": self.models,
            "repository": str(self.repository),
            "log_path": str(self.log_path),
            "shm_prefix": self.shm_prefix,
        }
        self._popen = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return state

    def log_tail(self, chars: int = _LOG_TAIL_CHARS) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except (OSError, AttributeError):
            return "<no log>"

    def __enter__(self) -> LocalTriton:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        base = f"http://{self.http_url}"
        while not _http_ok(f"{base}/v2/health/live"):
            self._check_alive_or_timeout(deadline, "server live")
        # Startup loads the requested models before the server reports ready; a model that
        # failed to load keeps it unready for good (strict readiness), so stop waiting then.
        while not _http_ok(f"{base}/v2/health/ready"):
            states = self._model_states()
            if any(state == "UNAVAILABLE" and reason for state, reason in states.values()):
                self._raise_load_failed(states)
            self._check_alive_or_timeout(deadline, "server ready", _describe(states))
        not_ready = [m for m in self.models if not _http_ok(f"{base}/v2/models/{m}/ready")]
        if not_ready:
            self._raise_load_failed(self._model_states())

    def _raise_load_failed(self, states: dict[str, tuple[str, str]]) -> None:
        raise TritonStartError(
            f"tritonserver on {self.repository}: models failed to load ({_describe(states)}); "
            f"log tail:\n{self.log_tail()}"
        )

    def _check_alive_or_timeout(self, deadline: float, what: str, detail: str = "") -> None:
        code = self._popen.poll()
        if code is not None:
            raise TritonStartError(
                f"tritonserver on {self.repository} exited with code {code} before {what}; log tail:\n{self.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise TritonStartError(
                f"tritonserver on {self.repository} not {what} after {self.ready_timeout_s:.0f} s ({detail}); "
                f"log tail:\n{self.log_tail()}"
            )
        time.sleep(_POLL_S)

    def _model_states(self) -> dict[str, tuple[str, str]]:
        """``{model: (state, reason)}`` for the requested models, from the repository index."""
        try:
            req = urllib.request.Request(f"http://{self.http_url}/v2/repository/index", data=b"{}", method="POST")
            with _OPENER.open(req, timeout=2) as resp:
                index = json.loads(resp.read())
        except (OSError, ValueError):
            return {}
        return {r["name"]: (r.get("state", ""), r.get("reason", "")) for r in index if r.get("name") in self.models}


def _describe(states: dict[str, tuple[str, str]]) -> str:
    return "; ".join(f"{name}: {state} {reason}".strip() for name, (state, reason) in states.items())


def python_backend_models(repository: Path) -> list[str]:
    """Names of the models in ``repository`` whose config says ``backend: "python"``."""
    names = []
    for config in sorted(Path(repository).glob("*/config.pbtxt")):
        if any(line.split() == ["backend:", '"python"'] for line in config.read_text().splitlines()):
            names.append(config.parent.name)
    return names


def remove_bytecode(repository: Path, models: list[str]) -> None:
    """Remove the ``__pycache__`` the Python-backend stub writes beside model.py (not in the model's manifest)."""
    for name in models:
        for cache in (Path(repository) / name).rglob("__pycache__"):
            shutil.rmtree(cache, ignore_errors=True)


def remove_shm_regions(prefix: str) -> None:
    """Remove /dev/shm regions a killed Python-backend stub left behind."""
    if prefix:
        for path in Path("/dev/shm").glob(f"{prefix}*"):
            path.unlink(missing_ok=True)


def _distinct_free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def _http_ok(url: str) -> bool:
    try:
        with _OPENER.open(url, timeout=2) as resp:
            return resp.status == 200
    except (OSError, ValueError):
        return False
