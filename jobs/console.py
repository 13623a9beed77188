"""What a job's console shows of Ray: the job's own lines, not Ray's chatter.

Ray prints its own progress and advice on the driver's console, and forwards every worker's
and actor's output there: the Train controller's placement-group cleaner polling a state API
that a cluster without a dashboard does not have (a warning every few seconds, for the whole
run), Ray Data's issue detector and memory advice, checkpoint and worker-group bookkeeping,
packaging lines. :func:`quiet_ray_console` leaves these out of the console only: Ray keeps
every worker's output and Ray Data's log in the session's log folder, and one line at exit
says how many lines were left out and where they are. With ``-v`` (debug logging) nothing
is left out.
"""

from __future__ import annotations

import atexit
import logging
import re
import threading

log = logging.getLogger("jobs")

# Actors whose output is only Ray's own bookkeeping.
QUIET_ACTORS = ("PlacementGroupCleaner",)
# Lines (worker output, or messages of Ray's loggers) that are Ray's chatter, not the job's.
NOISE = re.compile(
    "|".join(
        [
            r"Failed to query Ray Train Controller actor state",
            r"has constructor arguments in the object store and max_restarts > 0",
            r"^Requesting resources: ",
            r"^Attempting to start training worker group",
            r"^Started training worker group",
            r"^- \(ip=.*world_rank=",
            r"^Setting up process group for: ",
            r"^Checkpoint successfully created at: ",
            r"^Reporting training result \d+: ",
            r"Progress bars disabled\. To enable",
            r"Found \d+ issues?\. To disable issue detection",
            # Ray Data's high-memory advice as lines of a worker's forwarded output (one record on a driver)
            r"consider setting `memory=",
            r"^Operator '.*' (uses|used up to) .* of memory per worker",
            r"Token authentication is enabled for this Ray cluster",
            r"torchvision is not installed\. Skipping torchvision::",
            r"FutureWarning: `isinstance\(treespec, LeafSpec\)` is deprecated",  # torch's ONNX export, in a replica
        ]
    )
)
# Ray Data's issue detector (its advice spans paragraphs: one log record on the driver).
ISSUE_LOGGERS = ("ray.data._internal.issue_detection",)


class _Dropped:
    """Lines left out of the console, counted for the closing summary."""

    def __init__(self):
        self.count = 0
        self.lock = threading.Lock()

    def add(self, n: int = 1) -> None:
        with self.lock:
            self.count += n


DROPPED = _Dropped()


def keep_worker_lines(actor: str | None, lines: list[str]) -> list[str]:
    """The lines of one batch of worker output that the console shows.

    An actor of :data:`QUIET_ACTORS` shows nothing; a line matching :data:`NOISE` is left out with
    the indented lines that continue it (a warning's source line, a traceback's frames).
    """
    if actor and actor.split("(")[0] in QUIET_ACTORS:
        return []
    kept, skipping = [], False
    for line in lines:
        if skipping and line.startswith((" ", "\t")):
            continue
        skipping = bool(NOISE.search(line))
        if not skipping:
            kept.append(line)
    return kept


class RayLogFilter(logging.Filter):
    """For the console handlers of Ray's loggers: Ray's INFO lines, issue-detector advice and
    :data:`NOISE` are left out (Ray Data's file handler still writes them to its log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = (
            record.levelno < logging.WARNING
            or record.name.startswith(ISSUE_LOGGERS)
            or bool(NOISE.search(record.getMessage()))
        )
        if noisy:
            DROPPED.add()
        return not noisy


def _console_handlers(logger: logging.Logger) -> list[logging.Handler]:
    return [h for h in logger.handlers if not isinstance(h, logging.FileHandler) and "File" not in type(h).__name__]


def quiet_ray_console() -> None:
    """Leave Ray's chatter out of this driver's console (not out of Ray's log files).

    Call before ``ray.init`` (Ray's own loggers: packaging, start-up, Ray Data) and again after it
    (the worker output Ray's driver prints: a private hook of the pinned Ray version; if it moves,
    worker output is printed unfiltered). A no-op with debug logging (``-v``).
    """
    import ray

    if logging.getLogger().isEnabledFor(logging.DEBUG):
        return
    quiet_ray_loggers()
    if not ray.is_initialized():
        return
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # pragma: no cover - another Ray version
        log.debug("Ray's log dispatcher not found: worker output is printed unfiltered")
        return
    with dispatcher._lock:
        for i, (name, handler) in enumerate(dispatcher.handlers):
            if name == "ray_print_logs" and not getattr(handler, "adcore_filtered", False):
                dispatcher.handlers[i] = (name, _filtered(handler))
                atexit.register(_summary, _logs())


def quiet_ray_loggers(names: tuple[str, ...] = ("ray", "ray.data", "ray.train")) -> None:
    """The console part of :func:`quiet_ray_console` for this process's own Ray loggers; idempotent.

    A training worker that runs Ray Data itself quiets ``ray.data`` alone (its file handler keeps
    everything in the session's ``ray-data`` log; the worker's own output is its log file).
    """
    import ray.data  # noqa: F401 - configures the "ray.data" logger and its handlers

    for name in names:
        for handler in _console_handlers(logging.getLogger(name)):
            if not any(isinstance(f, RayLogFilter) for f in handler.filters):
                handler.addFilter(RayLogFilter())


def _filtered(print_logs):
    def handler(data: dict) -> None:
        lines = data.get("lines") or []
        kept = keep_worker_lines(data.get("actor_name") or data.get("task_name"), lines)
        if len(kept) < len(lines):
            DROPPED.add(len(lines) - len(kept))
        if kept or not lines:
            print_logs({**data, "lines": kept})

    handler.adcore_filtered = True
    return handler


def _summary(logs: str) -> None:
    if DROPPED.count:
        log.info("%d lines of Ray's own messages left out of this console; Ray keeps them in %s", DROPPED.count, logs)


def _logs() -> str:
    try:
        import ray

        return f"{ray._private.worker._global_node.get_session_dir_path()}/logs"
    except Exception:  # noqa: BLE001 - a summary line never fails the job
        return "the Ray session's logs folder (/tmp/ray/session_latest/logs)"
