"""Quality benchmark: fusion-small (extended and paper-faithful) vs PatchCore on the demo modalities.

    python bench/quality.py [--minutes 10] [--modalities brain] [--ablations all|head|none] [--out out/bench-quality]
    python bench/quality.py --rows=-memory,-adapter_side   # only these rows after PatchCore and fusion-small
    python bench/quality.py --suite dra [--dra-labelled 1,10] [--dra-protocols general,hard] [--with-fusion]
    python bench/quality.py --suite all [--minutes 10]   # the evaluation suite: bench/quality_suite.py

``--suite fusion`` (the default): per demo modality, trains PatchCore, fusion-small (every
extension on, docs/models/fusion.md) and fusion-small-paper (none), then one ablation row per
extension: the training-side ones (``adapter_side``, ``adapter_residual``, ``train_scored``,
``synthesis``, ``epoch_average``) retrained with that extension's fields at their paper values,
the head-side ones (memory branch, clean centroids, k-means centroids) refit on the extended
model's network with that field at its paper value (no retraining), and the memory branch alone
(``memory_weight`` 1); ``--rows`` picks some of them (and/or ``paper``). Evaluated on the test
split with thresholds fixed on the
validation split; validation AUROCs are printed too (what any choice of setting may look at).
Targets: fusion-small >= PatchCore on image and pixel AUROC on every modality, >= 0.95 on both for
the brain demo, ACC >= 0.85 at the stored threshold, within 10 minutes of training on 2 cores.

``--suite dra`` (DRA rows: ``dra_rows`` below) uses a demo folder with lesion
kinds and labelled training anomalies, and reports image AUROC on the test split separately for the
kinds DRA was shown (seen) and the others (unseen), beside PatchCore (and fusion-small) on the same
subsets. Protocols: general (labelled anomalies drawn from every kind) and hard (labelled anomalies
and validation anomalies of one kind only). Targets: with 10 labelled anomalies, DRA >= PatchCore on
seen kinds and no more than 0.02 below it on unseen kinds.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adcore import metrics
from adcore.calibration import fit_calibration
from adcore.cli import parse_config
from adcore.data.bmad import ANOMALY_DIR, list_split
from adcore.data.demo import lesion_kinds, make_demo_dataset
from adcore.evaluate import evaluate, format_table
from adcore.models import family_for
from adcore.scorer import Scorer, load
from adcore.training import TrainConfig, train
from adcore.training.data import SyntheticAnomalyBatches
from adcore.training.fit import FitData
from adcore.training.loop import load_split
from adcore.training.select import select_on_validation

TARGET_AUROC = 0.95  # brain demo, fusion-small image and pixel AUROC
TARGET_ACC = 0.85  # fusion-small ACC at the stored threshold
TABLE_KEYS = (
    "image_auroc", "pixel_auroc", "aupro", "f1_max", "acc", "dice", "val_image_auroc", "val_pixel_auroc", "train_s"
)  # fmt: skip
# Extensions of fusion-small and their paper values (docs/models/fusion.md).
# Training-side rows, retrained: row name -> the paper's values of that extension's fields.
TRAIN_ABLATIONS = {
    "-adapter_side": {"adapter_side": False, "train_last_layers": 1, "domain_train_layers": 2},
    "-adapter_residual": {"adapter_residual": False},
    "-train_scored": {"train_scored": False},
    "-synthesis": {"synthesis": "default"},
    "-epoch_average": {"epoch_average": 0.0},
}
# Head-side rows, refit on fusion-small's network: row name -> config changes. "-memory" is memory_weight 0
# (the same scores as memory_layers [], without a second pass); "memory_only" is the memory branch alone.
HEAD_ABLATIONS = {
    "memory_only": {"memory_weight": 1.0, "memory_weight_choices": [], "memory_scale_choices": []},
    "-memory": {"memory_weight": 0.0, "memory_weight_choices": [], "memory_scale_choices": []},
    "-weight_choice": {"memory_weight_choices": [], "memory_scale_choices": []},
    "-scale_choice": {"memory_scale_choices": []},
    "-map_sigma": {"map_sigma_px": 0.0},
    "-memory_reweight": {"memory_reweight_k": 0},
    "-clean_centroids": {"clean_centroids": False},
    "-centroid_method": {"centroid_method": "vae"},
}
# DRA suite
DRA_KINDS = ["hyperintense_mass", "hypointense_cyst", "diffuse_region"]
DRA_TRAIN_ANOMALOUS = 30  # train/Ungood: 10 per kind, so the hard protocol can draw 10 of one kind
DRA_UNSEEN_MARGIN = 0.02  # target: DRA at most this far below PatchCore on unseen kinds (10 labelled)
DRA_PAPER = "paper, 10 labelled (other data): BrainMRI 0.970, HeadCT 0.972 image AUROC"


def _brain(root: str, seed: int, **sizes) -> Path:
    return make_demo_dataset(root, seed=seed, **sizes)


def _chest(root: str, seed: int, **sizes) -> Path:
    from adcore.data.demo_chest import make_chest_dataset

    return make_chest_dataset(root, seed=seed, **sizes)


# Demo modalities: name -> (root, seed, n_train=, n_valid=, n_test=) -> BMAD folder.
# Each generator's lesions stay out of training.
MODALITIES: dict[str, Callable[..., Path]] = {"brain": _brain, "chest": _chest}


@dataclass
class QualityConfig:
    minutes: float = 10.0  # fusion-small training budget (gradient stages)
    epochs: int | None = None  # fusion-small stage-2 epochs; default: as many as --minutes allows
    data: str = "out/demo"  # fusion suite: demo folders go to <data>-<modality> (generated when missing)
    out: str = "out/bench-quality"  # artifacts and quality.json
    seed: int = 0
    suite: str = "fusion"  # "fusion" (fusion-small vs PatchCore, ablations) or "dra" (DRA protocols)
    modalities: str = ",".join(MODALITIES)  # fusion suite: demo modalities, comma-separated
    ablations: str = "all"  # fusion suite: "all", "head" (no retraining ablations) or "none"
    n_train: int = 200  # fusion suite: demo size (smaller for quick runs; the targets are for the default)
    n_valid: int = 40
    n_test: int = 100
    reuse: bool = False  # fusion suite: load artifacts an earlier run left in --out instead of training again
    rows: str = ""  # fusion suite: only these rows after PatchCore and fusion-small (comma-separated names
    # of ablation rows and/or "paper"), instead of what --ablations says
    dra_data: str = "out/demo-kinds"  # DRA suite: demo folder with lesion kinds (generated when missing)
    dra_labelled: str = "1,10"  # DRA suite: labelled anomalies per run (paper: 1 and 10)
    dra_protocols: str = "general,hard"  # DRA suite: general (every kind) and/or hard (one kind)
    hard_kind: str = "hypointense_cyst"  # DRA suite: the one labelled kind of the hard protocol
    dra_minutes: float | None = None  # DRA suite: training budget per run (None: the preset's 30 x 20 steps)
    dra_overrides: dict[str, Any] = field(default_factory=dict)  # DRA config overrides, e.g. {"epochs": 3}
    with_fusion: bool = False  # DRA suite: fusion-small beside PatchCore (--minutes of training)


# Suites with flags of their own: ``--suite NAME`` hands every other argument to ``<module>.main``.
OWN_FLAG_SUITES = {"sdmad": "quality_sdmad", "entroad": "quality_entroad", "all": "quality_suite"}


def main() -> None:
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):
        name = arg.split("=", 1)[1] if arg.startswith("--suite=") else argv[i + 1] if arg == "--suite" else None
        if name in OWN_FLAG_SUITES:
            rest = argv[:i] + argv[i + (1 if "=" in arg else 2) :]
            return importlib.import_module(OWN_FLAG_SUITES[name]).main(rest)
    args = parse_config(QualityConfig, None, __doc__.splitlines()[0])
    suites = {"fusion": fusion_rows, "dra": dra_rows}
    if args.suite not in suites:
        raise SystemExit(f"--suite must be one of {sorted([*suites, *OWN_FLAG_SUITES])}, got {args.suite!r}")
    return suites[args.suite](args)


# --- fusion-small vs PatchCore, with ablations ----------------------------------


def _evaluated(scorer, data: str, name: str, seconds: float | None) -> dict:
    row = evaluate(scorer, data, "test")
    valid = evaluate(scorer, data, "valid")
    row |= {"name": name, "train_s": seconds, "val_image_auroc": valid["image_auroc"]}
    row["val_pixel_auroc"] = valid["pixel_auroc"]
    print(f"  {name}: image {row['image_auroc']:.4f} pixel {row['pixel_auroc']:.4f} acc {row.get('acc')}", flush=True)
    return row


def _trained(data: str, preset: str, args: QualityConfig, out: Path, overrides: dict | None = None):
    cfg = TrainConfig(preset=preset, seed=args.seed, overrides=overrides or {})
    if preset.startswith("fusion"):
        cfg.minutes, cfg.epochs = args.minutes, args.epochs
    if args.reuse and (out / "manifest.json").is_file():  # an artifact of an earlier run of this benchmark
        seconds = json.loads((out / "config.json").read_text()).get("training", {}).get("seconds")
        return load(str(out)), seconds, cfg
    t0 = time.monotonic()
    scorer = train(data, cfg, output=str(out))
    return scorer, round(time.monotonic() - t0, 1), cfg


def _cached_fit_passes():
    """Make fusion's fit passes reuse their embeddings between head refits of one network (same weights)."""
    import adcore.models.fusion.fit as fusion_fit

    if getattr(fusion_fit.fit_pass, "cached", False):
        return
    plain, cache = fusion_fit.fit_pass, {}

    def fit_pass(model, data, anomaly_share, max_images=None):
        key = (id(model), id(data.batches), anomaly_share, max_images, tuple(model.cfg.memory_layers))
        if key not in cache:
            cache[key] = plain(model, data, anomaly_share, max_images)
        return cache[key]

    fit_pass.cached = True
    fusion_fit.fit_pass = fit_pass


