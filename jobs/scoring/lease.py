"""One scoring run per output at a time: a lease with a heartbeat, an expiry and a fenced commit.

Leases are numbered files under ``<output>/_leases/``: ``000000000001.json``, ``...02.json``.
The holder is the highest number; its file says which run holds it. To take the lease, a run
creates the next number *exclusively* (``O_CREAT | O_EXCL`` locally, a conditional PUT
``If-None-Match: *`` on S3): of two runs racing for it, exactly one succeeds. It may do so
only when the current holder released it or let it expire (or ran on the same host and its
process is gone).

**One clock.** Expiry is measured on the store's clock alone, never by comparing two hosts'
clocks: the holder rewrites its file every ``ttl/3`` seconds (nobody else ever writes it), and
the file's modification time is the store's; another run reads the store's current time from a
probe object it writes (:func:`store_time`), and the lease has expired when its file is older
than ``ttl``. The holder itself counts on its own monotonic clock only: its lease is good for
``ttl`` from the start of its last successful renewal.

**Stopping in time.** A holder that cannot renew (the store unreachable) stops while its lease
is still good: once less than ``STOP_LEFT`` of the ttl is left, a watchdog marks the lease lost
and calls ``on_lost`` (the job then stops without committing). :meth:`Lease.check` refuses the
same way, and when a higher number exists (the lease was taken over).

**A fenced commit.** A run's manifest carries its lease number; each lease record carries its
creation time on the store's clock. A manifest of lease ``L`` counts only if the store wrote it
before any higher lease was created (:func:`committed_in_time`): a run that lost its lease and
writes its manifest late is not a commit (readers ignore it, the next holder removes it), and the
run learns so from :meth:`Lease.confirm`.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid

from adcore import storage
from adcore.errors import UserError

log = logging.getLogger(__name__)

LEASES = "_leases"
DEFAULT_TTL_S = 300.0
POLL_S = 2.0
# A holder stops (and never commits) once less than this share of its ttl is left since its last
# renewal: the rest covers the job's own stop and a write in flight.
STOP_LEFT = 0.25


class LeaseHeld(UserError, RuntimeError):
    """Another run holds the output's lease."""


class LeaseLost(RuntimeError):
    """This run's lease expired and another run took it."""


def _number(uri: str) -> int:
    return int(posixpath.basename(uri)[: -len(".json")])


class Lease:
    """This run's hold on ``output``. Use :func:`acquire`; a context manager that releases it."""

    def __init__(self, output: str, run_id: str, number: int, ttl_s: float, on_lost=None):
        self.output, self.run_id, self.number, self.ttl_s = output, run_id, number, ttl_s
        self.uri = _lease_uri(output, number)
        self.lost: str | None = None
        self.on_lost = on_lost  # called once, from the watchdog, when the lease is lost
        self.created: float | None = None  # the store's time of creation (the fence of older runs' commits)
        self.good_until = time.monotonic() + ttl_s  # this host's monotonic clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._watch = threading.Thread(target=self._watchdog, name="lease-watchdog", daemon=True)

    def _record(self, released: bool = False) -> bytes:
        return json.dumps(
            {
                "run_id": self.run_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "ttl_s": self.ttl_s,
                "created": self.created,
                "released": released,
            }
        ).encode()

    def start(self) -> Lease:
        self._thread.start()
        self._watch.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            began = time.monotonic()
            try:
                self.check()
                storage.write_bytes(self.uri, self._record())
                self.good_until = began + self.ttl_s
            except LeaseLost as e:
                self._lose(str(e))
                return
            except OSError as e:  # retried at the next beat; the watchdog stops the run before expiry
                log.warning("lease renewal failed: %s", e)

    def _watchdog(self) -> None:
        while not self._stop.wait(self.ttl_s / 12):
            if self.lost:
                return
            if self.good_until - time.monotonic() < STOP_LEFT * self.ttl_s:
                self._lose(
                    f"run {self.run_id} could not renew its lease on {self.output} and stopped before it "
                    f"expired ({self.ttl_s:g} s without renewal)"
                )
                return

    def _lose(self, message: str) -> None:
        if self.lost:
            return
        self.lost = message
        log.error("%s", message)
        if self.on_lost is not None:
            self.on_lost(message)

    def check(self) -> None:
        """Raise :class:`LeaseLost` if another run took the lease or this one is about to expire."""
        if self.lost:
            raise LeaseLost(self.lost)
        newer = [n for n in _numbers(self.output) if n > self.number]
        if newer:
            holder = _read(_lease_uri(self.output, max(newer))) or {}
            raise LeaseLost(
                f"run {self.run_id} lost the lease on {self.output} to run {holder.get('run_id', '?')} "
                f"(it did not renew within {self.ttl_s:g} s)"
            )
        if self.good_until - time.monotonic() < STOP_LEFT * self.ttl_s:
            raise LeaseLost(f"run {self.run_id}: its lease on {self.output} was not renewed in time")

    def confirm(self, uri: str) -> None:
        """After writing the commit ``uri`` (a manifest carrying this lease's number): raise
        :class:`LeaseLost` (and remove it) unless the store wrote it before any newer lease existed."""
        if not committed_in_time(self.number, _mtime(uri), lease_creations(self.output)):
            storage.delete(uri)
            raise LeaseLost(f"run {self.run_id} lost the lease on {self.output} while committing: not committed")

    def rename(self, run_id: str) -> None:
        """Record the run's final id in the lease (written at once)."""
        self.check()
        self.run_id = run_id
        storage.write_bytes(self.uri, self._record())

    def release(self) -> None:
        self._stop.set()
        for t in (self._thread, self._watch):
            if t.is_alive():
                t.join(timeout=5)
        if not self.lost:
            try:
                self.check()
                storage.write_bytes(self.uri, self._record(released=True))
            except LeaseLost:
                pass

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _lease_uri(output: str, number: int) -> str:
    return storage.join(output, LEASES, f"{number:012d}.json")


