"""Decode frames/s per CPU: the scoring decoder against the earlier decode path, side by side.

    python bench/decode.py [--repeat 3] [--size 224] [--copies 8] [--artifact MODEL]

Inputs are real files: pydicom-data DICOM (a chest radiograph of 7 MB, uncompressed and JPEG 2000;
MR of 2 MB, CT of 0.5 MB, a small JPEG 2000 and CT, a colour ultrasound), PNGs of the chest (16-bit
and 8-bit grey) and a colour fundus JPEG (scikit-image). Each is copied ``--copies`` times into a local folder and read
through the listing path (``Decoder`` with ``uri`` batches), one process, torch on one thread:

- **earlier**: files read one after the other, SHA-256 as a second pass over the bytes, each frame
  made float32 ``[H, W, 3]`` (``np.repeat``) before an antialiased resize, shipped ``[3, S, S]``;
- **now**: ``jobs.scoring.stages.Decoder`` (reads in a thread pool, SHA-256 while reading, the grey
  plane resized once, ``[1, S, S]`` shipped).

Also checks that both give the same pixels: the largest difference in grey levels (0-255) over
every frame (the network sees ``value / 255`` either way), and with ``--artifact`` the largest
difference of the raw scores of both paths' frames. Prints one line per input and a total.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import tempfile
import time

import numpy as np

DICOM_FILES = (
    "RG1_UNCI.dcm", "RG1_J2KR.dcm", "MR2_UNCI.dcm", "693_UNCI.dcm", "JPEG2000.dcm", "US1_UNCR.dcm", "CT_small.dcm",
)  # fmt: skip


def _inputs(folder: str, copies: int) -> dict[str, list[str]]:
    """name -> paths of its copies under ``folder``."""
    from PIL import Image
    from pydicom.data import get_testdata_file

    from adcore.data.decode import decode_image

    sources: dict[str, bytes] = {}
    for name in DICOM_FILES:
        path = get_testdata_file(name)
        if path:
            with open(path, "rb") as f:
                sources[name] = f.read()
    chest = decode_image(sources["RG1_UNCI.dcm"], "RG1_UNCI.dcm")[0].pixels
    for name, array in (
        ("chest16.png", (chest * 65535).astype(np.uint16)),
        ("chest8.png", (chest * 255).astype(np.uint8)),
    ):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        sources[name] = buf.getvalue()
    try:
        import skimage.data

        buf = io.BytesIO()
        Image.fromarray(skimage.data.retina()).save(buf, format="JPEG", quality=95)
        sources["retina.jpg"] = buf.getvalue()
    except ImportError:
        pass
    out = {}
    for name, data in sources.items():
        paths = []
        for i in range(copies):
            path = os.path.join(folder, f"{i:03d}-{name}")
            with open(path, "wb") as f:
                f.write(data)
            paths.append(path)
        out[name] = paths
    return out


def earlier_decode(paths: list[str], size: int) -> np.ndarray:
    """The earlier path: serial reads, a second pass for SHA-256, float32 frames repeated to 3 channels."""
    import torch
    import torch.nn.functional as F

    from adcore.data.decode import decode_image
    from adcore.scorer import to_uint8

    out = []
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        hashlib.sha256(data).hexdigest()
        for frame in decode_image(data, path, max_pixels=10**9, frame_errors=True):
            x = np.asarray(frame.pixels, dtype=np.float32)
            if x.shape == (size, size):
                px = np.broadcast_to(np.clip(x, 0, 1), (3, size, size))
            else:
                x = x[..., None] if x.ndim == 2 else x
                x = np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x[..., :3]
                t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
                t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
                px = t[0].clamp_(0, 1).numpy()
            out.append(to_uint8(px))
    return np.stack(out)


def decode_now(paths: list[str], size: int, folder: str) -> np.ndarray:
    from jobs.scoring.stages import Decoder

    n = len(paths)
    batch = {
        "uri": np.array(paths, dtype=object),
        "size": np.array([os.path.getsize(p) for p in paths], dtype=np.int64),
        "version": np.array([None] * n, dtype=object),
        "prior_sha": np.array([None] * n, dtype=object),
        "prior_done": np.array([None] * n, dtype=object),
    }
    out = Decoder(size, 10**9, input_root=folder)(batch)
    assert (out["status"] == "ok").all(), set(out["error"])
    return out["pixels"]


def _compare_scores(artifact: str, inputs: dict[str, list[str]], folder: str) -> None:
    """Raw scores of every input through both paths (one copy each): the largest difference."""
    from adcore.engine import load_scorer

    scorer = load_scorer(artifact, engine="torch", use_gpu=False)
    paths = [p[0] for p in inputs.values()]
    old = scorer.raw(earlier_decode(paths, scorer.input_size))[0]
    new = scorer.raw(decode_now(paths, scorer.input_size, folder))[0]
    print(f"raw scores of {len(old)} frames ({scorer.name}): max |earlier - now| {np.abs(old - new).max():.3g}")


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--artifact", default="", help="also score both paths' frames with this artifact")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)  # per CPU: a decode task holds one
    folder = tempfile.mkdtemp(prefix="adcore-decode-")
    try:
        inputs = _inputs(folder, args.copies)
        print(f"{'input':<16} {'MB':>6} {'frames':>6} {'earlier f/s':>11} {'now f/s':>8} {'x':>5} {'max diff':>8}")
        tot_old = tot_new = tot_frames = 0.0
        for name, paths in inputs.items():
            old = earlier_decode(paths, args.size)
            new = decode_now(paths, args.size, folder)
            diff = int(np.abs(np.broadcast_to(new, old.shape).astype(int) - old.astype(int)).max())
            t_old = _best(lambda p=paths: earlier_decode(p, args.size), args.repeat)
            t_new = _best(lambda p=paths: decode_now(p, args.size, folder), args.repeat)
            frames = len(old)
            tot_old, tot_new, tot_frames = tot_old + t_old, tot_new + t_new, tot_frames + frames
            mb = os.path.getsize(paths[0]) / 2**20
            print(
                f"{name:<16} {mb:6.2f} {frames:6d} {frames / t_old:11.1f} {frames / t_new:8.1f} "
                f"{t_old / t_new:5.2f} {diff:8d}"
            )
        print(f"{'all':<16} {'':>6} {int(tot_frames):6d} {tot_frames / tot_old:11.1f} {tot_frames / tot_new:8.1f} "
              f"{tot_old / tot_new:5.2f}")  # fmt: skip
        if args.artifact:
            _compare_scores(args.artifact, inputs, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
