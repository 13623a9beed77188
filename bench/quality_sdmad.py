"""SD-MAD against the nearest-category-prototype baseline on the demo categories (not a test).

    python bench/quality_sdmad.py --out /tmp/sdmad-bench [--shots 1 4] [--n-train 60] [--size 224]

Wired by ``python bench/quality.py --suite sdmad``. Makes a demo folder with four lesion kinds as
categories (``categories.csv``), then for each k trains SD-MAD through the normal training entry
(``adcore.training.train``, ``--labelled k*C``: k seeded shots per category) and evaluates it on the
test split with the three protocols (``adcore.evaluate``). The baseline sees the same k shots and the
same frozen vision features: each image is its mean patch feature; prototypes are the mean of the
normal training images and of each category's k shots; the class is the nearest prototype (cosine),
a category's score its cosine minus the normal one, the anomaly score the best category's. Nothing
is tuned on the test split (SD-MAD's selection threshold is fitted on the validation split).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from adcore import metrics
from adcore.data import bmad
from adcore.data.demo import make_demo_dataset
from adcore.evaluate import evaluate
from adcore.scorer import prepare
from adcore.training import TrainConfig, train
from adcore.training.loop import load_split

KINDS = ("hyperintense_mass", "hypointense_cyst", "diffuse_region", "calcified_foci")
MAX_SHOTS = 8  # labelled training anomalies per category in the demo folder (k up to 8)
KEYS = ("normal_vs_any_auroc", "category_auroc", "accuracy", "macro_f1")


@torch.no_grad()
def mean_features(model, images: list[np.ndarray], batch_size: int = 8) -> np.ndarray:
    """Unit mean patch features [N, F] of the frozen vision tower (the baseline's image features)."""
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.stack([prepare(im, model.input_size) for im in images[i : i + batch_size]]))
        f = model.features(x).mean(1)
        out.append(torch.nn.functional.normalize(f, dim=-1).numpy())
    return np.concatenate(out)


def prototype_baseline(model, data: str, k_total: int, seed: int, names: list[str]) -> dict:
    """Nearest category prototype of the k shots (and the normal mean) on the same features."""
    train_split = load_split(data, "train", None, labelled=k_total, seed=seed)
    test = load_split(data, "test", None)
    cats = [s.category for s in train_split["samples"]]
    f_train = mean_features(model, train_split["images"])
    protos = [f_train[np.asarray(train_split["labels"]) == 0].mean(0)]
    protos += [f_train[[c == n for c in cats]].mean(0) for n in names]
    protos = np.stack([p / np.linalg.norm(p) for p in protos])  # [1 + C, F]
    keep = [i for i, s in enumerate(test["samples"]) if s.label == 0 or s.category in names]
    cos = mean_features(model, [test["images"][i] for i in keep]) @ protos.T  # [N, 1 + C]
    per_cat = cos[:, 1:] - cos[:, :1]
    classes = ["normal", *names]
    predicted = [classes[j] for j in cos.argmax(1)]
    truth = [test["samples"][i].category if test["samples"][i].label else None for i in keep]
    return metrics.multi_anomaly_metrics(truth, per_cat.max(1), per_cat, names, predicted)


def run(args) -> list[dict]:
    root = Path(args.out) / "data"
    make_demo_dataset(
        root, n_train=args.n_train, n_valid=args.n_valid, n_test=args.n_test, size=args.size, seed=args.seed,
        kinds=KINDS, n_train_anomalous=MAX_SHOTS * len(KINDS), categories=True,
    )  # fmt: skip
    names = bmad.list_categories(root)
    rows = []
    for k in args.shots:
        t0 = time.monotonic()
        overrides = json.loads(args.overrides) if args.overrides else {}
        cfg = TrainConfig(
            preset=args.preset, tiny=args.tiny, labelled=k * len(names), seed=args.seed, overrides=overrides
        )
        scorer = train(str(root), cfg, output=str(Path(args.out) / f"sdmad-k{k}"))
        ev = evaluate(scorer, str(root), "test")
        rows.append({"method": "sdmad", "k": k, **{m: ev[m] for m in KEYS}, "seconds": round(time.monotonic() - t0)})
        t0 = time.monotonic()
        base = prototype_baseline(scorer.model, str(root), k * len(names), args.seed, names)
        rows.append(
            {"method": "prototype", "k": k, **{m: base[m] for m in KEYS}, "seconds": round(time.monotonic() - t0)}
        )
        print(format_rows(rows[-2:]), flush=True)
    return rows


def format_rows(rows: list[dict]) -> str:
    head = f"{'method':<10}{'k':>3}" + "".join(f"{m:>21}" for m in KEYS)
    lines = [head] + [f"{r['method']:<10}{r['k']:>3}" + "".join(f"{r[m]:>21.4f}" for m in KEYS) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/tmp/sdmad-bench")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 4])
    p.add_argument("--n-train", type=int, default=60)
    p.add_argument("--n-valid", type=int, default=40)
    p.add_argument("--n-test", type=int, default=80)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="sdmad")
    p.add_argument("--tiny", action="store_true", help="the preset's tiny random-init variant (plumbing only)")
    p.add_argument("--overrides", default="", help="model config overrides as JSON, e.g. '{\"steps\": 100}'")
    args = p.parse_args(argv)
    if max(args.shots) > MAX_SHOTS:
        raise SystemExit(f"--shots at most {MAX_SHOTS}")
    rows = run(args)
    print(format_rows(rows))
    Path(args.out, "sdmad_quality.json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    from adcore.cli import setup_logging

    setup_logging()
    main()
