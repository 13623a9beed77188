"""The lease fences commits: two processes, a paused holder, a store that stops answering, skewed clocks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jobs.scoring import lease as leases
from jobs.scoring import ledger

REPO = Path(__file__).resolve().parents[2]

# The other process: takes the lease, checks it, waits (paused by the test), then writes its manifest.
HOLDER = """
import sys
from jobs.scoring import lease as leases, ledger
out, ttl = sys.argv[1], float(sys.argv[2])
lease = leases.acquire(out, "run-a", ttl_s=ttl)
print("held", lease.number, flush=True)
sys.stdin.readline()
lease.check()
print("checked", flush=True)
sys.stdin.readline()  # the test pauses this process here (SIGSTOP) and another run takes the lease
manifest = {"run_id": "run-a", "run_date": "2000-01-01", "files": [], "lease": lease.number}
uri = ledger.write_manifest(out, manifest)
try:
    lease.confirm(uri)
    print("committed", flush=True)
except leases.LeaseLost as e:
    print("not committed:", e, flush=True)
try:
    lease.check()
except leases.LeaseLost:
    print("check refuses", flush=True)
"""


def _holder(out: str, ttl: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, out, str(ttl)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def test_a_paused_holder_cannot_commit_after_another_run_took_the_lease(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    proc = _holder(out, ttl=2.0)
    try:
        assert proc.stdout.readline().startswith("held")
        # Another host whose clock runs an hour ahead: the live lease is still refused to it.
        real_time = time.time
        monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
        with pytest.raises(leases.LeaseHeld, match="being scored by run run-a"):
            leases.acquire(out, "run-b", ttl_s=30)
        monkeypatch.setattr(time, "time", real_time)

        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "checked"
        os.kill(proc.pid, signal.SIGSTOP)  # paused between its check and its commit
        second = leases.acquire(out, "run-b", ttl_s=30, wait_s=60)  # after the store says it expired
        os.kill(proc.pid, signal.SIGCONT)
        proc.stdin.write("\n")
        proc.stdin.flush()
        lines = proc.stdout.read().splitlines()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
    assert lines[0].startswith("not committed") and "lost the lease" in lines[0], lines
    assert "check refuses" in lines
    assert ledger.completed_runs(out) == []  # the late manifest is no commit

    # A late manifest that its writer could not remove (it died): readers ignore it, the holder removes it.
    late = {"format": ledger.MANIFEST_FORMAT, "run_id": "run-a", "run_date": "2000-01-01", "files": [], "lease": 1}
    Path(ledger.manifest_uri(out, "run-a")).write_text(json.dumps(late))
    assert ledger.completed_runs(out) == []
    assert ledger.reject_late_commits(out) == ["run-a"]
    # The holder's own commit counts, and still does once later leases exist.
    manifest = {"run_id": "run-b", "run_date": "2000-01-01", "files": [], "lease": second.number}
    second.confirm(ledger.write_manifest(out, manifest))
    second.release()
    leases.acquire(out, "run-c", ttl_s=30).release()
    assert [m["run_id"] for m in ledger.completed_runs(out)] == ["run-b"]


def test_a_holder_that_cannot_renew_stops_before_its_lease_expires(s3_server, monkeypatch):
    from tests.faults_proxy import FaultProxy

    out = s3_server.make_bucket("lease-renewal") + "/out"
    lost = threading.Event()
    with FaultProxy(s3_server.endpoint, share=0.0, methods=("PUT",), paths=r"/_leases/") as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        lease = leases.acquire(out, "run-a", ttl_s=8.0, on_lost=lambda message: lost.set())
        proxy.share = 1.0  # from now on every write of the lease fails: it cannot be renewed
        assert lost.wait(30), "the holder never noticed"
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
        holder = leases.current_holder(out)  # on the store's clock the lease is still good: stopped in time
        assert holder is not None and holder["run_id"] == "run-a" and holder["left_s"] > 0
        with pytest.raises(leases.LeaseLost, match="could not renew"):
            lease.check()
        lease.release()
