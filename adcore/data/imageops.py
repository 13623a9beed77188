"""Small image helpers on float images in [0, 1] (HxW or HxWx3) and bool masks."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

# ITU-R BT.601 luma weights, the ones PIL's "L" conversion uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def to_gray(x: np.ndarray) -> np.ndarray:
    """HxW or HxWx3 float -> HxW float32."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 2:
        return x
    if x.ndim == 3 and x.shape[-1] == 3:
        return x @ _LUMA
    if x.ndim == 3 and x.shape[-1] == 1:
        return x[..., 0]
    raise ValueError(f"expected HxW or HxWx3 image, got shape {x.shape}")


def to_rgb(x: np.ndarray) -> np.ndarray:
    """HxW or HxWx3 float -> HxWx3 float32."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3 and x.shape[-1] == 3:
        return x
    return np.repeat(to_gray(x)[..., None], 3, axis=-1)


def resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float image to (h, w); channels are kept."""
    h, w = size
    x = np.asarray(x, dtype=np.float32)
    if x.shape[:2] == (h, w):
        return x.copy()
    if x.ndim == 2:
        return np.asarray(Image.fromarray(x).resize((w, h), Image.BILINEAR), dtype=np.float32)
    return np.stack([resize(x[..., c], size) for c in range(x.shape[-1])], axis=-1)


def resize_mask(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a mask to (h, w); returns bool."""
    h, w = size
    m = np.asarray(m).astype(bool)
    rows = np.minimum((np.arange(h) + 0.5) * m.shape[0] / h, m.shape[0] - 1).astype(np.int64)
    cols = np.minimum((np.arange(w) + 0.5) * m.shape[1] / w, m.shape[1] - 1).astype(np.int64)
    return m[rows[:, None], cols[None, :]]


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Float in [0, 1] -> uint8 with rounding (values outside are clipped)."""
    return np.round(np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def _as_pil(x: np.ndarray) -> Image.Image:
    x = np.asarray(x)
    if x.dtype == np.bool_:
        return Image.fromarray(x.astype(np.uint8) * 255)
    if x.dtype == np.uint8:
        return Image.fromarray(x)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim not in (2, 3):
        raise ValueError(f"expected HxW or HxWx3 array, got shape {x.shape}")
    return Image.fromarray(to_uint8(x))


def encode_png(x: np.ndarray) -> bytes:
    """PNG bytes of a bool mask (0/255), a uint8 image or a float image in [0, 1]."""
    buf = io.BytesIO()
    # compress_level 1: masks/heatmaps are written in bulk; speed matters more than size
    _as_pil(x).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def save_png(path, x: np.ndarray) -> None:
    """Writes a float image in [0, 1] as an 8-bit PNG (parents are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(np.asarray(x, dtype=np.float32)))


def save_mask_png(path, mask: np.ndarray) -> None:
    """Writes a mask as an 8-bit PNG with 0 and 255."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(np.asarray(mask).astype(bool)))
