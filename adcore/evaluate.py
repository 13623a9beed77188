"""Evaluate artifacts on a BMAD split.

``python -m adcore.evaluate --data DIR --model ARTIFACT [--model ARTIFACT2] [--split test] [--output METRICS.json]
[--engine auto|torch|onnx] [--variant fp32|int8|fp16]``

Threshold-free metrics (image/pixel AUROC, AUPRO, F1-max) are computed on the raw
scores and maps; the calibration stored in the artifact (fit on validation data at
training time) is used only where a threshold decides (ACC, precision, recall,
specificity, Dice, IoU). Nothing here is tuned on the split being evaluated.

The network runs on the engine the scoring job would pick (``adcore.engine``: onnxruntime on
CPU, torch on CUDA) unless ``--engine`` says otherwise; ``--variant`` scores with a quantised
graph from the artifact's engine cache, measured or not (this is how one measures it).

For a model whose head tells anomaly categories apart (SD-MAD) on a split with categories
(``categories.csv``, :mod:`adcore.data.bmad`), the table adds the three multi-anomaly protocols
(:func:`adcore.metrics.multi_anomaly_metrics`): normal against any anomaly (image AUROC), each
category against the rest (AUROC, averaged), and accuracy and macro-F1 over {normal, categories},
the predicted class being "normal" below the calibrated threshold and the most likely category
above it. Anomalous images without a category are left out of the three.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from adcore import engine, export, metrics, storage
from adcore.cli import parse_config, run_command
from adcore.engine import EngineName
from adcore.export import VariantName
from adcore.scorer import Scorer
from adcore.training.loop import load_split

PROG = "python -m adcore.evaluate"
log = logging.getLogger(__name__)

TABLE_KEYS = (
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "f1_max",
    "acc",
    "precision",
    "recall",
    "specificity",
    "dice",
    "iou",
    "n_images",
)
# Rows of the multi-anomaly protocols (models with categories only).
MULTI_KEYS = ("normal_vs_any_auroc", "category_auroc", "accuracy", "macro_f1")


@dataclass
class EvaluateConfig:
    data: str  # BMAD-layout folder
    model: list[str]  # artifact, local folder or s3:// prefix (repeat to compare)
    split: Literal["train", "valid", "test"] = "test"
    output: str | None = None  # write the metrics here as JSON
    limit: int | None = None  # evaluate an evenly spread subset of this many images
    batch_size: int = 8
    engine: EngineName = "auto"  # network engine: auto (onnxruntime on CPU, torch on CUDA), torch or onnx
    variant: VariantName = "fp32"  # ONNX precision variant (needs engine auto or onnx)


def evaluate(scorer: Scorer, data: str, split: str = "test", batch_size: int = 8, limit: int | None = None) -> dict:
    t0 = time.monotonic()
    ds = load_split(data, split, limit)
    results = scorer.score_images(ds["images"], batch_size)
    labels, cal = ds["labels"], scorer.calibration
    raw = np.array([r.raw_score for r in results])
    both = 0 < labels.sum() < len(labels)
    out: dict = {
        "model": scorer.version,
        "split": split,
        "n_images": int(len(labels)),
        "n_anomalous": int(labels.sum()),
    }
    out["image_auroc"] = metrics.image_auroc(labels, raw) if both else None
    out["f1_max"] = metrics.f1_max(labels, raw)[0] if both else None
    if cal:
        out |= metrics.threshold_metrics(labels, np.array([r.score for r in results]), cal.image_threshold)
    masks = ds["masks"]
    out["pixel_auroc"] = None
    if masks is not None and labels.sum():
        raw_maps = [r.raw_map for r in results]
        out["pixel_auroc"] = metrics.pixel_auroc(masks, raw_maps)
        out["aupro"] = metrics.aupro(masks, raw_maps)
        if cal:
            anomalous = [i for i, y in enumerate(labels) if y]
            out["dice"] = float(np.mean([metrics.dice(results[i].mask, masks[i]) for i in anomalous]))
            out["iou"] = float(np.mean([metrics.iou(results[i].mask, masks[i]) for i in anomalous]))
    if scorer.categories and cal:
        out |= multi_anomaly(scorer.categories, ds["samples"], results)
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


SPEED_BATCH = 8  # frames per timed network call
SPEED_CALLS = 5  # timed calls per variant after one warm-up; the fastest counts (least disturbed by other work)


def network_speed(network, input_size: int, seed: int = 0) -> float:
    """Images/s of ``network`` alone on uint8 frames: the fastest of ``SPEED_CALLS`` calls of ``SPEED_BATCH``."""
    pixels = np.random.default_rng(seed).integers(0, 256, (SPEED_BATCH, 3, input_size, input_size), dtype=np.uint8)
    network(pixels)  # warm-up: first-call allocations and graph optimisation
    best = math.inf
    for _ in range(SPEED_CALLS):
        t0 = time.perf_counter()
        network(pixels)
        best = min(best, time.perf_counter() - t0)
    return SPEED_BATCH / best


def variant_verdict(row: dict, ref: dict, is_reference: bool) -> dict:
    """Whether a variant is offered: within ``engine.VARIANT_TOLERANCE`` of fp32's image and pixel AUROC
    and faster than fp32 on the device it was timed on (fp32 always is)."""
    deltas = {}
    for key in ("image_auroc", "pixel_auroc"):
        if row[key] is not None and ref[key] is not None:
            deltas[key] = round(abs(row[key] - ref[key]), 6)
    ratio = row["images_per_s"] / ref["images_per_s"]
    accurate = bool(deltas) and all(d <= engine.VARIANT_TOLERANCE for d in deltas.values())
    faster = ratio > 1.0
    return {
        "max_auroc_delta": max(deltas.values()) if deltas else None,
        "speed_vs_fp32": round(ratio, 3),
        "accurate": is_reference or accurate,
        "faster": is_reference or faster,
        "usable": is_reference or (accurate and faster),
    }


def measure_variants(
    scorer: Scorer,
    data: str,
    variants: tuple[str, ...] = export.VARIANTS,
    split: str = "valid",
    limit: int | None = None,
) -> dict:
    """Image and pixel AUROC of each variant on ``split`` and its network's speed, next to fp32's; records
    them in the cache manifest.

    A variant is usable when both AUROCs are within ``engine.VARIANT_TOLERANCE`` of fp32's and its
    network runs faster than fp32's on this host's device (:func:`variant_verdict`). Returns the record:
    ``{"split", "n_images", "tolerance", "device", "variants": {...}}``.
    """
    device = engine.default_device()
    variants = tuple(dict.fromkeys(("fp32", *variants)))
    rows = {}
    for variant in variants:
        network = engine.load_network(scorer, "onnx", variant, device=device, require_usable=False)
        probe = Scorer(scorer.model, scorer.head, scorer.calibration, scorer.meta, network=network)
        row = evaluate(probe, data, split, limit=limit)
        rows[variant] = {k: row.get(k) for k in ("image_auroc", "pixel_auroc", "seconds")}
        rows[variant]["n_images"] = row["n_images"]
        rows[variant]["images_per_s"] = round(network_speed(network, scorer.input_size), 2)
    for variant, row in rows.items():
        row.update(variant_verdict(row, rows["fp32"], variant == "fp32"))
    record = {
        "split": split,
        "data": os.path.basename(os.path.normpath(data)),
        "n_images": rows["fp32"]["n_images"],
        "tolerance": engine.VARIANT_TOLERANCE,
        "device": device,
        "variants": rows,
    }
    engine.record_measurement(scorer, record)
    for variant, row in rows.items():
        log.info(
            "variant %s: image/pixel AUROC %s / %s on %s, %.2fx fp32's speed on %s (%s)",
            variant,
            row["image_auroc"],
            row["pixel_auroc"],
            split,
            row["speed_vs_fp32"],
            device,
            "usable" if row["usable"] else "NOT usable",
        )
    return record


def multi_anomaly(names: tuple[str, ...], samples, results) -> dict:
    """The three protocols on the normal images and the anomalous ones of a known category."""
    keep = [i for i, s in enumerate(samples) if s.label == 0 or s.category in names]
    truth = [samples[i].category if samples[i].label else None for i in keep]
    if len({t for t in truth if t}) < 1 or all(t is None for t in truth):
        return {}
    raw = np.array([results[i].raw_score for i in keep])
    per_cat = np.array([[results[i].category_scores[n] for n in names] for i in keep])
    predicted = [results[i].category for i in keep]
    m = metrics.multi_anomaly_metrics(truth, raw, per_cat, list(names), predicted)
    return {**m, "categories": list(names), "n_categorised": int(sum(t is not None for t in truth))}


def format_table(rows: list[dict], keys=TABLE_KEYS) -> str:
    def fmt(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    names = [r.get("name", r["model"]) for r in rows]
    width = max(len("metric"), *(len(n) for n in names))
    first = max(14, *(len(k) + 1 for k in keys))
    lines = ["metric".ljust(first) + "".join(n.rjust(width + 2) for n in names)]
    for k in keys:
        lines.append(k.ljust(first) + "".join(fmt(r.get(k)).rjust(width + 2) for r in rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = PROG) -> None:
    cfg = parse_config(EvaluateConfig, argv, __doc__.splitlines()[0], prog=prog)
    rows = []
    for uri in cfg.model:
        scorer = engine.load_scorer(uri, engine=cfg.engine, variant=cfg.variant, require_usable=False)
        row = evaluate(scorer, cfg.data, cfg.split, cfg.batch_size, limit=cfg.limit)
        row["name"] = scorer.name if cfg.variant == "fp32" else f"{scorer.name} ({cfg.variant})"
        row["engine"], row["variant"] = type(scorer.network).__name__, cfg.variant
        rows.append(row)
    multi = any(k in r for r in rows for k in MULTI_KEYS)
    print(format_table(rows, TABLE_KEYS + MULTI_KEYS if multi else TABLE_KEYS))
    for r in rows:
        if "category_auroc_per" in r:
            per = ", ".join(f"{k} {v:.4f}" for k, v in r["category_auroc_per"].items())
            print(f"{r['name']}: one-vs-rest AUROC per category: {per}")
    if cfg.output:
        storage.write_bytes(cfg.output, json.dumps(rows[0] if len(rows) == 1 else rows, indent=1).encode())


def cli(argv: list[str] | None = None, prog: str = PROG) -> None:
    """The command line: :func:`main` with errors a user can fix in one line."""
    run_command(lambda: main(argv, prog), prog)


if __name__ == "__main__":
    cli()
