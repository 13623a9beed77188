"""adcore's PatchCore beside anomalib 2.7's PatchCore: same backbone, images, bank ratio and layers.

    python bench/anomalib_peer.py [--data DIR ...] [--out out/bench-anomalib] [--threads 2] [--seeds 0,1,2]

Without ``--data`` the brain demo (and the chest demo when ``adcore.data.demo_chest`` exists) is
generated with seed 0 under ``--out``. Per folder: adcore's ``patchcore`` (MobileNetV2) is trained
(``adcore.training.train``, the library call behind ``python -m adcore.train``) on train/good with a
1 % coreset, once with the paper's map smoothing and image-score reweighting (``map_sigma_px`` 4,
``reweight_k`` 9) and once with both off; anomalib's ``PatchcoreModel`` (``mobilenetv2_100``, layers
``blocks.2`` + ``blocks.4``, ``coreset_sampling_ratio`` 0.01, ``num_neighbors`` 9) runs in its own
virtual environment (``bench/anomalib_peer_run.py``) on the exact network inputs adcore's scorer
builds. Both score the test split; image and pixel AUROC come from ``adcore.metrics`` on each
library's raw scores and raw maps at the image size. anomalib is a peer here, never a dependency of
adcore: the venv (``--venv``, default ``.venv-anomalib``, git-ignored by ``/.venv-*/``) is made on the
first run from the configured package index, with CPU torch pinned.

Each library runs once per ``--seeds`` value (the coreset's random start, and anomalib's sparse random
projection, which draws through numpy's global RNG); the verdicts compare the means, printed with
their standard deviations: one draw of the coreset moves image AUROC by about as much as the two
libraries differ.

Timings: fit seconds are adcore's whole ``train`` (features, coreset, calibration on valid/) and
anomalib's feature pass plus coreset; images/s is test scoring on images already decoded, on
``--threads`` CPU threads for both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from adcore import metrics
from adcore.scorer import prepare, upsample_maps
from adcore.training import TrainConfig, train
from adcore.training.loop import load_split

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "bench" / "anomalib_peer_run.py"
PRESET = "patchcore"  # MobileNetV2
INPUT_SIZE = 224  # the preset's image_size; anomalib gets the same prepared inputs
RATIO = 0.01
MAX_BANK = 10**7  # no cap: the bank is the 1 % coreset itself, as in anomalib
PINS = ("torch==2.13.0",)  # CPU torch; anomalib's own requirements must not replace it
ANOMALIB = "anomalib==2.7.0"
VARIANTS = {  # row name -> model config overrides
    "adcore PatchCore (paper steps on)": {},
    "adcore PatchCore (both off)": {"map_sigma_px": 0, "reweight_k": 0},
    "adcore PatchCore (inside-only average)": {"pool_zero_padding": False},  # older artifacts' border rule
}
PEER_ROW = "anomalib 2.7.0 PatchCore"


def ensure_venv(venv: Path) -> float | None:
    """Makes ``venv`` with anomalib when it lacks it; returns the install seconds (None: already there)."""
    python = venv / "bin" / "python"
    # Version metadata only: importing anomalib needs the torchvision care of the helper.
    probe = "import importlib.metadata as m; print(m.version('anomalib'), m.version('timm'))"
    if python.exists() and subprocess.run([python, "-c", probe], capture_output=True, text=True).stdout.startswith(
        ANOMALIB.split("==")[1] + " "
    ):
        return None
    t0 = time.monotonic()
    print(f"making {venv} ({ANOMALIB}, {', '.join(PINS)}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, *PINS], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(PINS) + "\n")
    try:
        subprocess.run([*pip, ANOMALIB, "-c", f.name], check=True)
    finally:
        os.unlink(f.name)
    return round(time.monotonic() - t0, 1)


def demo_folders(out: Path) -> list[Path]:
    """The demo modalities, generated with seed 0 (the chest one only where adcore has it)."""
    from adcore.data.demo import make_demo_dataset

    folders = [make_demo_dataset(out / "demo-brain", seed=0)]
    try:
        from adcore.data.demo_chest import make_chest_dataset
    except ImportError:
        return folders
    return [*folders, make_chest_dataset(out / "demo-chest", seed=0)]


def scored(labels, masks, scores, maps) -> dict:
    """Image and pixel AUROC on raw scores and raw maps (each [H, W] at its image's size)."""
    return {"image_auroc": metrics.image_auroc(labels, scores), "pixel_auroc": metrics.pixel_auroc(masks, maps)}


def adcore_rows(data: Path, test: dict, out: Path, args, seed: int) -> list[dict]:
    rows = []
    for name, extra in VARIANTS.items():
        overrides = {"coreset_ratio": RATIO, "max_bank": MAX_BANK, **extra}
        cfg = TrainConfig(preset=PRESET, seed=seed, overrides=overrides)
        t0 = time.monotonic()
        folder = name.split("(")[1].rstrip(")").replace(" ", "-") + f"-seed{seed}"
        scorer = train(str(data), cfg, output=str(out / folder))
        fit_s = time.monotonic() - t0
        t0 = time.monotonic()
        results = scorer.score_images(test["images"], args.batch_size)
        predict_s = time.monotonic() - t0
        row = scored(test["labels"], test["masks"], np.array([r.raw_score for r in results]),
                     [r.raw_map for r in results])  # fmt: skip
        bank = len(scorer.head.bank)
        rows.append({"name": name, **row, "fit_s": fit_s, "images_s": len(results) / predict_s, "bank": bank})
    return rows


def peer_inputs(data: Path, test: dict, out: Path) -> Path:
    """The exact network inputs adcore's scorer builds, written once per folder for the anomalib helper."""
    train_set = load_split(str(data), "train", None)
    inputs = out / "anomalib-inputs.npz"
    np.savez(inputs, train=np.stack([prepare(im, INPUT_SIZE) for im in train_set["images"]]),
             test=np.stack([prepare(im, INPUT_SIZE) for im in test["images"]]))  # fmt: skip
    return inputs


def peer_row(inputs: Path, test: dict, out: Path, args, seed: int) -> dict:
    from adcore.backbones.mobilenet_v2 import mobilenet_v2_weights_path

    result = out / f"anomalib-seed{seed}.npz"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    cmd = [str(Path(args.venv) / "bin" / "python"), str(HELPER), "--inputs", str(inputs), "--out", str(result),
           "--weights", str(mobilenet_v2_weights_path()), "--ratio", str(RATIO), "--batch-size",
           str(args.batch_size), "--threads", str(args.threads), "--seed", str(seed),
           "--adcore-mnv2", str(ROOT / "adcore" / "backbones" / "mobilenet_v2.py")]  # fmt: skip
    subprocess.run(cmd, check=True, env=env, cwd=out, stdout=subprocess.DEVNULL)
    report = json.loads(result.with_suffix(".json").read_text())
    res = np.load(result)
    maps = [upsample_maps(m[None], im.shape[:2])[0] for m, im in zip(res["maps"], test["images"])]
    row = scored(test["labels"], test["masks"], res["scores"], maps)
    images_s = len(maps) / report["predict_s"]
    return {"name": PEER_ROW, **row, "fit_s": report["fit_s"], "images_s": images_s, "bank": report["bank"],
            "feature_max_abs_diff": report.get("feature_max_abs_diff"), "n_patches": report["n_patches"]}  # fmt: skip


def table(rows: list[dict]) -> str:
    cols = ("image_auroc", "pixel_auroc", "fit_s", "images_s", "bank")
    width = max(len(r["name"]) for r in rows)
    lines = [f"{'':{width}}  " + "  ".join(f"{c:>11}" for c in cols)]
    for r in rows:
        cells = [f"{r[c]:11.4f}" if c.endswith("auroc") else f"{r[c]:11.1f}" if c != "bank" else f"{r[c]:11d}"
                 for c in cols]  # fmt: skip
        lines.append(f"{r['name']:{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def mean_rows(per_seed: list[list[dict]]) -> list[dict]:
    """Each row's mean over the seeds, its image and pixel AUROC with the standard deviation."""
    out = []
    for rows in zip(*per_seed):
        row = {"name": f"{rows[0]['name']} (mean of {len(rows)})"}
        for key in ("image_auroc", "pixel_auroc", "fit_s", "images_s"):
            row[key] = float(np.mean([r[key] for r in rows]))
        for key in ("image_auroc", "pixel_auroc"):
            row[key + "_sd"] = float(np.std([r[key] for r in rows]))
        row["bank"] = rows[0]["bank"]
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=None, help="BMAD folders (default: the demo modalities)")
    p.add_argument("--out", default="out/bench-anomalib")
    p.add_argument("--venv", default=str(ROOT / ".venv-anomalib"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seeds", default="0,1,2", help="coreset seeds, both libraries (comma-separated)")
    args = p.parse_args(argv)
    seeds = [int(v) for v in args.seeds.split(",")]
    torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        pass
    install_s = ensure_venv(Path(args.venv))
    print(f"anomalib venv: {args.venv}" + (f" (made in {install_s} s)" if install_s else " (present)"), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folders = [Path(d) for d in args.data] if args.data else demo_folders(out)
    tables = {}
    for data in folders:
        work = out / f"work-{data.name}"  # never inside the data folder
        work.mkdir(parents=True, exist_ok=True)
        test = load_split(str(data), "test", None)
        inputs, per_seed = peer_inputs(data, test, work), []
        for seed in seeds:
            rows = [*adcore_rows(data, test, work, args, seed), peer_row(inputs, test, work, args, seed)]
            per_seed.append(rows)
            peer = rows[-1]
            print(f"\n{data}, seed {seed} (test split: {len(test['labels'])} images, {int(test['labels'].sum())} "
                  f"anomalous; bank 1 % of {peer['n_patches']} patches; backbone features max |diff| "
                  f"{peer['feature_max_abs_diff']:.2e})")  # fmt: skip
            print(table(rows), flush=True)
        inputs.unlink()
        means = mean_rows(per_seed)
        tables[str(data)] = {"seeds": seeds, "per_seed": per_seed, "mean": means}
        print(f"\n{data}: mean over seeds {seeds} (standard deviations of image / pixel AUROC below)")
        print(table(means))
        for r in means:
            print(f"  {r['name']}: sd {r['image_auroc_sd']:.4f} / {r['pixel_auroc_sd']:.4f}")
        ours, peer = means[0], means[-1]
        for key in ("image_auroc", "pixel_auroc"):
            verdict = "PASS" if ours[key] >= peer[key] else "MISS"
            print(f"{verdict}  adcore (paper steps on) mean {key} {ours[key]:.4f} >= anomalib {peer[key]:.4f}")
    (out / "anomalib_peer.json").write_text(json.dumps({"install_s": install_s, "tables": tables}, indent=1))


if __name__ == "__main__":
    main()
