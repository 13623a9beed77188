"""One scoring run per output at a time: a lease with a heartbeat and an expiry.

Leases are numbered files under ``<output>/_leases/``: ``000000000001.json``, ``...02.json``.
The holder is the highest number; its file says which run holds it and until when
(``expires_at``, unix seconds). To take the lease, a run creates the next number
*exclusively* (``O_CREAT | O_EXCL`` locally, a conditional PUT ``If-None-Match: *`` on
S3): of two runs racing for it, exactly one succeeds. It may do so only when the current
holder released it or let it expire (or ran on the same host and its process is gone).
The holder renews its own file every ``ttl/3`` seconds (nobody else ever writes it); a
crashed run stops renewing and its lease expires
after ``ttl`` seconds, so the next run proceeds. A holder that finds a higher number has
lost the lease (it stalled past its expiry) and must not commit.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time

from adcore import storage
from adcore.errors import UserError

log = logging.getLogger(__name__)

LEASES = "_leases"
DEFAULT_TTL_S = 300.0
POLL_S = 2.0


class LeaseHeld(UserError, RuntimeError):
    """Another run holds the output's lease."""


class LeaseLost(RuntimeError):
    """This run's lease expired and another run took it."""


def _number(uri: str) -> int:
    return int(posixpath.basename(uri)[: -len(".json")])


class Lease:
    """This run's hold on ``output``. Use :func:`acquire`; a context manager that releases it."""

    def __init__(self, output: str, run_id: str, number: int, ttl_s: float):
        self.output, self.run_id, self.number, self.ttl_s = output, run_id, number, ttl_s
        self.uri = _lease_uri(output, number)
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)

    def _record(self, released: bool = False) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "run_id": self.run_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "renewed_at": now,
                "expires_at": now + self.ttl_s,
                "released": released,
            }
        ).encode()

    def start(self) -> Lease:
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.check()
                storage.write_bytes(self.uri, self._record())
            except LeaseLost as e:
                self.lost = str(e)
                log.error("%s", e)
                return
            except OSError as e:  # a failed renewal is retried at the next beat; the expiry has slack
                log.warning("lease renewal failed: %s", e)

    def check(self) -> None:
        """Raise :class:`LeaseLost` if another run took the lease."""
        if self.lost:
            raise LeaseLost(self.lost)
        newer = [n for n in _numbers(self.output) if n > self.number]
        if newer:
            holder = _read(_lease_uri(self.output, max(newer))) or {}
            raise LeaseLost(
                f"run {self.run_id} lost the lease on {self.output} to run {holder.get('run_id', '?')} "
                f"(it did not renew within {self.ttl_s:g} s)"
            )

    def rename(self, run_id: str) -> None:
        """Record the run's final id in the lease (written at once)."""
        self.check()
        self.run_id = run_id
        storage.write_bytes(self.uri, self._record())

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
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
        return json.loads(storage.read_bytes(uri))
    except (FileNotFoundError, ValueError):
        return None  # gone, or being created this instant


def current_holder(output: str) -> dict | None:
    """The live lease's record (None if the lease is free: none yet, released or expired)."""
    numbers = _numbers(output)
    if not numbers:
        return None
    record = _read(_lease_uri(output, numbers[-1]))
    if record is None:
        return {"run_id": "?", "expires_at": time.time() + POLL_S}  # being written: held
    if record.get("released") or record.get("expires_at", 0) < time.time() or _dead_here(record):
        return None
    return record


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


def acquire(output: str, run_id: str, ttl_s: float = DEFAULT_TTL_S, wait_s: float = 0.0) -> Lease:
    """Take the lease on ``output`` for ``run_id`` (renewed in the background until released).

    Raises:
        LeaseHeld: another run holds it and ``wait_s`` seconds passed (0: do not wait).
    """
    deadline = time.monotonic() + wait_s
    while True:
        numbers = _numbers(output)
        holder = current_holder(output)
        if holder is None:
            number = (numbers[-1] if numbers else 0) + 1
            lease = Lease(output, run_id, number, ttl_s)
            if storage.create_exclusive(lease.uri, lease._record()):
                if max(_numbers(output)) == number:  # a stale listing can pick a number already passed
                    for n in numbers[:-1]:  # housekeeping: keep the previous holder's file
                        storage.delete(_lease_uri(output, n))
                    log.info("run %s holds the lease on %s (expires after %g s without renewal)", run_id, output, ttl_s)
                    return lease.start()
                storage.delete(lease.uri)
            continue  # another run took this number first: look again
        if time.monotonic() >= deadline:
            left = max(0.0, holder.get("expires_at", 0) - time.time())
            raise LeaseHeld(
                f"{output} is being scored by run {holder.get('run_id', '?')} (its lease expires in {left:.0f} s "
                "unless renewed); one run per output at a time: rerun later, or pass --wait-for-lease SECONDS"
            )
        log.info("waiting for run %s to release the lease on %s", holder.get("run_id", "?"), output)
        time.sleep(min(POLL_S, max(0.1, deadline - time.monotonic())))
