"""Evaluation suite: every PatchCore preset, fusion-small, fusion-small-paper and anomalib's PatchCore on the
suite's five datasets (``adcore.data.suite``), per dataset and as mean and worst case.

    python bench/quality.py --suite all [--minutes 10] [--datasets brain,chest,head_ct,retina,pathology]
        [--n-train 100] [--n-valid 20] [--n-test 60] [--size 128] [--rows patchcore,fusion-small] [--reuse]

Each dataset is made (seed ``--seed``) under ``--data``/<name> when missing. Every row is trained with
``adcore.training.train`` (the library call behind ``adcore train``) on train/good with the preset's
defaults, fusion rows within ``--minutes``; image AUROC (raw image scores) and pixel AUROC (raw maps)
are measured on the test split, and image AUROC also per lesion kind (normal test images against that
kind's). anomalib's PatchCore (``bench/anomalib_peer.py``: MobileNetV2, 224 px, 1 % bank, the same
network inputs) runs when its virtual environment exists (``--venv``; ``python bench/anomalib_peer.py``
makes it); otherwise its row says it is absent. ``--overrides '{"patchcore": {"coreset_ratio": 0.01}}'``
changes a row's model config (rows named ``preset@tag`` via ``--variants`` run a preset twice).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from adcore import metrics
from adcore.data.demo import lesion_kinds
from adcore.data.suite import SUITE, make_suite_dataset
from adcore.models import list_models, preset
from adcore.scorer import load
from adcore.training import TrainConfig, train
from adcore.training.loop import load_split

PEER_ROW = "anomalib-patchcore"
FUSION_ROWS = ("fusion-small", "fusion-small-paper")


def default_rows() -> list[str]:
    """Every registered PatchCore preset, then the fusion rows."""
    patchcore = [n for n in list_models() if preset(n)["family"] == "patchcore"]
    return [*patchcore, *FUSION_ROWS]


def _scored(scorer, test: dict, kinds: dict[str, str], root: Path) -> dict:
    results = scorer.score_images(test["images"])
    raw = np.array([r.raw_score for r in results])
    labels = np.asarray(test["labels"])
    row = {
        "image_auroc": metrics.image_auroc(labels, raw),
        "pixel_auroc": metrics.pixel_auroc(test["masks"], [r.raw_map for r in results]),
    }
    rel = [s.path.relative_to(root).as_posix() for s in test["samples"]]
    for kind in sorted(set(kinds.values())):
        keep = [i for i, r in enumerate(rel) if labels[i] == 0 or kinds.get(r) == kind]
        row[f"kind:{kind}"] = metrics.image_auroc(labels[keep], raw[keep])
    return row


def _trained(data: Path, row: str, args, out: Path):
    name, _, _tag = row.partition("@")
    if args.reuse and (out / "manifest.json").is_file():
        return load(str(out)), json.loads((out / "config.json").read_text()).get("training", {}).get("seconds")
    cfg = TrainConfig(preset=name, seed=args.seed, minutes=args.minutes, overrides=args.overrides.get(row, {}))
    t0 = time.monotonic()
    scorer = train(str(data), cfg, output=str(out))
    return scorer, round(time.monotonic() - t0, 1)


def _peer(data: Path, test: dict, work: Path, args) -> dict | None:
    """anomalib's PatchCore on the same test images, or None without its venv."""
    import anomalib_peer

    if not (Path(args.venv) / "bin" / "python").exists():
        return None
    peer_args = argparse.Namespace(venv=args.venv, threads=args.threads, batch_size=16)
    work = work.resolve()  # the helper runs inside it
    inputs = anomalib_peer.peer_inputs(data, test, work)
    try:
        row = anomalib_peer.peer_row(inputs, test, work, peer_args, args.seed)
    finally:
        inputs.unlink()
    return {"image_auroc": row["image_auroc"], "pixel_auroc": row["pixel_auroc"], "train_s": round(row["fit_s"], 1)}


