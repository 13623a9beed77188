"""The night's fixed costs on a local S3 server: listing, a first night and a night with 1 % changed.

    python bench/night_costs.py [--sizes 10000 50000] [--changed 0.01] [--tasks 64] [--list-only] [--no-rescore]

For each size N it uploads N small PNGs under nested prefixes (``site*/patient*/img*.png``) to a
moto S3 server on 127.0.0.1, then measures on a local Ray cluster:

- **listing**: the serial LIST loop (``storage.list_objects``) against the prefix-range tasks
  (``jobs/scoring/listing.py``, ``--tasks``), the same listing either way;
- **first night**: ``jobs/score.py`` over the archive with a tiny model (wall time, and the run
  manifest's phase timings: Ray start, recovery compaction, list, plan, score (the Ray pipeline:
  decode, model, postprocessing, write), then the compaction's from the latest table's manifest);
- **changed night**: ``--changed`` of the files rewritten with new content, the job again;
- **full-rescore night**: the job with ``--rescore-all`` (every row changes), unless ``--no-rescore``.

Bytes per phase: the pipeline reads the changed files' listed bytes and writes its run files; the
compaction's kind (a delta or a merge into the base), bytes read and written and the ``latest``
table's size come from its manifest; the share is its bytes written over the table's bytes.
Targets: the changed night's compaction writes at most 2 % of the latest table's bytes; its fixed
costs (everything but the pipeline) at the largest size at most 1.5x those at the smallest; the
listing of 50k objects under 30 s. Prints one JSON line per size and a table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

BUCKET = "night-costs"
UPLOAD_THREADS = 16


def _png(seed: int) -> bytes:
    from PIL import Image

    pixels = (np.random.default_rng(seed).random((32, 32)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _key(prefix: str, i: int) -> str:
    return f"{prefix}/site{i % 10}/patient{i // 10 % 500:04d}/img{i:07d}.png"


def upload(client, prefix: str, ids, seed: int = 0) -> None:
    blobs = [_png(seed * 7919 + k) for k in range(16)]  # a few contents: a PNG per object costs the bench, not S3

    def put(i: int) -> None:
        client.put_object(Bucket=BUCKET, Key=_key(prefix, i), Body=blobs[(i + seed) % len(blobs)] + seed.to_bytes(4))

    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        list(pool.map(put, ids))


def _file_bytes(uri: str) -> int:
    from adcore import storage

    fs, path = storage.filesystem_for(uri)
    return fs.get_file_info(path).size or 0


# The S3 server in a process of its own: it does not share the measured driver's interpreter lock.
_SERVER = """
import sys, time
from moto.server import ThreadedMotoServer
s = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
s.start()
print(s.get_host_and_port()[1], flush=True)
sys.stdin.read()
s.stop()
"""


def start_server() -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{int(proc.stdout.readline())}"
    return proc


def write_inventory(table, base: str, files: int = 4) -> str:
    """An S3 Inventory report (Parquet, as AWS writes one) of the listed ``table``; returns its manifest's URI."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from adcore import storage

    uris = table.column("uri")
    keys = pc.utf8_slice_codeunits(uris, len(f"s3://{BUCKET}/"))
    inv = pa.table(
        {
            "bucket": pa.array([BUCKET] * table.num_rows),
            "key": keys,
            "size": table.column("size"),
            "last_modified_date": pa.array([0] * table.num_rows, pa.timestamp("ms")),
            "e_tag": table.column("version"),
        }
    )
    entries = []
    step = -(-inv.num_rows // files)
    for i in range(files):
        buf = io.BytesIO()
        pq.write_table(inv.slice(i * step, step), buf)
        key = f"{base.split('/', 3)[3]}/data/part-{i}.parquet"
        storage.write_bytes(f"s3://{BUCKET}/{key}", buf.getvalue())
        entries.append({"key": key, "size": buf.tell(), "MD5checksum": "-"})
    manifest = {"sourceBucket": BUCKET, "destinationBucket": f"arn:aws:s3:::{BUCKET}", "fileFormat": "Parquet",
                "fileSchema": "message s3.inventory { }", "files": entries}  # fmt: skip
    storage.write_bytes(f"{base}/manifest.json", json.dumps(manifest).encode())
    return f"{base}/manifest.json"


def night(inp: str, model: str, out: str, tasks: int, rescore_all: bool = False) -> dict:
    from adcore import storage
    from jobs.score import ScoreConfig, main
    from jobs.scoring import ledger

    t0 = time.monotonic()
    opts = {"batch_size": 256, "list_tasks": tasks, "progress_every_s": 30, "rescore_all": rescore_all}
    m = main(ScoreConfig(input=inp, model=model, output=out, **opts))
    wall = time.monotonic() - t0
    latest = ledger.read_latest(out) or {}
    comp = latest.get("compaction", {})
    run_bytes = sum(_file_bytes(storage.join(out, f)) for f in m.get("files", []))
    phases = dict(m.get("timings", {}))
    phases["compact_s"] = comp.get("seconds", 0.0)
    fixed = wall - phases.get("score_s", 0.0)
    return {
        "wall_s": round(wall, 2),
        "fixed_s": round(fixed, 2),
        "phases": phases,
        "rows": m["rows"],
        "skipped": m["skipped_files"],
        "pipeline_bytes_written": run_bytes,
        "compaction": comp,
        "compaction_share": round(comp.get("bytes_written", 0) / max(comp.get("table_bytes", 1), 1), 4),
    }


def measure(n: int, changed: float, tasks: int, list_only: bool, model: str, root: str, rescore: bool) -> dict:
    import ray

    from adcore import storage
    from jobs.common import init_ray
    from jobs.scoring import listing

    client = storage.s3_client()
    prefix = f"archive-{n}"
    t0 = time.monotonic()
    upload(client, prefix, range(n))
    result: dict = {"n": n, "upload_s": round(time.monotonic() - t0, 1)}
    inp = f"s3://{BUCKET}/{prefix}"
    init_ray()
    t0 = time.monotonic()
    serial = storage.list_objects(inp)
    result["list_serial_s"] = round(time.monotonic() - t0, 2)
    for name in ("list_tasks_cold_s", "list_tasks_s"):  # the first starts the listing tasks' workers
        t0 = time.monotonic()
        parallel = listing.list_prefixes(inp, tasks)
        result[name] = round(time.monotonic() - t0, 2)
    assert parallel.equals(serial) and serial.num_rows == n
    inventory = write_inventory(serial, f"s3://{BUCKET}/inventory-{n}")
    t0 = time.monotonic()
    from_inventory = listing.list_inventory(inventory, inp)
    result["list_inventory_s"] = round(time.monotonic() - t0, 2)
    assert from_inventory.equals(serial)
    if not list_only:
        out = f"s3://{BUCKET}/scores-{n}"
        result["first"] = night(inp, model, out, tasks)
        k = max(1, int(n * changed))
        upload(client, prefix, np.random.default_rng(1).choice(n, k, replace=False).tolist(), seed=1)
        result["changed_files"] = k
        result["second"] = night(inp, model, out, tasks)
        if rescore:
            result["rescore"] = night(inp, model, out, tasks, rescore_all=True)
    ray.shutdown()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000])
    ap.add_argument("--changed", type=float, default=0.01)
    ap.add_argument("--tasks", type=int, default=64)
    ap.add_argument("--list-only", action="store_true")
    ap.add_argument("--no-rescore", action="store_true", help="skip the full-rescore night")
    args = ap.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench-key", AWS_SECRET_ACCESS_KEY="bench-secret", AWS_REGION="us-east-1",
        AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
    )  # fmt: skip
    from adcore import storage
    from adcore.testing import tiny_artifact

    server = start_server()
    storage.s3_client().create_bucket(Bucket=BUCKET)
    root = tempfile.mkdtemp(prefix="adcore-night-costs-")
    model = "" if args.list_only else tiny_artifact(os.path.join(root, "model"))
    results = []
    try:
        for n in args.sizes:
            r = measure(n, args.changed, args.tasks, args.list_only, model, root, not args.no_rescore)
            print(json.dumps(r), flush=True)
            results.append(r)
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    print(f"\n{'objects':>8} {'list serial s':>13} {'list tasks s':>12} {'inventory s':>11} {'night1 s':>9} "
          f"{'night2 s':>9} {'fixed2 s':>9} {'compact2 share':>14} {'rescore share':>13}")  # fmt: skip
    for r in results:
        f, s, a = r.get("first", {}), r.get("second", {}), r.get("rescore", {})
        print(
            f"{r['n']:>8} {r['list_serial_s']:>13} {r['list_tasks_s']:>12} {r['list_inventory_s']:>11} "
            f"{f.get('wall_s', '-'):>9} {s.get('wall_s', '-'):>9} {s.get('fixed_s', '-'):>9} "
            f"{s.get('compaction_share', '-'):>14} {a.get('compaction_share', '-'):>13}"
        )


if __name__ == "__main__":
    main()
