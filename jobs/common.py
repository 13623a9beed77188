"""Ray plumbing shared by the jobs: connecting, per-node data caches, storage, logging.

``jobs`` is an installed package (``pip install -e .``), so a job runs as
``python jobs/<x>.py`` (also under ``ray job submit --working-dir .``) and imports
as ``jobs.<x>`` in tests, with no path edits.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from adcore import storage
from adcore.cli import setup_logging
from jobs.console import quiet_ray_console

log = logging.getLogger("jobs")

# Non-secret settings forwarded to the cluster's workers when this driver starts or joins a
# cluster itself. Credentials (AWS keys, ADCORE_STUDY_KEY_SECRET) are not: the workers of a local
# cluster that ``ray.init`` starts here inherit this process's environment, and every node of a
# multi-node cluster needs its own (environment, ``~/.aws`` or an instance role), so they never
# appear in a runtime_env shown by the dashboard nor in a pickled task.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
)
# Set by Ray in the driver of a job submitted with ``ray job submit``.
_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Where S3 inputs are cached on each node, unless ADCORE_CACHE_DIR says otherwise.
_CACHE_ENV = "ADCORE_CACHE_DIR"
_DONE_MARKER = ".complete"


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to Ray: ``address`` if given, the job's cluster under ``ray job submit``
    (``RAY_ADDRESS``), else a fresh local one-node cluster. A no-op if already connected.
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    quiet_ray_console()  # Ray's own loggers, before ray.init logs
    runtime_env = None if os.environ.get(_JOB_ENV) else driver_runtime_env()
    if address is None and not os.environ.get("RAY_ADDRESS"):
        # "local" never attaches to a stale cluster recorded in /tmp/ray (ENVIRONMENT.md).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env)
    else:
        ray.init(address=address, runtime_env=runtime_env)
    quiet_ray_console()  # and the workers' output it forwards
    log.info("ray: %s", ray.cluster_resources())


def driver_runtime_env() -> dict:
    """What workers need from this driver: the code (``adcore``, ``jobs``) and non-secret settings.

    Not used under ``ray job submit``, whose ``--working-dir`` already ships the code
    (replacing the job's runtime_env there would drop it).
    """
    import adcore
    import jobs

    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    modules = [os.path.dirname(adcore.__file__), os.path.dirname(jobs.__file__)]
    return {"py_modules": modules, "env_vars": env} if env else {"py_modules": modules}


def storage_args(uri: str) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for a Ray ``RunConfig``: local path or S3 URI."""
    if storage.is_s3(uri):  # Ray Train's storage: the native S3 filesystem, its own retries
        return storage.filesystem_for(uri)[1], storage.s3_filesystem()
    return storage.local_path(uri), None


def cache_dir_for(uri: str) -> Path:
    """This node's cache folder for ``uri`` (one per URI, named by its hash)."""
    root = os.environ.get(_CACHE_ENV) or os.path.join(tempfile.gettempdir(), "adcore-cache")
    return Path(root) / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]


def local_copy(uri: str, only: str | None = None) -> str:
    """A local folder holding ``uri``: the path itself, or this node's cached copy of an S3 prefix.

    Workers on one node share the copy: the first downloads it under a file lock, the
    others wait and reuse it. A copy is reused until its folder is deleted (inputs are
    treated as immutable datasets). ``only`` (e.g. ``"valid"``) copies just that sub-folder of
    the prefix (the rest is streamed), into the same place in the copy.
    """
    if not storage.is_s3(uri):
        path = storage.local_path(uri)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no such data folder: {uri}")
        return path
    target = cache_dir_for(uri)
    source, dest, done = uri, target, target / _DONE_MARKER
    if only:
        source, dest = f"{uri.rstrip('/')}/{only}", target / only
        done = target / f"{_DONE_MARKER}-{only}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{target}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file() and not (target / _DONE_MARKER).is_file():
            log.info("downloading %s to %s", source, dest)
            storage.download_dir(source, dest)
            done.touch()
    return str(target)


def local_files(uri: str, keys: list[str], also: tuple[str, ...] = ()) -> str:
    """A local folder holding ``keys`` (paths relative to ``uri``) at their places: the path itself
    for a local ``uri``, else this node's cached copy of just those objects of the S3 prefix, and of
    those of ``also`` that exist (e.g. the dataset's ``categories.csv``).

    One copy per URI and set of keys, shared by the node's workers under a file lock like :func:`local_copy`.
    """
    if not storage.is_s3(uri):
        return local_copy(uri)
    digest = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:12]
    target = cache_dir_for(f"{uri.rstrip('/')}#{digest}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{target}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / _DONE_MARKER).is_file():
            log.info("copying %d files of %s to %s", len(keys), uri, target)
            reader = storage.Reader()
            extra = [k for k in also if storage.exists(f"{uri.rstrip('/')}/{k}")]
            for key in [*keys, *extra]:
                path = target / key
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(reader.read(f"{uri.rstrip('/')}/{key}"))
            (target / _DONE_MARKER).touch()
    return str(target)


def run_name(prefix: str, key: str) -> str:
    """A deterministic run name, so a rerun with the same storage finds its checkpoints."""
    return f"{prefix}-{hashlib.sha256(key.rstrip('/').encode()).hexdigest()[:12]}"


__all__ = ["init_ray", "storage_args", "local_copy", "local_files", "cache_dir_for", "run_name", "setup_logging"]
