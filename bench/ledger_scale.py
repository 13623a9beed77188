"""The skip phase of a nightly run at archive scale: time and driver peak RSS for 100k and 1M entries.

    python bench/ledger_scale.py [--sizes 100000 1000000] [--changed 0.001]

For each size N it builds, in a child process, a synthetic output (one completed run of N
one-frame files, folded into the compacted ``latest`` table by ``ledger.compact``) and
tonight's listing of the same N files as Parquet (a share ``--changed`` with a new ETag),
then runs the skip phase (``ledger.plan_inputs``: hash the listing, read the done keys of
every bucket, filter, join the partly-done files) in a fresh child process, which reports
its wall time and peak RSS (``ru_maxrss``) beside its RSS before the phase. No images are
needed. Targets: under 60 s at 1M on 2 cores; peak RSS growth from 100k to 1M
under 300 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build(root: str, n: int, changed: float) -> dict:
    import datetime as dt

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.scoring import ledger
    from jobs.scoring import schema as S

    out = os.path.join(root, "out")
    mv, run_id = "patchcore-v1-0123abcd", "20260101T000000Z-00000000"
    rel = f"run_date=2026-01-01/run_id={run_id}/part-00000.parquet"
    os.makedirs(os.path.dirname(os.path.join(out, rel)))
    ids = np.arange(n)
    uris = pa.array(np.char.add("s3://archive/studies/", np.char.zfill(ids.astype(str), 9)).astype(object) + ".dcm")
    sizes = pa.array(100_000 + ids % 50_000, pa.int64())
    versions = pa.array(np.char.add("etag-", ids.astype(str)).astype(object))
    cols = {f.name: pa.nulls(n, f.type) for f in S.SCHEMA}
    cols |= {
        "image_uri": uris,
        "content_sha256": pa.array(np.char.add("sha-", ids.astype(str)).astype(object)),
        "frame": pa.array(np.zeros(n, np.int32)),
        "score": pa.array(np.random.default_rng(0).random(n, dtype=np.float32)),
        "status": pa.array(np.full(n, "ok", dtype=object)),
        "model_name": pa.array(np.full(n, "patchcore", dtype=object)),
        "model_version": pa.array(np.full(n, mv, dtype=object)),
        "run_id": pa.array(np.full(n, run_id, dtype=object)),
        "scored_at": pa.array(np.full(n, np.datetime64(dt.datetime(2026, 1, 1), "us"))),
        "schema_version": pa.array(np.full(n, S.SCHEMA_VERSION, np.int16)),
        "file_size": sizes,
        "file_version": versions,
    }
    table = pa.table(cols).cast(S.SCHEMA)
    pq.write_table(table, os.path.join(out, rel))
    ledger.write_manifest(out, {"run_id": run_id, "run_date": "2026-01-01", "model_version": mv, "files": [rel]})
    t0 = time.perf_counter()
    ledger.compact(out)
    compact_s = time.perf_counter() - t0
    flip = np.random.default_rng(1).random(n) < changed
    tonight = np.where(flip, np.char.add("etag-new-", ids.astype(str)), np.char.add("etag-", ids.astype(str)))
    listing = pa.table({"uri": uris, "size": sizes, "version": pa.array(tonight.astype(object))})
    pq.write_table(listing, os.path.join(root, "listing.parquet"))
    return {"compact_s": compact_s, "changed": int(flip.sum()), "model_version": mv}


def skip(root: str, model_version: str) -> dict:
    import pyarrow.parquet as pq

    from jobs.scoring import ledger

    before = rss_mb()
    t0 = time.perf_counter()
    listing = pq.read_table(os.path.join(root, "listing.parquet"))  # as storage.list_objects leaves it: Arrow
    todo, skipped = ledger.plan_inputs(os.path.join(root, "out"), listing, model_version)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"skip_s": seconds, "to_read": todo.num_rows, "skipped": skipped, "rss_before_mb": before, "peak_mb": peak}


def child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--changed", type=float, default=0.001, help="share of the listing with a new ETag")
    p.add_argument("--_build", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--_skip", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._build:
        print(json.dumps(build(a._build[0], int(a._build[1]), float(a._build[2]))))
        return
    if a._skip:
        print(json.dumps(skip(*a._skip)))
        return
    rows = []
    for n in a.sizes:
        with tempfile.TemporaryDirectory(prefix="adcore-ledger-bench-") as root:
            b = child(["--_build", root, str(n), str(a.changed)])
            s = child(["--_skip", root, b["model_version"]])
            assert s["to_read"] == b["changed"], (s, b)
            rows.append({"n": n, **b, **s})
            print(
                f"N={n:>9,}: skip phase {s['skip_s']:6.2f} s, driver RSS {s['rss_before_mb']:.0f} MB before -> "
                f"{s['peak_mb']:.0f} MB peak; {s['to_read']:,} to read, {s['skipped']:,} skipped unread; "
                f"(compaction of the first run: {b['compact_s']:.1f} s)",
                flush=True,
            )
    if len(rows) >= 2:
        lo, hi = rows[0], rows[-1]
        growth = hi["peak_mb"] - lo["peak_mb"]
        per_entry = growth * 2**20 / (hi["n"] - lo["n"])
        print(
            f"peak RSS growth {lo['n']:,} -> {hi['n']:,}: {growth:.0f} MB "
            f"({per_entry:.0f} B per entry; target < 300 MB); "
            f"time ratio {hi['skip_s'] / lo['skip_s']:.1f}x for {hi['n'] / lo['n']:.0f}x entries; "
            f"at 10M entries about {hi['skip_s'] * 10_000_000 / hi['n']:.0f} s and "
            f"{lo['peak_mb'] + per_entry * (10_000_000 - lo['n']) / 2**20:.0f} MB (linear extrapolation)"
        )


if __name__ == "__main__":
    main()
