"""The README's main command: the whole adcore path on the embedded default.

    python jobs/demo.py [--minutes 3] [--output out] [--triton]

Each step is the command a user would type, printed before it runs:
demo data (real MNI152 brain slices with synthetic lesions, BMAD layout) ->
train fusion-small and PatchCore with Ray Train (local Ray) -> evaluate both on
the test split -> export fusion-small to a Triton model repository -> score the
test images as a nightly archive run (Ray Data, in-process or through a local
Triton) -> Parquet -> DuckDB summary and an HTML report.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from adcore.cli import parse_config, run_command

PROG = "python jobs/demo.py"
ROOT = Path(__file__).resolve().parents[1]
# One training worker on the whole machine: Ray gives a worker as many torch threads as CPUs.
CPUS = os.cpu_count() or 1


def run(cmd: list[str], env: dict | None = None) -> None:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    print(f"  ({time.monotonic() - t0:.0f} s)", flush=True)


def make_archive(split: Path, archive: Path) -> Path:
    """The test images (not their masks) as a flat archive folder, like a night's new images."""
    archive.mkdir(parents=True, exist_ok=True)
    for image in sorted(split.glob("*/img/*.png")):
        target = archive / f"{image.parent.parent.name.lower()}-{image.name}"
        if not target.exists():
            shutil.copyfile(image, target)
    print(f"\narchive to score: {archive} ({len(list(archive.glob('*.png')))} images)")
    return archive


def summarize(scores: str) -> None:
    """What an analyst sees first: the DuckDB view over the run's Parquet."""
    from jobs.report import connect

    con = connect(scores)
    (version,) = con.execute("SELECT model_version FROM runs ORDER BY run_id DESC LIMIT 1").fetchone()
    print(f"\nTop anomalies of {version} (DuckDB over the Parquet, latest completed run per image):")
    # score: the share of normal validation images scoring lower (strictly increasing in raw_score,
    # which breaks the rare float32 ties); four decimals tell the top ones apart.
    rows = con.execute(
        "SELECT image_uri, score, raw_score, label, mask_area FROM latest "
        "WHERE status = 'ok' AND model_version = $v ORDER BY score DESC, raw_score DESC LIMIT 5",
        {"v": version},
    ).fetchall()
    for uri, score, raw, label, area in rows:
        print(f"  {score:.4f}  raw={raw:.4g}  label={label}  mask_area={area:>6}  {uri}")
    counts = con.execute(
        "SELECT status, count(*) FROM latest WHERE model_version = $v GROUP BY status ORDER BY status", {"v": version}
    ).fetchall()
    print("  rows by status:", dict(counts))


@dataclass
class DemoConfig:
    minutes: float = 3.0  # fusion-small training budget (gradient stages)
    output: str = "out"  # folder for everything the demo writes
    triton: bool = False  # score through a local Triton server instead of in-process
    score_with: Literal["patchcore", "fusion-small"] = "patchcore"  # model of the nightly run; PatchCore wins here


def main(args: DemoConfig) -> None:
    out = Path(args.output)
    py = sys.executable
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    data, models = out / "demo", out / "models"
    fusion, patchcore = models / "fusion-small", models / "patchcore"
    t0 = time.monotonic()
    run([py, "-m", "adcore.data.demo", "--output", str(data)], env)
    # One training worker on the whole machine (see CPUS).
    train = [py, "jobs/train.py", "--data", str(data), "--num-workers", "1", "--cpus-per-worker", str(CPUS)]
    run([*train, "--preset", "fusion-small", "--output", str(fusion), "--minutes", str(args.minutes)], env)
    run([*train, "--preset", "patchcore", "--output", str(patchcore)], env)
    run(
        [
            py,
            "-m",
            "adcore.evaluate",
            "--data",
            str(data),
            "--model",
            str(fusion),
            "--model",
            str(patchcore),
            "--output",
            str(out / "metrics.json"),
        ],
        env,
    )
    repo = out / "triton"
    chosen = patchcore if args.score_with == "patchcore" else fusion
    run([py, "jobs/export.py", "--model", str(chosen), "--output", str(repo)], env)
    archive = make_archive(data / "test", out / "archive")
    scores = out / "scores"
    score_cmd = [py, "jobs/score.py", "--input", str(archive), "--model", str(chosen), "--output", str(scores)]
    if args.triton:
        from adcore.serving import LocalTriton

        with LocalTriton(str(repo)) as server:
            run(score_cmd + ["--triton-url", server.grpc_url], env)
    else:
        run(score_cmd, env)
    report = out / "report.html"
    run([py, "jobs/report.py", "--scores", str(scores), "--output", str(report)], env)
    summarize(str(scores))
    print(f"\nDone in {time.monotonic() - t0:.0f} s. Metrics: {out / 'metrics.json'}  Report: {report}")


def cli(argv: list[str] | None = None, prog: str = PROG) -> None:
    """The command line: parse, run the demo, errors a user can fix in one line."""
    run_command(lambda: main(parse_config(DemoConfig, argv, __doc__.splitlines()[0], prog=prog)), prog)


if __name__ == "__main__":
    cli()
