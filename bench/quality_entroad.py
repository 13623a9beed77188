"""Cross-domain (zero-shot) benchmark of EntroAD.

    python bench/quality_entroad.py [--pairs brain:chest,chest:brain] [--minutes 3] [--epochs 2] [--out DIR]

For every pair A:B (demo modalities: ``brain`` = adcore.data.demo, ``chest`` = adcore.data.demo_chest),
EntroAD (entroad-small) and fusion-small are trained on A (normal images + synthetic anomalies,
model selection and calibration on A's validation split) and scored on B's test split without any
B image seen: the zero-shot protocol. PatchCore fitted on B's normal training images is the
reference that is *not* zero-shot. Image and pixel AUROC are threshold-free; nothing is tuned on
any test split. The paper's figures stand beside them: its backbone (CLIP ViT-L/14) and data
(real benchmarks) differ from the offline DINOv2 ViT-S/14 and the demo sets here, so they are
context, not a comparison. Target: EntroAD above fusion-small on image and pixel AUROC
in every cross-domain pair.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from adcore.cli import parse_config
from adcore.data.demo import make_demo_dataset
from adcore.data.demo_chest import make_chest_dataset
from adcore.evaluate import evaluate
from adcore.training import TrainConfig, train

DOMAINS = {"brain": make_demo_dataset, "chest": make_chest_dataset}
ZERO_SHOT = ("entroad-small", "fusion-small")  # trained on A, scored on B
REFERENCE = "patchcore"  # fitted on B's normals: not zero-shot
# arXiv 2605.28630 as quoted on an aggregator page (papers.md section 5); no per-pair table is public.
PAPER = "paper (CLIP ViT-L/14, real benchmarks): BrainMRI image AUROC 0.961; BTAD pixel 0.961; VisA pixel 0.948"
KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "train_s")


@dataclass
class EntroADBenchConfig:
    out: str = "out/bench-entroad"  # demo folders, artifacts and entroad.json
    pairs: str = "brain:chest,chest:brain"  # train:test domain pairs, comma-separated
    minutes: float = 3.0  # training budget of each zero-shot model (gradient stages)
    epochs: int = 2  # at most, per zero-shot model
    batch_size: int = 8
    max_valid: int = 20  # validation images for model selection and calibration
    n_train: int = 60  # per demo folder
    n_valid: int = 20
    n_test: int = 40
    seed: int = 0


def _pairs(text: str) -> list[tuple[str, str]]:
    pairs = [tuple(p.split(":")) for p in text.split(",") if p]
    bad = [p for p in pairs if len(p) != 2 or not set(p) <= set(DOMAINS) or p[0] == p[1]]
    if bad or not pairs:
        raise SystemExit(f"--pairs: cross-domain A:B pairs of {sorted(DOMAINS)}, got {text!r}")
    return pairs


def _train(preset: str, data: Path, cfg: EntroADBenchConfig, out: Path):
    tc = TrainConfig(preset=preset, seed=cfg.seed, batch_size=cfg.batch_size, max_valid=cfg.max_valid)
    tc.minutes, tc.epochs = cfg.minutes, cfg.epochs
    t0 = time.monotonic()
    scorer = train(str(data), tc, output=str(out))
    return scorer, round(time.monotonic() - t0, 1)


def _row(scorer, data: Path, name: str, train_on: str, test_on: str, seconds: float) -> dict:
    row = evaluate(scorer, str(data), "test", batch_size=8)
    row |= {"name": name, "train_on": train_on, "test_on": test_on, "train_s": seconds}
    print(f"  {name} {train_on}->{test_on}: image {row['image_auroc']:.4f} pixel {row['pixel_auroc']:.4f}", flush=True)
    return row


def run(cfg: EntroADBenchConfig) -> list[dict]:
    out = Path(cfg.out)
    pairs = _pairs(cfg.pairs)
    sizes = dict(n_train=cfg.n_train, n_valid=cfg.n_valid, n_test=cfg.n_test, seed=cfg.seed)
    folders = {d: DOMAINS[d](out / f"demo-{d}", **sizes) for d in {x for p in pairs for x in p}}
    trained: dict[tuple[str, str], tuple] = {}
    rows = []
    for a, b in pairs:
        print(f"{a} -> {b}", flush=True)
        for preset in ZERO_SHOT:
            if (preset, a) not in trained:
                trained[preset, a] = _train(preset, folders[a], cfg, out / f"{preset}-on-{a}")
            scorer, seconds = trained[preset, a]
            rows.append(_row(scorer, folders[b], preset, a, b, seconds))
        if (REFERENCE, b) not in trained:
            trained[REFERENCE, b] = _train(REFERENCE, folders[b], cfg, out / f"{REFERENCE}-on-{b}")
        scorer, seconds = trained[REFERENCE, b]
        rows.append(_row(scorer, folders[b], f"{REFERENCE} (B normals)", b, b, seconds))
    return rows


def format_rows(rows: list[dict]) -> str:
    def fmt(v):
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    head = f"{'model':26}{'train':>7}{'test':>7}" + "".join(f"{k:>13}" for k in KEYS)
    lines = [head] + [
        f"{r['name']:26}{r['train_on']:>7}{r['test_on']:>7}" + "".join(f"{fmt(r.get(k)):>13}" for k in KEYS)
        for r in rows
    ]
    verdicts = []
    for a, b in sorted({(r["train_on"], r["test_on"]) for r in rows if r["name"] in ZERO_SHOT}):
        pick = {r["name"]: r for r in rows if (r["train_on"], r["test_on"]) == (a, b)}
        e, f = pick.get(ZERO_SHOT[0]), pick.get(ZERO_SHOT[1])
        if e and f:
            ok = all((e[k] or 0) > (f[k] or 0) for k in ("image_auroc", "pixel_auroc"))
            verdicts.append(f"target {a}->{b}: EntroAD above fusion-small on image and pixel AUROC: {ok}")
    return "\n".join([*lines, "", *verdicts, PAPER, "note: the paper's backbone and data differ from these."])


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(EntroADBenchConfig, argv, __doc__.splitlines()[0], prog="python bench/quality_entroad.py")
    rows = run(cfg)
    table = format_rows(rows)
    print(table)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "entroad.json").write_text(json.dumps({"config": asdict(cfg), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