def dataset_rows(name: str, args) -> dict[str, dict]:
    sizes = {"n_train": args.n_train, "n_valid": args.n_valid, "n_test": args.n_test, "size": args.size}
    data = make_suite_dataset(name, Path(args.data) / name, seed=args.seed, **sizes)
    test, kinds = load_split(str(data), "test", None), lesion_kinds(data)
    rows = {}
    for row in args.rows:
        scorer, seconds = _trained(data, row, args, Path(args.out) / name / row)
        rows[row] = {**_scored(scorer, test, kinds, data), "train_s": seconds}
        print(f"  {name} {row}: " + ", ".join(f"{k} {v:.4f}" for k, v in rows[row].items() if k != "train_s")
              + f" ({seconds} s)", flush=True)  # fmt: skip
    if args.peer:
        work = Path(args.out) / name / "anomalib"
        work.mkdir(parents=True, exist_ok=True)
        rows[PEER_ROW] = _peer(data, test, work, args)
        print(f"  {name} {PEER_ROW}: {rows[PEER_ROW] or 'absent (no ' + args.venv + ')'}", flush=True)
    return rows


def summary(tables: dict[str, dict[str, dict]], key: str) -> str:
    """One metric: a row per model, a column per dataset, then mean and worst case over the datasets."""
    names = list(tables)
    models = list(dict.fromkeys(m for rows in tables.values() for m in rows))
    width = max(len(m) for m in models)
    lines = [f"{key:{width}}  " + "  ".join(f"{n:>9}" for n in [*names, "mean", "worst"])]
    for m in models:
        vals = [(tables[n].get(m) or {}).get(key) for n in names]
        if any(v is None for v in vals):
            cells = [f"{v:9.4f}" if v is not None else f"{'absent':>9}" for v in vals] + [f"{'-':>9}"] * 2
        else:
            cells = [f"{v:9.4f}" for v in [*vals, float(np.mean(vals)), float(np.min(vals))]]
        lines.append(f"{m:{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default=",".join(SUITE))
    p.add_argument("--rows", default=None, help="presets to train (default: PatchCore presets, fusion rows; '' none)")
    p.add_argument("--variants", default="", help="extra rows PRESET@TAG (their model config from --overrides)")
    p.add_argument("--overrides", type=json.loads, default={}, help="JSON {row: {field: value}}")
    p.add_argument("--minutes", type=float, default=10.0, help="training budget of the fusion rows")
    p.add_argument("--n-train", type=int, default=100)
    p.add_argument("--n-valid", type=int, default=20)
    p.add_argument("--n-test", type=int, default=60)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="out/suite-data")
    p.add_argument("--out", default="out/bench-suite")
    p.add_argument("--reuse", action="store_true", help="load artifacts an earlier run left in --out")
    p.add_argument("--no-peer", dest="peer", action="store_false", help="skip anomalib's PatchCore")
    p.add_argument("--venv", default=str(Path(__file__).resolve().parents[1] / ".venv-anomalib"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    args.rows = [r for r in (args.rows.split(",") if args.rows is not None else default_rows()) if r]
    args.rows += [v for v in args.variants.split(",") if v]
    unknown = sorted({r.partition("@")[0] for r in args.rows} - set(list_models()))
    if unknown:
        raise SystemExit(f"--rows: unknown presets {unknown}; known: {list_models()}")
    tables = {}
    for name in args.datasets.split(","):
        if name not in SUITE:
            raise SystemExit(f"--datasets: one of {sorted(SUITE)}, got {name!r}")
        print(f"{name} ({SUITE[name].domain}), fusion budget {args.minutes} min:", flush=True)
        tables[name] = dataset_rows(name, args)
    print(f"\ntest split; {args.n_train} training images, {args.size} px, fusion budget {args.minutes} min")
    for key in ("image_auroc", "pixel_auroc"):
        print("\n" + summary(tables, key))
    kinds = sorted({k for rows in tables.values() for r in rows.values() if r for k in r if k.startswith("kind:")})
    print("\nimage AUROC per lesion kind (normal test images against that kind):")
    for name, rows in tables.items():
        for k in [k for k in kinds if any(k in (r or {}) for r in rows.values())]:
            cells = ", ".join(f"{m} {r[k]:.4f}" for m, r in rows.items() if r and k in r)
            print(f"  {name} {k[5:]}: {cells}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    record = {"args": {k: v for k, v in vars(args).items()}, "tables": tables}
    (Path(args.out) / "quality-suite.json").write_text(json.dumps(record, indent=1, default=str))
