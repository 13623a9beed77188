"""Quality benchmark: fusion-small vs PatchCore on the demo dataset, side by side.

    python bench/quality.py [--minutes 10] [--data out/demo] [--out out/bench-quality]

Trains both on the same demo data (2 CPU cores are the target machine), evaluates on
the test split with thresholds fixed on the validation split, and prints the
metrics table plus the target checks. Target (issue 2): fusion-small >= 0.95
image and >= 0.95 pixel AUROC within 10 minutes of training, and above PatchCore
on pixel AUROC.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from adcore.cli import parse_config
from adcore.data.demo import make_demo_dataset
from adcore.evaluate import evaluate, format_table
from adcore.training import TrainConfig, train

TARGET_AUROC = 0.95


@dataclass
class QualityConfig:
    minutes: float = 10.0  # fusion-small training budget (gradient stages)
    epochs: int = 8  # fusion-small stage-2 epochs at most
    data: str = "out/demo"  # demo dataset folder (generated when missing)
    out: str = "out/bench-quality"  # artifacts and quality.json
    seed: int = 0


def main() -> None:
    args = parse_config(QualityConfig, None, __doc__.splitlines()[0])
    data = str(make_demo_dataset(args.data, seed=args.seed))
    rows, seconds = [], {}
    for name, cfg in (
        ("fusion-small", TrainConfig(preset="fusion-small", minutes=args.minutes, epochs=args.epochs, seed=args.seed)),
        ("patchcore", TrainConfig(preset="patchcore", seed=args.seed)),
    ):
        t0 = time.monotonic()
        scorer = train(data, cfg, output=f"{args.out}/{name}")
        seconds[name] = time.monotonic() - t0
        row = evaluate(scorer, data, "test")
        row["name"] = name
        row["train_s"] = round(seconds[name], 1)
        rows.append(row)
    print(
        format_table(rows, keys=("image_auroc", "pixel_auroc", "aupro", "f1_max", "acc", "dice", "train_s", "n_images"))
    )
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