_REFIT_BATCHES: dict[str, SyntheticAnomalyBatches] = {}  # data folder -> training batches (as training builds them)


def _refit_batches(data: str, model, cfg: TrainConfig) -> SyntheticAnomalyBatches:
    train_set = load_split(data, "train", None, labelled=cfg.labelled, seed=cfg.seed)
    _REFIT_BATCHES[data] = SyntheticAnomalyBatches(
        train_set["images"],
        train_set["masks"] or [None] * len(train_set["images"]),
        train_set["labels"],
        model.input_size,
        cfg.batch_size,
        cfg.anomaly_share,
        seed=cfg.seed,
    )
    return _REFIT_BATCHES[data]


def _refit(scorer, data: str, cfg: TrainConfig, changes: dict[str, Any]):
    """A copy of ``scorer`` whose head is fit again (as training does) with model config ``changes``."""
    model = scorer.model
    family = family_for(model)
    _cached_fit_passes()
    batches = _REFIT_BATCHES.get(data) or _refit_batches(data, model, cfg)
    saved = {k: getattr(model.cfg, k) for k in changes}
    for k, v in changes.items():
        setattr(model.cfg, k, v)
    try:
        again = Scorer(model, family.fit(model, FitData(batches, seed=cfg.seed)))
        valid = load_split(data, "valid", cfg.max_valid)
        select_on_validation(again, valid, cfg.batch_size)  # as training does
        results = again.score_images(valid["images"], cfg.batch_size)
        maps = [r.raw_map for r in results] if valid["masks"] is not None else None
        raw = np.array([r.raw_score for r in results])
        again.calibration = fit_calibration(
            valid["labels"],
            raw,
            valid["masks"],
            maps,
            target_sensitivity=cfg.target_sensitivity,
            target_specificity=cfg.target_specificity,
        )
        return again, saved
    except Exception:
        for k, v in saved.items():
            setattr(model.cfg, k, v)
        raise


