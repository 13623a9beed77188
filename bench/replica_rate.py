"""images/s of one GPU: the network alone and the whole model replica, fp32 and under bf16 autocast.

    python bench/replica_rate.py ARTIFACT DEMO_DATA [--batch 64] [--seconds 5]

(``bench/gpu_check.sh`` runs it.) The network alone gets its inputs already on the device as float32
``[B, 3, S, S]``; the whole replica is ``jobs.scoring.stages.ScoreStage`` on the decoder's uint8 grey
planes in host memory (pinned copy, conversion and channel broadcast on the device, network, FAISS
head, results back). Their ratio is what the replica's own work costs the GPU. Each precision also
gets its image AUROC on the demo test split: a family may declare ``autocast`` once that is within
0.005 of fp32's.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import torch

from adcore.data import bmad
from adcore.metrics import image_auroc
from adcore.scorer import prepare_plane, to_uint8
from jobs.scoring.stages import ScoreStage


def _rows(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """A decoder batch of ok rows around ``pixels``."""
    n = len(pixels)
    text = ("image_key", "content_sha256", "modality", "study_key", "file_version", "error")
    return {
        "image_uri": np.array([f"x{i}" for i in range(n)], dtype=object),
        "status": np.array(["ok"] * n, dtype=object),
        **{c: np.array([None] * n, dtype=object) for c in text},
        **{c: np.zeros(n, np.int64) for c in ("frame", "height", "width", "file_size")},
        "pixels": pixels,
    }


def _rate(fn, n: int, seconds: float) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    t, k = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        fn()
        k += 1
    sync()
    return k * n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("data")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    stage = ScoreStage(args.artifact, engine="torch", autocast=False)
    scorer = stage.scorer
    device = next(scorer.model.parameters()).device
    samples = bmad.list_split(args.data, "test")
    frames = np.stack([to_uint8(prepare_plane(bmad.load_sample(s)[0], scorer.input_size)) for s in samples])
    pixels = frames[np.arange(args.batch) % len(frames)]  # [B, 1 or 3, S, S] uint8, as the decoder ships them
    x = torch.from_numpy(np.broadcast_to(pixels, (len(pixels), 3, *pixels.shape[2:])).copy()).to(device)
    x = x.float() / 255
    parts = []
    for cast in (None, "bfloat16"):
        if cast and device.type != "cuda":
            continue  # autocast is a CUDA path
        scorer.network.autocast = cast

        def network(cast=cast):
            ctx = torch.autocast(device.type, dtype=getattr(torch, cast)) if cast else contextlib.nullcontext()
            with torch.inference_mode(), ctx:
                scorer.model(x)

        auroc = image_auroc([s.label for s in samples], stage(_rows(frames))["raw_score"])
        rows = _rows(pixels)
        parts.append(
            f"{cast or 'fp32'}: network {_rate(network, len(x), args.seconds):.0f} images/s, "
            f"replica {_rate(lambda rows=rows: stage(rows), len(x), args.seconds):.0f} images/s, "
            f"image AUROC {auroc:.4f}"
        )
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name}, batch {args.batch}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
