"""Evaluate an artifact on a BMAD split.

``python -m adcore.evaluate --data DIR --model ARTIFACT [--split test] [--json OUT]``

Thresholds come from the artifact (fit on validation data at training time);
nothing here is tuned on the split being evaluated.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from adcore import metrics
from adcore.cli import setup_logging
from adcore.scorer import Scorer, load
from adcore.training.loop import load_split
from adcore.training.predict import predict


def evaluate(scorer: Scorer, data: str, split: str = "test", batch_size: int = 8, limit: int | None = None) -> dict:
    t0 = time.monotonic()
    ds = load_split(data, split, limit)
    res = predict(scorer, ds["images"], batch_size)
    labels, cal = ds["labels"], scorer.calibration
    scores = cal.normalize_scores(res["scores"]) if cal else res["scores"]
    both = 0 < labels.sum() < len(labels)
    out: dict = {"model": scorer.version, "split": split, "n_images": int(len(labels)), "n_anomalous": int(labels.sum())}
    out["image_auroc"] = metrics.image_auroc(labels, scores) if both else None
    out["f1_max"] = metrics.f1_max(labels, scores)[0] if both else None
    if cal:
        out |= {k: v for k, v in metrics.threshold_metrics(labels, scores, cal.image_threshold).items()}
    masks = ds["masks"]
    if masks is not None and labels.sum():
        maps = [cal.normalize_maps(m) for m in res["maps"]] if cal else res["maps"]
        out["pixel_auroc"] = metrics.pixel_auroc(masks, maps)
        out["aupro"] = metrics.aupro(masks, maps)
        if cal:
            thr = cal.pixel_threshold if cal.pixel_threshold is not None else cal.image_threshold
            anomalous = [i for i, y in enumerate(labels) if y]
            out["dice"] = float(np.mean([metrics.dice(maps[i] >= thr, masks[i]) for i in anomalous]))
            out["iou"] = float(np.mean([metrics.iou(maps[i] >= thr, masks[i]) for i in anomalous]))
    else:
        out["pixel_auroc"] = None
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def format_table(rows: list[dict], keys=("image_auroc", "pixel_auroc", "aupro", "f1_max", "acc", "precision", "recall", "specificity", "dice", "iou", "n_images")) -> str:
    def fmt(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    names = [r.get("name", r["model"]) for r in rows]
    width = max(len("metric"), *(len(n) for n in names))
    lines = ["metric".ljust(14) + "".join(n.rjust(width + 2) for n in names)]
    for k in keys:
        lines.append(k.ljust(14) + "".join(fmt(r.get(k)).rjust(width + 2) for r in rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m adcore.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True, action="append", help="artifact (repeat to compare)")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--json", help="write the metrics here")
    p.add_argument("--limit", type=int, help="evaluate an evenly spread subset")
    args = p.parse_args(argv)
    setup_logging()
    rows = []
    for uri in args.model:
        scorer = load(uri)
        row = evaluate(scorer, args.data, args.split, limit=args.limit)
        row["name"] = scorer.name
        rows.append(row)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows[0] if len(rows) == 1 else rows, f, indent=1)


if __name__ == "__main__":
    main()
