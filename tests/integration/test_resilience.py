"""The nightly job under faults: a throttling store, vanished inputs, a CUDA OOM, a lost lease.

Each job runs as its own process on its own local Ray (``python jobs/score.py``), against the
moto S3 server, here behind ``tests/faults_proxy.py`` where the store has to misbehave.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jobs.scoring import ledger

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def images(n: int, seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    return {f"img{i:03d}.png": _png((rng.random((24, 28)) * 255).astype(np.uint8)) for i in range(n)}


def job_env(tmp_path: Path, **extra: str) -> dict:
    return {
        **os.environ,
        "RAY_TMPDIR": f"/tmp/ray-res-{os.getpid()}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "PYTHONPATH": str(REPO),
        **extra,
    }


def run_job(args: list[str], env: dict, timeout: float = 400) -> subprocess.CompletedProcess:
    cmd = [PY, str(REPO / "jobs/score.py"), *args, "--batch-size", "4", "--files-per-block", "4"]
    return subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)


def visible_rows(output: str) -> list[dict]:
    """The reader's view; fails on a (key, frame, model version) seen twice."""
    rows = ledger.visible_rows(output, ["image_key", "frame", "model_version", "status", "error"]).to_pylist()
    keys = [(r["image_key"], r["frame"], r["model_version"]) for r in rows]
    assert len(keys) == len(set(keys)), "a frame has two visible rows"
    return rows


def test_throttling_store_30_percent_every_row_ok(s3_server, tiny_artifact, tmp_path):
    """30 % of the store's GETs, PUTs and POSTs answered 503 SlowDown: image reads, result writes,
    the listing, the lease and the compaction all get past it; the job exits 0, every row ok."""
    from adcore import storage
    from tests.faults_proxy import FaultProxy

    bucket = s3_server.make_bucket("throttled")
    files = images(24)
    for name, data in files.items():
        storage.write_bytes(f"{bucket}/in/{name}", data)
    with FaultProxy(s3_server.endpoint, share=0.3, seed=7) as proxy:
        env = job_env(tmp_path, AWS_ENDPOINT_URL=proxy.endpoint)
        done = run_job(["--input", f"{bucket}/in", "--model", tiny_artifact, "--output", f"{bucket}/out"], env)
        assert done.returncode == 0, done.stderr[-4000:]
        assert proxy.faults["GET"] > 10 and proxy.faults["PUT"] > 3, proxy.faults  # the store did misbehave
        assert proxy.gets("/throttled/in/") >= len(files)
    rows = visible_rows(f"{bucket}/out")
    assert len(rows) == len(files)
    assert {r["status"] for r in rows} == {"ok"}, [r["error"] for r in rows if r["error"]][:3]
    assert ledger.read_latest(f"{bucket}/out")["rows"] == len(files)  # compacted too
