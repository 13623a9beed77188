"""The nightly job under a throttling store and after a kill: wall time, rows ok, work a rerun redoes.

    python bench/faults.py [--images 200] [--shares 0,0.1,0.3] [--kills 0.25,0.5,0.75] \
        [--simulated-batch-s 0.2] [--output out/bench-faults.json]

A moto S3 server on 127.0.0.1 sits behind ``tests/faults_proxy.py``, which answers ``503 SlowDown``
to the given share of GETs, PUTs and POSTs (image reads, result writes, listing, lease and
compaction requests alike). Each run is ``python jobs/score.py`` in its own process on its own
local Ray, over ``--images`` synthetic PNGs and a tiny random-init artifact.

* Faults: per share, the wall time against the fault-free run and the share of rows ok.
  Target: every row ok at 30 % within 1.5x the fault-free time.
* Kills: the job's process group is SIGKILLed once the rows in its part files reach X % of the
  frames, then rerun without faults; the work of the rerun is the rows it scored, as a share of
  a full run. Target: at most (1 - X) + 0.1.

A benchmark, not a test: run it on a quiet machine; figures go to ``docs/`` with their command,
date, commit and hardware.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adcore import storage  # noqa: E402
from jobs.scoring import ledger  # noqa: E402
from tests.faults_proxy import FaultProxy  # noqa: E402

S3_ENV = {  # dummy credentials of the local moto server only
    "AWS_ACCESS_KEY_ID": "bench-key",
    "AWS_SECRET_ACCESS_KEY": "bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}
JOB_TIMEOUT_S = 3600


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def job(args: argparse.Namespace, endpoint: str, output: str, artifact: str, bucket: str, tmp: Path):
    cmd = [sys.executable, str(ROOT / "jobs/score.py"), "--input", f"{bucket}/in", "--model", artifact]
    cmd += ["--output", output, "--batch-size", str(args.batch_size), "--files-per-block", "8"]
    cmd += ["--simulated-batch-s", str(args.simulated_batch_s), "--progress", "log"]
    env = {
        **os.environ,
        **S3_ENV,
        "AWS_ENDPOINT_URL": endpoint,
        "PYTHONPATH": str(ROOT),
        "RAY_TMPDIR": str(tmp / "ray"),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
    }
    return cmd, env


def written_rows(output: str) -> int:
    """Rows in the part files of the run folders under ``output`` (committed or not)."""
    import pyarrow.parquet as pq

    rows = 0
    for uri in storage.list_files(output, suffixes=[".parquet"]) if storage.exists(output) else []:
        if "/run_id=" not in uri:
            continue
        fs, path = storage.filesystem_for(uri)
        try:
            rows += pq.read_metadata(path, filesystem=fs).num_rows
        except (OSError, ValueError):
            pass  # being written
    return rows


def faults(args, server, artifact, bucket, tmp) -> list[dict]:
    out = []
    for share in args.shares:
        output = f"{bucket}/faults-{int(share * 100)}"
        with FaultProxy(server, share=share, seed=0) as proxy:
            cmd, env = job(args, proxy.endpoint, output, artifact, bucket, tmp)
            t0 = time.monotonic()
            done = subprocess.run(cmd, env=env, timeout=JOB_TIMEOUT_S, capture_output=True, text=True)
            wall = time.monotonic() - t0
        log = tmp / f"job-faults-{int(share * 100)}.log"
        log.write_text(done.stdout + done.stderr)
        if done.returncode:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
            print(f"job at {share:.0%} faults exited {done.returncode}; its log: {log}\n{tail}", file=sys.stderr)
        runs = ledger.completed_runs(output)
        ok = sum(m["counts"]["ok"] for m in runs)
        out.append(
            {
                "share_503": share,
                "exit": done.returncode,
                "wall_s": round(wall, 1),
                "rows_ok_share": round(ok / args.images, 4),
                "faults": dict(proxy.faults),
            }
        )
        print(json.dumps(out[-1]), flush=True)
    base = out[0]["wall_s"] if out and out[0]["share_503"] == 0 else None
    for r in out:
        r["wall_vs_fault_free"] = round(r["wall_s"] / base, 2) if base else None
    return out


def kills(args, server, artifact, bucket, tmp) -> list[dict]:
    out = []
    for at in args.kills:
        output = f"{bucket}/kill-{int(at * 100)}"
        cmd, env = job(args, server, output, artifact, bucket, tmp)
        proc = subprocess.Popen(
            cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            while written_rows(output) < at * args.images:
                if proc.poll() is not None:
                    break
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kept = written_rows(output)
        done = subprocess.run(cmd, env=env, timeout=JOB_TIMEOUT_S, capture_output=True, text=True)
        rerun = ledger.completed_runs(output)[-1] if done.returncode == 0 else {}
        out.append(
            {
                "killed_at": at,
                "rows_written_when_killed": kept,
                "rerun_exit": done.returncode,
                "rerun_rows_scored_share": round(rerun.get("rows", 0) / args.images, 4),
                "target_at_most": round(1 - at + 0.1, 2),
            }
        )
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--shares", default="0,0.1,0.3")
    p.add_argument("--kills", default="0.25,0.5,0.75")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--simulated-batch-s", type=float, default=0.2)  # scoring time per model call: a GPU's share
    p.add_argument("--output", default="out/bench-faults.json")
    args = p.parse_args()
    args.shares = [float(s) for s in args.shares.split(",") if s]
    args.kills = [float(s) for s in args.kills.split(",") if s]

    from moto.server import ThreadedMotoServer

    from adcore.testing import tiny_artifact

    tmp = Path(tempfile.mkdtemp(prefix="adcore-bench-faults-"))
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": endpoint})
    try:
        storage.s3_client().create_bucket(Bucket="bench")
        bucket = "s3://bench"
        rng = np.random.default_rng(0)
        for i in range(args.images):
            storage.write_bytes(f"{bucket}/in/img{i:05d}.png", _png((rng.random((64, 64)) * 255).astype(np.uint8)))
        artifact = tiny_artifact(str(tmp / "model"))
        result = {
            "images": args.images,
            "simulated_batch_s": args.simulated_batch_s,
            "faults": faults(args, endpoint, artifact, bucket, tmp),
            "kills": kills(args, endpoint, artifact, bucket, tmp),
        }
    finally:
        server.stop()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
