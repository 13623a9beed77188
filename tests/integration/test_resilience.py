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
    files = images(12)
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


def test_file_gone_after_listing_is_a_read_error_row(s3_server, tiny_artifact, tmp_path):
    """A file deleted between the listing and its read (the store answers 404) is one ``read`` error row;
    the night goes on, and the next night scores it again."""
    from adcore import storage
    from tests.faults_proxy import FaultProxy

    bucket = s3_server.make_bucket("vanishing")
    files = images(6, seed=1)
    for name, data in files.items():
        storage.write_bytes(f"{bucket}/in/{name}", data)
    args = ["--input", f"{bucket}/in", "--model", tiny_artifact, "--output", f"{bucket}/out"]
    with FaultProxy(s3_server.endpoint, gone=r"/vanishing/in/img002\.png$") as proxy:
        done = run_job(args, job_env(tmp_path, AWS_ENDPOINT_URL=proxy.endpoint))
    assert done.returncode == 0, done.stderr[-4000:]
    rows = {r["image_key"].rsplit("/", 1)[-1]: r for r in visible_rows(f"{bucket}/out")}
    assert len(rows) == len(files)
    assert rows["img002.png"]["status"] == "error" and rows["img002.png"]["error"].startswith("read:")
    assert {r["status"] for n, r in rows.items() if n != "img002.png"} == {"ok"}
    again = run_job(args, job_env(tmp_path, AWS_ENDPOINT_URL=s3_server.endpoint))  # back: read next night
    assert again.returncode == 0, again.stderr[-4000:]
    assert {r["status"] for r in visible_rows(f"{bucket}/out")} == {"ok"}


def test_cuda_oom_splits_the_batch_and_the_manifest_counts_it(tiny_artifact, tmp_path):
    """Model calls above 2 frames run out of memory (the torch network's fault hook): the batches are
    split, every row is ok, and the manifest counts the splits."""
    from adcore.scorer import FAULT_OOM_ABOVE_ENV

    (tmp_path / "in").mkdir()
    for name, data in images(12, seed=2).items():
        (tmp_path / "in" / name).write_bytes(data)
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "in"), "--model", tiny_artifact, "--output", str(out), "--engine", "torch"]
    done = run_job(args, job_env(tmp_path, **{FAULT_OOM_ABOVE_ENV: "2"}))
    assert done.returncode == 0, done.stderr[-4000:]
    (manifest,) = ledger.completed_runs(str(out))
    assert manifest["counts"] == {"ok": 12, "error": 0}
    assert manifest["oom_splits"] >= 1
    assert "ran out of device memory and were split" in done.stderr


@pytest.mark.parametrize("how", ["raise", "exit"])
def test_a_replica_that_dies_while_loading_is_replaced(tiny_artifact, tmp_path, how):
    """The first model replica dies while it loads (its constructor raises, or its process exits):
    another one takes its place and the night completes."""
    from jobs.scoring.stages import FAULT_REPLICA_DEATH_ENV

    (tmp_path / "in").mkdir()
    for name, data in images(8, seed=3).items():
        (tmp_path / "in" / name).write_bytes(data)
    marker = tmp_path / "replica-died"
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "in"), "--model", tiny_artifact, "--output", str(out)]
    done = run_job(args, job_env(tmp_path, **{FAULT_REPLICA_DEATH_ENV: f"{how}:{marker}"}))
    assert marker.exists(), "no replica died: the hook did not run"
    assert done.returncode == 0, done.stderr[-4000:]
    (manifest,) = ledger.completed_runs(str(out))
    assert manifest["counts"] == {"ok": 8, "error": 0}


def test_a_killed_night_keeps_its_whole_files_and_the_rerun_reads_only_the_rest(s3_server, tiny_artifact, tmp_path):
    """The job's whole process group SIGKILLed once its first results are on the store: the rerun commits
    what the dead run wrote whole, reads (GETs) only the other files, and one row per frame is visible."""
    from adcore import storage
    from tests.faults_proxy import FaultProxy
    from tests.jobproc import kill_group_when

    bucket = s3_server.make_bucket("killed")
    files = images(24, seed=4)  # 12 blocks of 2 at 0.5 s a batch: the kill lands long before the run's end
    for name, data in files.items():
        storage.write_bytes(f"{bucket}/in/{name}", data)
    out = f"{bucket}/out"
    args = ["--input", f"{bucket}/in", "--model", tiny_artifact, "--output", out]
    # Slow model calls in the run to kill only, so that it is still running when killed.
    cmd = [PY, str(REPO / "jobs/score.py"), *args, "--batch-size", "2", "--files-per-block", "2"]
    cmd += ["--simulated-batch-s", "0.5"]
    with FaultProxy(s3_server.endpoint) as proxy:
        env = job_env(tmp_path, AWS_ENDPOINT_URL=proxy.endpoint)
        proc = subprocess.Popen(
            cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        first_part = lambda: any(u.endswith(".parquet") for u in _files(f"{out}/run_date="))  # noqa: E731
        kill_group_when(proc, first_part, 300, "result part")
    assert ledger.completed_runs(out) == []  # it committed nothing itself

    with FaultProxy(s3_server.endpoint) as proxy:
        done = run_job(args, job_env(tmp_path, AWS_ENDPOINT_URL=proxy.endpoint))
        read = {p.rsplit("/", 1)[-1] for p in proxy.read("/killed/in/")}
    assert done.returncode == 0, done.stderr[-4000:]
    salvaged, rerun = ledger.completed_runs(out)
    assert salvaged.get("salvaged") and salvaged["rows"] >= 1 and not rerun.get("salvaged")
    kept = {r["image_key"].rsplit("/", 1)[-1] for r in ledger.read_runs(out, [salvaged], ["image_key"]).to_pylist()}
    assert read == set(files) - kept  # the files the dead run wrote are not read again
    assert rerun["rows"] == len(files) - len(kept)
    rows = visible_rows(out)
    assert len(rows) == len(files) and {r["status"] for r in rows} == {"ok"}
    assert all(storage.exists(f) for f in ledger.run_files(out, salvaged))  # the dead run's files stay


def _files(prefix: str) -> list[str]:
    from adcore import storage

    bucket_prefix = prefix.rsplit("/", 1)[0]
    try:
        return [u for u in storage.list_files(bucket_prefix) if u.startswith(prefix)]
    except FileNotFoundError:
        return []


def test_the_job_waits_for_a_node_that_can_hold_a_replica_and_says_so(ray_local, caplog):
    """No node can hold the replica (more CPUs than the local cluster has): progress lines name what
    the job waits for, then it gives up after --wait-for-replicas-s; a replica that fits starts at once."""
    import logging
    from types import SimpleNamespace

    from jobs.score import ScoreConfig, wait_for_first_replica

    caplog.set_level(logging.INFO, logger="jobs.score")
    cfg = ScoreConfig(wait_for_replicas_s=2.5, progress_every_s=1.0)
    with pytest.raises(SystemExit, match="no node could hold a model replica .*--wait-for-replicas-s 2.5"):
        wait_for_first_replica(ray_local, SimpleNamespace(cpus=64.0, min_replicas=1), 0.0, 2**30, cfg)
    waits = [r.getMessage() for r in caplog.records if "waiting for a node" in r.getMessage()]
    assert len(waits) >= 2 and "64 CPU + 1.0 GiB" in waits[0]
    caplog.clear()
    wait_for_first_replica(ray_local, SimpleNamespace(cpus=1.0, min_replicas=1), 0.0, 2**20, cfg)
    assert not any("waiting for a node" in r.getMessage() for r in caplog.records)
