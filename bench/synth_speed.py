"""Benchmark: time per call of each training-anomaly maker on a 224 px image (moved out of the tests).

    .venv/bin/python bench/synth_speed.py [--calls 20]

Prints milliseconds per call of every maker (DRAEM-style Perlin, Perlin with a texture source,
CutPaste, lesion, and the smooth intensity blobs of fusion-small) measured in one run, and each
one's ratio to the 20 ms target (a training image must cost far less to corrupt than to embed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from adcore.cli import parse_config
from adcore.data.synth import RandCutPaste, RandLesion, RandPerlinAnomaly
from adcore.data.synth_smooth import RandSmoothIntensity

SIZE = 224
TARGET_MS = 20.0


@dataclass
class SynthSpeedConfig:
    calls: int = 20  # timed calls per maker (after one warm-up call)


def head_image() -> tuple[np.ndarray, np.ndarray]:
    """A head-like foreground with some texture: what the makers draw on."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    fg = ((yy - 112) / 95) ** 2 + ((xx - 112) / 75) ** 2 < 1
    noise = 0.02 * np.random.default_rng(5).standard_normal((SIZE, SIZE))
    img = np.where(fg, 0.55 + 0.2 * np.sin(xx / 6.0) * np.cos(yy / 9.0) + noise, 0.0)
    return img.astype(np.float32), fg


def makers() -> dict:
    texture = [np.random.default_rng(9).random((50, 70, 3))]
    out = {
        "perlin": lambda rng: RandPerlinAnomaly(rng),
        "perlin_tex": lambda rng: RandPerlinAnomaly(rng, texture_source=texture),
        "cutpaste": lambda rng: RandCutPaste(rng),
        "lesion": lambda rng: RandLesion(rng),
    }
    out["smooth"] = lambda rng: RandSmoothIntensity(rng)
    return out


def main() -> None:
    args = parse_config(SynthSpeedConfig, None, __doc__.splitlines()[0])
    img, fg = head_image()
    print(f"{'maker':<12} {'ms/call':>8} {'/ target':>9}")
    for name, make in makers().items():
        t = make(np.random.default_rng(0))
        t(img, fg)
        start = time.perf_counter()
        for _ in range(args.calls):
            t(img, fg)
        ms = (time.perf_counter() - start) / args.calls * 1000
        print(f"{name:<12} {ms:8.2f} {ms / TARGET_MS:9.2f}", flush=True)


if __name__ == "__main__":
    main()
