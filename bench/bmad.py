"""BMAD runner: one adcore preset on one BMAD dataset and setting, over seeds, beside the papers' figures.

    python bench/bmad.py --root BMAD --dataset brats --setting full --preset patchcore --seeds 5
    python bench/bmad.py --root BMAD --dataset resc --setting fewshot-4 --preset fusion-small --seeds 5
    python bench/bmad.py --root BMAD --dataset rsna --setting zeroshot --source brats --preset fusion-small

``--root`` holds BMAD's released folders (``Brain_AD``, ``Liver_AD``, ``Retina_RESC_AD``,
``Retina_OCT2017_AD``, ``Chest_AD``, ``Histopathology_AD``; ``bench/bmad_layout.py``). Protocol:

* **Images**: every image and mask resized once to ``--image-size`` (BMAD's 256 x 256; 0 keeps the
  released files) in a view in adcore's layout under ``--work``; each model then resizes to its own
  input size, and pixel AUROC is measured at the protocol size.
* **Settings**: ``full`` trains on every normal training image. ``fewshot-k`` (k in BMAD's few-shot
  tables: 2, 4, 8, 16) trains on k seeded normal training images and k seeded anomalies of the
  validation split moved to training (``--labelled k``; with their masks where the dataset has
  masks, image-level supervision only where it has none); the test split is never touched.
  ``zeroshot`` trains on another BMAD dataset (``--source``, its full setting) and sees no image
  of the target dataset before its validation split.
* **Thresholds** and the score normalisation come from the validation split only (adcore's
  calibration; zero-shot: recalibrated on the target's validation split), never the test split;
  no epoch is chosen on the test split.
* **Seeds**: ``--seeds N`` runs seeds 0..N-1 (draws and training); the table gives mean and
  standard deviation, beside the published figures (``PAPERS``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from bmad_layout import DATASETS, fewshot_view, find_dataset, read_layout, write_view

from adcore.calibration import fit_calibration
from adcore.cli import hidden, parse_config, run_command
from adcore.evaluate import evaluate
from adcore.training import TrainConfig, train
from adcore.training.loop import load_split

PROTOCOL_SIZE = 256  # BMAD resizes every image to 256 x 256
FEWSHOT_K = (2, 4, 8, 16)  # BMAD's / MVFA-AD's few-shot tables
KEYS = ("image_auroc", "pixel_auroc", "f1_max", "acc", "f1", "dice")  # f1/acc/dice: at the validation threshold

# Published image / pixel AUROC (None: not reported), per dataset: (row, setting, image, pixel).
# Sources: the fusion paper's table and MVFA-AD's README (papers.md section 1).
PAPERS: dict[str, list[tuple[str, str, float, float | None]]] = {
    "oct2017": [("fusion paper (BEiT + zero/few-shot)", "paper", 0.9948, None),
                ("VAND-APRIL-GAN (fusion paper's table)", "paper", 0.9941, None),
                ("MVFA-AD", "zeroshot", 0.9540, None), ("MVFA-AD", "fewshot-4", 0.9938, None)],
    "rsna": [("fusion paper (BEiT + zero/few-shot)", "paper", 0.8377, None),
             ("MKD (fusion paper's table)", "paper", 0.8201, None),
             ("MVFA-AD", "zeroshot", 0.7111, None), ("MVFA-AD", "fewshot-4", 0.8195, None)],
    "camelyon16": [("fusion paper (BEiT + zero/few-shot)", "paper", 0.7789, None),
                   ("MKD (fusion paper's table)", "paper", 0.7754, None),
                   ("MVFA-AD", "zeroshot", 0.7790, None), ("MVFA-AD", "fewshot-4", 0.8271, None)],
    "brats": [("fusion paper (BEiT + zero/few-shot)", "paper", 0.9477, 0.9817),
              ("PatchCore (fusion paper's table)", "full", 0.9165, 0.9697),
              ("MVFA-AD", "zeroshot", 0.7863, 0.9027), ("MVFA-AD", "fewshot-4", 0.9244, 0.9730)],
    "liver": [("fusion paper (BEiT + zero/few-shot)", "paper", 0.9083, 0.9723),
              ("CFA (fusion paper's table)", "full", 0.6200, 0.9724),
              ("MVFA-AD", "zeroshot", 0.7624, 0.9785), ("MVFA-AD", "fewshot-4", 0.8118, 0.9973)],
    "resc": [("fusion paper (BEiT + zero/few-shot)", "paper", 0.9195, 0.9745),
             ("VAND-APRIL-GAN (fusion paper's table)", "paper", 0.9470, 0.9798),
             ("MVFA-AD", "zeroshot", 0.8331, 0.9205), ("MVFA-AD", "fewshot-4", 0.9618, 0.9897)],
}  # fmt: skip


@dataclass
class BMADConfig:
    root: str = "BMAD"  # folder holding BMAD's released dataset folders
    dataset: str = "brats"  # brats, liver, resc, oct2017, rsna or camelyon16
    setting: str = "full"  # full, fewshot-K (K in 2, 4, 8, 16) or zeroshot
    source: str = ""  # zeroshot: the BMAD dataset the model trains on
    preset: str = "fusion-small"
    seeds: int = 5  # runs with seeds 0..N-1
    minutes: float | None = None  # training budget per run (None: the preset's default)
    image_size: int = PROTOCOL_SIZE  # images and masks resized to this square size (0: as released)
    overrides: dict[str, Any] = field(default_factory=dict)  # model config overrides, e.g. the prompt domain
    work: str = "out/bmad"  # views, artifacts and results
    smoke_test: bool = hidden(False)  # training's smoke test (tests)
    tiny: bool = hidden(False)  # the preset's tiny random-init variant (tests)


def _setting(cfg: BMADConfig) -> int:
    """Shots of a few-shot setting (0: full or zero-shot); refuses anything else."""
    if cfg.dataset not in DATASETS:
        raise SystemExit(f"--dataset must be one of {', '.join(DATASETS)}, got {cfg.dataset!r}")
    if cfg.setting in ("full", "zeroshot"):
        if cfg.setting == "zeroshot" and (cfg.source not in DATASETS or cfg.source == cfg.dataset):
            raise SystemExit(f"--setting zeroshot needs --source: another of {', '.join(DATASETS)}")
        return 0
    k = cfg.setting.removeprefix("fewshot-")
    if not k.isdigit() or int(k) < 1:
        raise SystemExit(f"--setting must be full, zeroshot or fewshot-K (BMAD: K in {FEWSHOT_K}), got {cfg.setting!r}")
    return int(k)


def _view(cfg: BMADConfig, name: str) -> Path:
    folder = find_dataset(cfg.root, name)
    return write_view(read_layout(folder), Path(cfg.work) / f"{name}-{cfg.image_size}", cfg.image_size)


def _recalibrate(scorer, data: Path, run: TrainConfig) -> None:
    """Thresholds and normalisation from ``data``'s validation split (as training sets them)."""
    valid = load_split(str(data), "valid", run.max_valid)
    results = scorer.score_images(valid["images"], run.batch_size)
    scorer.calibration = fit_calibration(
        valid["labels"],
        np.array([r.raw_score for r in results]),
        valid["masks"],
        [r.raw_map for r in results],
        target_sensitivity=run.target_sensitivity,
        target_specificity=run.target_specificity,
    )