def _modality_rows(name: str, data: str, args: QualityConfig) -> list[dict]:
    out = Path(args.out) / name
    rows = []
    scorer, seconds, _ = _trained(data, "patchcore", args, out / "patchcore")
    rows.append(_evaluated(scorer, data, "patchcore", seconds))
    ext, seconds, ext_cfg = _trained(data, "fusion-small", args, out / "fusion-small")
    rows.append(_evaluated(ext, data, "fusion-small", seconds))
    wanted = set(_row_names(args))
    for key, changes in HEAD_ABLATIONS.items():  # head refits first: they share the fit passes (cached)
        if key in wanted:
            scorer, saved = _refit(ext, data, ext_cfg, changes)
            rows.append(_evaluated(scorer, data, key, None))
            for k, v in saved.items():
                setattr(ext.model.cfg, k, v)
    if "paper" in wanted:
        scorer, seconds, _ = _trained(data, "fusion-small-paper", args, out / "fusion-small-paper")
        rows.append(_evaluated(scorer, data, "paper", seconds))
    for key, paper in TRAIN_ABLATIONS.items():
        if key in wanted:
            scorer, seconds, _ = _trained(data, "fusion-small", args, out / f"no{key}", paper)
            rows.append(_evaluated(scorer, data, key, seconds))
    return rows