def _numbers(output: str) -> list[int]:
    uri = storage.join(output, LEASES)
    if not storage.exists(uri):
        return []
    return sorted(_number(f) for f in storage.list_files(uri, suffixes=[".json"], recursive=False))


def _read(uri: str) -> dict | None:
    try:
        return json.loads(_get(uri))
    except (FileNotFoundError, ValueError):
        return None  # gone, or being created this instant


_client = threading.local()


def _get(uri: str) -> bytes:
    """A lease file's bytes; on S3 through boto3 (adaptive retries). pyarrow reads an object into a
    buffer of the object's size, and a throttling error's body, larger than a lease record, fails the
    read instead of being retried."""
    if not storage.is_s3(uri):
        return storage.read_bytes(uri)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client = getattr(_client, "by_endpoint", {}).get(endpoint)
    if client is None:
        client = storage.s3_client()
        _client.by_endpoint = {endpoint: client}
    bucket, _, key = uri[len(storage.S3_PREFIX) :].partition("/")
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except client.exceptions.NoSuchKey:
        raise FileNotFoundError(uri) from None


def current_holder(output: str) -> dict | None:
    """The live lease's record (None if the lease is free: none yet, released or expired).

    The record gets ``left_s``: seconds until it expires unless renewed, on the store's clock.
    """
    numbers = _numbers(output)
    if not numbers:
        return None
    uri = _lease_uri(output, numbers[-1])
    record = _read(uri)
    if record is None:
        return {"run_id": "?", "left_s": POLL_S}  # being written: held
    if record.get("released") or _dead_here(record):
        return None
    renewed = _mtime(uri)
    if renewed is None:
        return {"run_id": "?", "left_s": POLL_S}  # replaced this instant
    left = renewed + float(record.get("ttl_s", DEFAULT_TTL_S)) - store_time(output)
    return None if left < 0 else {**record, "left_s": left}


def _mtime(uri: str) -> float | None:
    """When the store last wrote ``uri`` (unix seconds on the store's clock); None if it is gone."""
    fs, path = storage.filesystem_for(uri)
    info = fs.get_file_info(path)
    return info.mtime.timestamp() if info.mtime is not None else None


def store_time(output: str) -> float:
    """The store's current time: the modification time of a probe object written now."""
    probe = storage.join(output, LEASES, f".clock-{uuid.uuid4().hex}")
    storage.write_bytes(probe, b"")
    try:
        return _mtime(probe)
    finally:
        storage.delete(probe)


def lease_creations(output: str) -> dict[int, float | None]:
    """Lease number -> its creation time on the store's clock, for the leases still on record."""
    return {n: (_read(_lease_uri(output, n)) or {}).get("created") for n in _numbers(output)}


def committed_in_time(lease: int | None, written: float | None, creations: dict[int, float | None]) -> bool:
    """Whether a commit of lease number ``lease`` written at store time ``written`` counts: no newer
    lease was created at or before it. Commits without a lease number (older runs) count."""
    if lease is None:
        return True
    later = [c for n, c in creations.items() if n > lease and c is not None]
    return not later or (written is not None and written < min(later))


def _dead_here(record: dict) -> bool:
    """The holder ran on this host and its process is gone (a crash on the head node: no need to wait)."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def acquire(output: str, run_id: str, ttl_s: float = DEFAULT_TTL_S, wait_s: float = 0.0, on_lost=None) -> Lease:
    """Take the lease on ``output`` for ``run_id`` (renewed in the background until released).

    ``on_lost(message)`` is called (from a background thread) if the lease is lost while held.

    Raises:
        LeaseHeld: another run holds it and ``wait_s`` seconds passed (0: do not wait).
    """
    deadline = time.monotonic() + wait_s
    while True:
        numbers = _numbers(output)
        holder = current_holder(output)
        if holder is None:
            number = (numbers[-1] if numbers else 0) + 1
            lease = Lease(output, run_id, number, ttl_s, on_lost)
            began = time.monotonic()
            if storage.create_exclusive(lease.uri, lease._record()):
                lease.good_until = began + ttl_s
                if max(_numbers(output)) == number:  # a stale listing can pick a number already passed
                    lease.created = _mtime(lease.uri)
                    storage.write_bytes(lease.uri, lease._record())
                    for n in numbers[:-1]:  # housekeeping: keep the previous holder's file
                        storage.delete(_lease_uri(output, n))
                    log.info("run %s holds the lease on %s (expires after %g s without renewal)", run_id, output, ttl_s)
                    return lease.start()
                storage.delete(lease.uri)
            continue  # another run took this number first: look again
        if time.monotonic() >= deadline:
            left = max(0.0, holder.get("left_s", 0))
            raise LeaseHeld(
                f"{output} is being scored by run {holder.get('run_id', '?')} (its lease expires in {left:.0f} s "
                "unless renewed); one run per output at a time: rerun later, or pass --wait-for-lease SECONDS"
            )
        log.info("waiting for run %s to release the lease on %s", holder.get("run_id", "?"), output)
        time.sleep(min(POLL_S, max(0.1, deadline - time.monotonic())))
