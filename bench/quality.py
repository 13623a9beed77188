"""Quality benchmark: fusion-small vs PatchCore on the demo dataset, side by side.

    python bench/quality.py [--minutes 10] [--data out/demo] [--out out/bench-quality]

Trains both on the same demo data (2 CPU cores are the target machine), evaluates on
the test split with thresholds fixed on the validation split, and prints the
metrics table plus the target checks. Target (issue 2): fusion-small >= 0.95
image and >= 0.95 pixel AUROC within 10 minutes of training, and above PatchCore
on pixel AUROC.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adcore.cli import setup_logging  # noqa: E402
from adcore.data.demo import make_demo_dataset  # noqa: E402
from adcore.evaluate import evaluate, format_table  # noqa: E402
from adcore.training import TrainConfig, train  # noqa: E402

TARGET_AUROC = 0.95


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="fusion-small training budget (gradient stages)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--data", default="out/demo")
    p.add_argument("--out", default="out/bench-quality")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    setup_logging()
    data = str(make_demo_dataset(args.data, seed=args.seed))
    rows, seconds = [], {}
    for name, cfg in (
        ("fusion-small", TrainConfig(model="fusion-small", minutes=args.minutes, epochs=args.epochs, seed=args.seed)),
        ("patchcore", TrainConfig(model="patchcore", seed=args.seed)),
    ):
        t0 = time.monotonic()
        scorer = train(data, cfg, output=f"{args.out}/{name}")
        seconds[name] = time.monotonic() - t0
        row = evaluate(scorer, data, "test")
        row["name"] = name
        row["train_s"] = round(seconds[name], 1)
        rows.append(row)
    print(format_table(rows, keys=("image_auroc", "pixel_auroc", "aupro", "f1_max", "acc", "dice", "train_s", "n_images")))
    fusion, patchcore = rows
    checks = {
        "fusion image AUROC >= 0.95": fusion["image_auroc"] >= TARGET_AUROC,
        "fusion pixel AUROC >= 0.95": fusion["pixel_auroc"] >= TARGET_AUROC,
        "fusion pixel AUROC > PatchCore": fusion["pixel_auroc"] > patchcore["pixel_auroc"],
    }
    for text, ok in checks.items():
        print(f"{'PASS' if ok else 'MISS'}  {text}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "quality.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