def _row_names(args: QualityConfig) -> list[str]:
    """Rows after PatchCore and fusion-small: ``--rows``, else what ``--ablations`` says."""
    if args.rows:
        names = [n for n in args.rows.split(",") if n]
        known = {*HEAD_ABLATIONS, *TRAIN_ABLATIONS, "paper"}
        unknown = sorted(set(names) - known)
        if unknown:
            raise SystemExit(f"--rows: unknown {unknown}; known: {sorted(known)}")
        return names
    head = list(HEAD_ABLATIONS) if args.ablations != "none" else []
    return [*head, "paper", *(TRAIN_ABLATIONS if args.ablations == "all" else [])]


def fusion_rows(args: QualityConfig) -> None:
    """Per modality: PatchCore, fusion-small, fusion-small-paper and the ablations; then the target checks."""
    if args.ablations not in ("all", "head", "none"):
        raise SystemExit(f"--ablations must be all, head or none, got {args.ablations!r}")
    tables, checks = {}, {}
    for name in args.modalities.split(","):
        if name not in MODALITIES:
            raise SystemExit(f"--modalities: one of {sorted(MODALITIES)}, got {name!r}")
        sizes = {"n_train": args.n_train, "n_valid": args.n_valid, "n_test": args.n_test}
        data = str(MODALITIES[name](f"{args.data}-{name}", args.seed, **sizes))
        print(f"{name} ({data}), fusion budget {args.minutes} min:", flush=True)
        rows = tables[name] = _modality_rows(name, data, args)
        pc, ext = rows[0], rows[1]
        for key in ("image_auroc", "pixel_auroc"):
            checks[f"{name}: fusion-small {key} >= PatchCore"] = ext[key] >= pc[key]
            if name == "brain":
                checks[f"{name}: fusion-small {key} >= {TARGET_AUROC}"] = ext[key] >= TARGET_AUROC
        checks[f"{name}: fusion-small ACC >= {TARGET_ACC}"] = (ext.get("acc") or 0.0) >= TARGET_ACC
    for name, rows in tables.items():
        print(f"\n{name}, fusion budget {args.minutes} min (test split; val_* on the validation split)")
        print(format_table(rows, keys=TABLE_KEYS))
    for text, ok in checks.items():
        print(f"{'PASS' if ok else 'MISS'}  {text}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "quality.json").write_text(json.dumps({"minutes": args.minutes, "tables": tables}, indent=1))


# --- DRA rows -----------------------------------------------------------------


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        dst.symlink_to(src.resolve())


def _hard_view(base: Path, kind: str, kinds: dict[str, str], out: Path) -> Path:
    """The base folder with train/Ungood and valid/Ungood restricted to ``kind`` (symlinks; test unchanged)."""
    for part in ("train/good", "valid/good", "test"):
        _link(base / part, out / part)
    for split in ("train", "valid"):
        for rel, k in kinds.items():
            if k == kind and rel.startswith(f"{split}/{ANOMALY_DIR}/img/"):
                _link(base / rel, out / rel)
                mask_dir = "anomaly_mask" if split == "train" else "label"
                name = Path(rel).name
                _link(base / split / ANOMALY_DIR / mask_dir / name, out / split / ANOMALY_DIR / mask_dir / name)
    return out


def _test_scores(scorer, data: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    ds = load_split(str(data), "test", None)
    raw = np.array([r.raw_score for r in scorer.score_images(ds["images"])])
    return ds["labels"], raw, [str(s.path.relative_to(data)) for s in ds["samples"]]


def _auroc_on(labels, raw, rels, kinds: dict[str, str], wanted: set[str]) -> float | None:
    """Image AUROC of the normal test images against the anomalous ones of the ``wanted`` kinds."""
    keep = [i for i, (y, r) in enumerate(zip(labels, rels)) if y == 0 or kinds.get(r) in wanted]
    y = labels[keep]
    return metrics.image_auroc(y, raw[keep]) if wanted and 0 < y.sum() < len(y) else None


def dra_rows(args: QualityConfig) -> None:
    """DRA with 1 and 10 labelled anomalies, general and hard protocols, seen/unseen AUROC beside baselines."""
    base = make_demo_dataset(args.dra_data, seed=args.seed, kinds=DRA_KINDS, n_train_anomalous=DRA_TRAIN_ANOMALOUS)
    kinds, out = lesion_kinds(base), Path(args.out)
    baselines = [("patchcore", TrainConfig(preset="patchcore", seed=args.seed))]
    if args.with_fusion:
        fusion = TrainConfig(preset="fusion-small", minutes=args.minutes, epochs=args.epochs, seed=args.seed)
        baselines.append(("fusion-small", fusion))
    scored = {}
    for name, cfg in baselines:
        t0 = time.monotonic()
        scorer = train(str(base), cfg, output=str(out / f"dra-suite-{name}"))
        scored[name] = (*_test_scores(scorer, base), round(time.monotonic() - t0, 1))
    rows = []
    for protocol in args.dra_protocols.split(","):
        if protocol not in ("general", "hard"):
            raise SystemExit(f"--dra-protocols: general and/or hard, got {protocol!r}")
        data = base if protocol == "general" else _hard_view(base, args.hard_kind, kinds, out / "hard-view")
        for n in (int(v) for v in args.dra_labelled.split(",")):
            drawn = [s for s in list_split(data, "train", labelled=n, seed=args.seed) if s.label]
            seen = {kinds[str(s.path.relative_to(data))] for s in drawn}
            unseen = set(DRA_KINDS) - seen
            cfg = TrainConfig(
                preset="dra", labelled=n, seed=args.seed, minutes=args.dra_minutes, overrides=args.dra_overrides
            )
            t0 = time.monotonic()
            scorer = train(str(data), cfg, output=str(out / f"dra-{protocol}-{n}"))
            dra = (*_test_scores(scorer, data), round(time.monotonic() - t0, 1))
            row = {"protocol": protocol, "labelled": n, "seen_kinds": sorted(seen)}
            for name, (labels, raw, rels, seconds) in [("dra", dra), *scored.items()]:
                row[f"{name}_seen"] = _auroc_on(labels, raw, rels, kinds, seen)
                row[f"{name}_unseen"] = _auroc_on(labels, raw, rels, kinds, unseen)
                row[f"{name}_all"] = metrics.image_auroc(labels, raw)
                row[f"{name}_train_s"] = seconds
            rows.append(row)
            print(_format_dra_row(row, [*scored]), flush=True)
    print(DRA_PAPER)
    for row in rows:
        if row["labelled"] < 10:
            continue
        tag = f"{row['protocol']}, {row['labelled']} labelled"
        seen_ok = row["dra_seen"] is not None and row["dra_seen"] >= row["patchcore_seen"]
        unseen_ok = row["dra_unseen"] is None or row["dra_unseen"] >= row["patchcore_unseen"] - DRA_UNSEEN_MARGIN
        print(f"{'PASS' if seen_ok else 'MISS'}  DRA seen AUROC >= PatchCore ({tag})")
        if row["dra_unseen"] is not None:
            print(f"{'PASS' if unseen_ok else 'MISS'}  DRA unseen AUROC >= PatchCore - {DRA_UNSEEN_MARGIN} ({tag})")
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality-dra.json").write_text(json.dumps({"config": args.dra_overrides, "rows": rows}, indent=1))


def _format_dra_row(row: dict, baselines: list[str]) -> str:
    def fmt(v):
        return "   -  " if v is None else f"{v:.4f}"

    parts = [f"{row['protocol']:>7} {row['labelled']:>3} labelled, seen {','.join(row['seen_kinds'])}:"]
    for name in ["dra", *baselines]:
        parts.append(
            f"{name} seen {fmt(row[f'{name}_seen'])} unseen {fmt(row[f'{name}_unseen'])} all {fmt(row[f'{name}_all'])}"
        )
    return "  ".join(parts) + f"  (DRA trained {row['dra_train_s']} s)"


if __name__ == "__main__":
    main()
