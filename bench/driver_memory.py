"""Benchmark: the scoring job's driver peak RSS for N and 10N input files.

    .venv/bin/python bench/driver_memory.py [--n 2000]

Each run scores a fresh archive of small PNGs with a tiny model on a local Ray, in a child
process whose own peak RSS (``ru_maxrss``: the driver alone; Ray's workers are other
processes) it prints beside its RSS before the job. Target: growth from N to 10N under 10 %.
The driver holds the listing (Arrow), the done keys and the listing blocks it hands to Ray
Data; no result rows.
"""

from __future__ import annotations

import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from adcore.cli import parse_config


@dataclass
class DriverBenchConfig:
    n: int = 2000  # files in the small archive; the large one has 10 times as many
    child: str = ""  # internal: "<input> <model> <output>" of the run in this process


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _archive(root: pathlib.Path, n: int) -> None:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray((rng.random((16, 16)) * 255).astype(np.uint8)).save(buf, format="PNG")
        (root / f"{i // 1000:03d}" / f"img{i:06d}.png").parent.mkdir(exist_ok=True)
        (root / f"{i // 1000:03d}" / f"img{i:06d}.png").write_bytes(buf.getvalue())


def _child(inp: str, model: str, out: str) -> dict:
    from jobs.score import ScoreConfig, main

    before = rss_mb()
    t0 = time.perf_counter()
    m = main(ScoreConfig(input=inp, model=model, output=out, batch_size=256, files_per_block=512))
    return {
        "rows": m["rows"],
        "seconds": time.perf_counter() - t0,
        "before_mb": before,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(cfg: DriverBenchConfig) -> None:
    if cfg.child:
        print(json.dumps(_child(*cfg.child.split(" "))))
        return
    from adcore.testing import tiny_artifact

    results = []
    with tempfile.TemporaryDirectory(prefix="adcore-driver-bench-") as tmp:
        root = pathlib.Path(tmp)
        model = tiny_artifact(str(root / "model"))
        for n in (cfg.n, 10 * cfg.n):
            _archive(root / f"in{n}", n)
            child = " ".join((str(root / f"in{n}"), model, str(root / f"out{n}")))
            proc = subprocess.run(
                [sys.executable, __file__, "--child", child], capture_output=True, text=True, check=True
            )
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            assert r["rows"] == n, r
            results.append((n, r))
            print(
                f"N={n:>7,}: {r['rows']:,} rows in {r['seconds']:.0f} s; driver RSS {r['before_mb']:.0f} MB before "
                f"the job, {r['peak_mb']:.0f} MB peak",
                flush=True,
            )
    (n1, a), (n2, b) = results
    print(f"driver peak RSS {n2 // n1}x files: {b['peak_mb'] / a['peak_mb']:.3f}x (target < 1.10)")


if __name__ == "__main__":
    main(parse_config(DriverBenchConfig, None, __doc__.split("\n")[0]))