def run_seed(cfg: BMADConfig, full: Path, seed: int) -> dict:
    """Train and evaluate one seed; the test split's metrics."""
    k = _setting(cfg)
    run = TrainConfig(preset=cfg.preset, seed=seed, tiny=cfg.tiny, smoke_test=cfg.smoke_test, overrides=cfg.overrides)
    if cfg.minutes is not None:
        run.minutes = cfg.minutes
    tag = f"{cfg.dataset}-{cfg.setting}-{cfg.preset}-seed{seed}"
    data = full
    if k:
        data = fewshot_view(full, k, seed, Path(cfg.work) / "views" / tag)
        run.labelled = k
    t0 = time.monotonic()
    trained_on = _view(cfg, cfg.source) if cfg.setting == "zeroshot" else data
    scorer = train(str(trained_on), run, output=str(Path(cfg.work) / "models" / tag))
    if cfg.setting == "zeroshot":
        _recalibrate(scorer, data, run)
    seconds = round(time.monotonic() - t0, 1)
    row = evaluate(scorer, str(data), "test")
    return {"seed": seed, "train_s": seconds, **{key: row.get(key) for key in KEYS}}


def summarise(rows: list[dict]) -> dict:
    """Mean and standard deviation of each metric over the seeds (None where a metric is absent)."""
    out = {}
    for key in KEYS:
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = (float(np.mean(values)), float(np.std(values))) if values else None
    return out


def format_table(cfg: BMADConfig, summary: dict, n: int) -> str:
    def cell(v) -> str:
        return "-" if v is None else f"{v[0]:.4f} ± {v[1]:.4f}" if isinstance(v, tuple) else f"{v:.4f}"

    lines = [f"BMAD {cfg.dataset}, {cfg.setting}" + (f" (trained on {cfg.source})" if cfg.source else ""),
             "| row | setting | image AUROC | pixel AUROC | F1 max | ACC / F1 / Dice at the validation threshold |",
             "|---|---|---|---|---|---|",
             f"| adcore {cfg.preset} ({n} seeds) | {cfg.setting} | {cell(summary['image_auroc'])} | "
             f"{cell(summary['pixel_auroc'])} | {cell(summary['f1_max'])} | "
             f"{' / '.join(cell(summary[k]) for k in ('acc', 'f1', 'dice'))} |"]  # fmt: skip
    for name, setting, image, pixel in PAPERS[cfg.dataset]:
        lines.append(f"| {name} | {setting} | {cell(image)} | {cell(pixel)} | - | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(BMADConfig, argv, __doc__.splitlines()[0])
    _setting(cfg)
    if cfg.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {cfg.seeds}")
    full = _view(cfg, cfg.dataset)
    rows = []
    for seed in range(cfg.seeds):
        rows.append(run_seed(cfg, full, seed))
        print(f"seed {seed}: " + ", ".join(f"{k} {v}" for k, v in rows[-1].items() if k != "seed"), flush=True)
    summary = summarise(rows)
    print(format_table(cfg, summary, len(rows)), flush=True)
    result = {"config": asdict(cfg), "runs": rows, "summary": summary}
    out = Path(cfg.work) / f"{cfg.dataset}-{cfg.setting}-{cfg.preset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    run_command(main, "bench/bmad.py")
