"""Seeded anomaly synthesis for training when the training set has no anomalies.

Every transform is a callable ``t(image, foreground=None) -> (image_aug, mask)``: ``image`` is
float in [0, 1] (HxW or HxWx3), ``foreground`` an optional bool HxW restricting where the
anomaly may appear (for brain MRI: inside the head), ``mask`` a bool HxW of changed pixels.
Outside ``mask`` the image is left exactly as it was (except RandLesion's optional mass effect).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from adcore.data.imageops import resize, to_gray

_MAX_TRIES = 8  # redraws before giving up on a non-empty mask (e.g. a tiny foreground)


def perlin_2d(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Gradient (Perlin) noise on an HxW grid with `res` lattice cells per axis; about [-0.7, 0.7]."""
    h, w = shape
    ry, rx = res
    angles = (2 * np.pi * rng.random((ry + 1, rx + 1))).astype(np.float32)
    gy, gx = np.cos(angles), np.sin(angles)  # unit gradients on the [ry+1, rx+1] lattice
    y = ((np.arange(h) + 0.5) * ry / h).astype(np.float32)
    x = ((np.arange(w) + 0.5) * rx / w).astype(np.float32)
    iy, ix = y.astype(np.int64), x.astype(np.int64)
    fy, fx = (y - np.floor(y))[:, None], (x - np.floor(x))[None, :]  # [H, 1], [1, W]

    def dot(oy, ox):  # gradient of corner (oy, ox) dotted with the offset to it
        sel = np.ix_(iy + oy, ix + ox)
        return gy[sel] * (fy - oy) + gx[sel] * (fx - ox)  # [H, W]

    ty, tx = [6 * t**5 - 15 * t**4 + 10 * t**3 for t in (fy, fx)]  # Perlin's fade curve
    n0 = dot(0, 0) * (1 - ty) + dot(1, 0) * ty
    n1 = dot(0, 1) * (1 - ty) + dot(1, 1) * ty
    return np.float32(np.sqrt(2)) * (n0 * (1 - tx) + n1 * tx)


def fractal_perlin(shape, res, rng, octaves: int = 3, persistence: float = 0.5) -> np.ndarray:
    """Sum of Perlin octaves, each at twice the frequency and `persistence` times the amplitude."""
    out = np.zeros(shape, dtype=np.float32)
    amp = 1.0
    for o in range(octaves):
        out += amp * perlin_2d(shape, (res[0] * 2**o, res[1] * 2**o), rng)
        amp *= persistence
    return out


def _foreground(image: np.ndarray, foreground) -> np.ndarray:
    if foreground is None:
        return np.ones(image.shape[:2], dtype=bool)
    fg = np.asarray(foreground, dtype=bool)
    if fg.shape != image.shape[:2]:
        raise ValueError(f"foreground shape {fg.shape} does not match image {image.shape[:2]}")
    return fg


def _blend(image: np.ndarray, texture: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """image*(1-alpha) + texture*alpha, alpha HxW broadcast over channels."""
    a = alpha[..., None] if image.ndim == 3 else alpha
    return (image * (1 - a) + texture * a).astype(np.float32)


class RandPerlinAnomaly:
    """DRAEM-style anomaly: a thresholded Perlin mask filled with a foreign texture.

    Args:
        rng: Seeded generator; the only source of randomness.
        scale_exp: Lattice cells per axis are 2**k, k uniform in [lo, hi) (DRAEM: 0..6).
        threshold: Perlin level above which a pixel is anomalous (DRAEM: 0.5).
        opacity: Texture opacity range (DRAEM's 1 - beta, beta in [0, 0.8]).
        texture_source: Optional images to take textures from (a random flipped/rotated one is
            resized over the image); procedural Perlin textures are used when None.
    """

    def __init__(
        self,
        rng: np.random.Generator,
        *,
        scale_exp=(0, 6),
        threshold: float = 0.5,
        opacity=(0.2, 1.0),
        texture_source=None,
    ):
        self.rng = rng
        self.scale_exp = scale_exp
        self.threshold = threshold
        self.opacity = opacity
        self.texture_source = list(texture_source) if texture_source is not None else None

    def _texture(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        if self.texture_source:
            src = np.asarray(self.texture_source[self.rng.integers(len(self.texture_source))], np.float32)
            src = np.rot90(src, k=int(self.rng.integers(4)))
            if self.rng.random() < 0.5:
                src = src[:, ::-1]
            tex = resize(np.ascontiguousarray(src), (h, w))
            if image.ndim == 2:
                return to_gray(tex)
            return tex if tex.ndim == 3 else np.repeat(tex[..., None], 3, axis=-1)
        n_ch = 3 if image.ndim == 3 else 1
        chans = []
        for _ in range(n_ch):
            res = tuple(int(2 ** self.rng.integers(1, 5)) for _ in range(2))  # 2..16 cells: visible grain
            t = fractal_perlin((h, w), res, self.rng, octaves=3)
            t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
            lo = self.rng.uniform(0.0, 0.5)  # random brightness and contrast of the texture
            chans.append(lo + t * self.rng.uniform(0.3, 1.0 - lo))
        return chans[0] if n_ch == 1 else np.stack(chans, axis=-1)

    def __call__(self, image: np.ndarray, foreground=None):
        image = np.asarray(image, dtype=np.float32)
        fg = _foreground(image, foreground)
        h, w = image.shape[:2]
        mask = np.zeros((h, w), dtype=bool)
        for _ in range(_MAX_TRIES):
            res = tuple(int(2 ** self.rng.integers(*self.scale_exp)) for _ in range(2))
            mask = (perlin_2d((h, w), res, self.rng) > self.threshold) & fg
            if mask.any():
                break
        if not mask.any():
            return image.copy(), mask
        alpha = mask * np.float32(self.rng.uniform(*self.opacity))
        return _blend(image, self._texture(image), alpha), mask


class RandCutPaste:
    """CutPaste: copy a rectangle, jitter its intensity, paste it elsewhere.

    Args:
        rng: Seeded generator.
        area: Patch area as a fraction of the image (CutPaste: 0.02-0.15).
        aspect: Patch aspect ratio range (CutPaste: 0.3-3.3).
        jitter: Max brightness shift and contrast change of the patch.
    """

    def __init__(self, rng: np.random.Generator, *, area=(0.02, 0.15), aspect=(0.3, 3.3), jitter: float = 0.1):
        self.rng = rng
        self.area = area
        self.aspect = aspect
        self.jitter = jitter

    def _center(self, fg: np.ndarray) -> tuple[int, int]:
        ys, xs = np.nonzero(fg)
        i = int(self.rng.integers(len(ys)))
        return int(ys[i]), int(xs[i])

    def __call__(self, image: np.ndarray, foreground=None):
        image = np.asarray(image, dtype=np.float32)
        fg = _foreground(image, foreground)
        h, w = image.shape[:2]
        mask = np.zeros((h, w), dtype=bool)
        if not fg.any():
            return image.copy(), mask
        area = self.rng.uniform(*self.area) * h * w
        ratio = np.exp(self.rng.uniform(*np.log(self.aspect)))
        ph = int(np.clip(round(np.sqrt(area * ratio)), 2, h // 2))
        pw = int(np.clip(round(np.sqrt(area / ratio)), 2, w // 2))
        (sy, sx), (ty, tx) = self._center(fg), self._center(fg)
        sy, sx = np.clip(sy - ph // 2, 0, h - ph), np.clip(sx - pw // 2, 0, w - pw)
        ty, tx = np.clip(ty - ph // 2, 0, h - ph), np.clip(tx - pw // 2, 0, w - pw)
        patch = image[sy : sy + ph, sx : sx + pw].copy()
        if self.rng.random() < 0.5:
            patch = patch[:, ::-1]
        contrast = 1 + self.rng.uniform(-self.jitter, self.jitter)
        shift = self.rng.uniform(-self.jitter, self.jitter)
        patch = np.clip((patch - patch.mean()) * contrast + patch.mean() + shift, 0, 1)
        mask[ty : ty + ph, tx : tx + pw] = fg[ty : ty + ph, tx : tx + pw]
        out = image.copy()
        region = mask[ty : ty + ph, tx : tx + pw]
        out[ty : ty + ph, tx : tx + pw][region] = patch[region]
        mask &= np.any(out != image, axis=-1) if image.ndim == 3 else out != image
        return out, mask


@dataclass
class LesionConfig:
    """Ranges of the synthetic brain lesion (values sampled uniformly in each range)."""

    area_frac: tuple = (0.03, 0.25)  # lesion area / foreground area (the demo's brief)
    hypo_p: float = 0.6  # most brain lesions are T1-hypointense
    hypo_factor: tuple = (0.45, 0.8)  # lesion level / surrounding tissue level
    hyper_factor: tuple = (1.2, 1.6)
    ring_p: float = 0.3  # necrotic core + brighter rim (glioblastoma-like)
    texture_amp: tuple = (0.04, 0.12)  # internal heterogeneity, relative
    edge_frac: tuple = (0.1, 0.35)  # soft edge width / lesion radius
    irregularity: tuple = (0.2, 0.6)  # noise weight against the radial profile
    mass_effect_p: float = 0.0  # displace surrounding tissue (changes pixels outside the mask)
    mass_effect: tuple = (0.15, 0.4)  # peak displacement / radius; < 0.5 keeps the warp invertible
    n_foci: tuple = (1, 1)  # separate blobs (inclusive range); > 1: scattered foci of area_frac each


def _smooth_noise(shape, sigma: float, rng: np.random.Generator) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return n / max(float(n.std()), 1e-6)


def lesion_mask(
    rng: np.random.Generator, foreground: np.ndarray, area_frac, irregularity=LesionConfig.irregularity
) -> tuple[np.ndarray, tuple, float]:
    """Irregular blob inside `foreground`; returns (mask, (cy, cx), radius)."""
    fg = np.asarray(foreground, dtype=bool)
    target = rng.uniform(*area_frac) * fg.sum()
    radius = max(float(np.sqrt(target / np.pi)), 2.0)
    depth = ndimage.distance_transform_edt(fg)
    inside = depth >= min(0.6 * radius, depth.max())  # keep most of the blob inside
    ys, xs = np.nonzero(inside)
    i = int(rng.integers(len(ys)))
    cy, cx = int(ys[i]), int(xs[i])
    yy, xx = np.ogrid[: fg.shape[0], : fg.shape[1]]
    dist = np.hypot(yy - cy, xx - cx) / radius
    noise = _smooth_noise(fg.shape, radius / 3, rng) + 0.4 * _smooth_noise(fg.shape, radius / 8, rng)
    field = -dist + rng.uniform(*irregularity) * noise  # lobulated, not round
    vals = field[fg]
    k = int(min(max(target, 1), vals.size))
    thr = np.partition(vals, vals.size - k)[vals.size - k]
    mask = (field >= thr) & fg
    labels, _ = ndimage.label(mask)
    keep = labels[cy, cx] if labels[cy, cx] else np.bincount(labels.ravel())[1:].argmax() + 1
    mask = ndimage.binary_fill_holes(labels == keep) & fg
    return mask, (cy, cx), radius


def foci_mask(rng: np.random.Generator, foreground: np.ndarray, cfg: LesionConfig) -> tuple[np.ndarray, tuple, float]:
    """Several small blobs (``cfg.n_foci``, each of ``cfg.area_frac``); returns (mask, first centre, mean radius)."""
    n = int(rng.integers(cfg.n_foci[0], cfg.n_foci[1] + 1))
    parts = [lesion_mask(rng, foreground, cfg.area_frac, cfg.irregularity) for _ in range(n)]
    mask = np.logical_or.reduce([m for m, _, _ in parts])
    return mask, parts[0][1], float(np.mean([r for _, _, r in parts]))


def mass_effect(image: np.ndarray, fg: np.ndarray, center, radius: float, strength: float):
    """Pushes tissue away from `center` (backward warp); returns warped image and foreground."""
    h, w = fg.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - center[0], xx - center[1]
    d = np.hypot(dy, dx) + 1e-6
    # displacement grows from 0 at the centre, peaks near 1.4 r, fades away; tapers at the brain edge
    mag = strength * d * np.exp(-((d / (2 * radius)) ** 2))
    mag *= ndimage.gaussian_filter(fg.astype(np.float32), radius / 2)
    coords = [yy - mag * dy / d, xx - mag * dx / d]
    warp = lambda a: ndimage.map_coordinates(a, coords, order=1, mode="nearest")  # noqa: E731
    out = np.stack([warp(image[..., c]) for c in range(3)], -1) if image.ndim == 3 else warp(image)
    return out.astype(np.float32), warp(fg.astype(np.float32)) > 0.5


def paint_lesion(
    rng: np.random.Generator,
    image: np.ndarray,
    mask: np.ndarray,
    radius: float,
    cfg: LesionConfig = LesionConfig(),  # noqa: B008 (read-only)
) -> np.ndarray:
    """Fills `mask` with a textured hypo/hyper-intense lesion whose edge ramps in softly."""
    gray = to_gray(image)
    base = float(gray[mask].mean()) if mask.any() else 0.5
    factor = rng.uniform(*(cfg.hypo_factor if rng.random() < cfg.hypo_p else cfg.hyper_factor))
    grain = _smooth_noise(mask.shape, max(radius / 5, 1.0), rng) + 0.5 * _smooth_noise(mask.shape, 1.5, rng)
    tex = 1 + rng.uniform(*cfg.texture_amp) * grain
    depth = ndimage.distance_transform_edt(mask)
    if rng.random() < cfg.ring_p:  # dark necrotic core inside a brighter rim, soft transition
        rim = radius * rng.uniform(0.2, 0.4)
        core = ndimage.gaussian_filter(np.clip((depth - rim) / (0.5 * rim), 0, 1), rim / 3)
        factor = rng.uniform(*cfg.hyper_factor) * (1 - core) + rng.uniform(0.3, 0.5) * core
    value = np.clip(base * factor * tex, 0.0, 1.0).astype(np.float32)
    edge = max(radius * rng.uniform(*cfg.edge_frac), 1.0)
    # ramp in from the border, smoothed so the ramp has no creases; 0 outside: pixels untouched
    alpha = (ndimage.gaussian_filter(np.clip(depth / edge, 0.0, 1.0), edge / 2) * mask).astype(np.float32)
    return _blend(image, value[..., None] if image.ndim == 3 else value, alpha)


class RandLesion:
    """Synthetic brain lesion: irregular textured mass, optional mass effect (see LesionConfig)."""

    def __init__(self, rng: np.random.Generator, cfg: LesionConfig = LesionConfig()):  # noqa: B008 (read-only)
        self.rng = rng
        self.cfg = cfg

    def __call__(self, image: np.ndarray, foreground=None):
        image = np.asarray(image, dtype=np.float32)
        if foreground is None:  # the head: everything brighter than near-black background
            gray = to_gray(image)
            foreground = ndimage.binary_fill_holes(gray > 0.05 * max(float(gray.max()), 1e-6))
            if foreground.mean() < 0.01:  # no clear background: allow the whole image
                foreground = np.ones_like(foreground)
        fg = _foreground(image, foreground)
        if not fg.any():
            return image.copy(), np.zeros(fg.shape, dtype=bool)
        mask, center, radius = lesion_mask(self.rng, fg, self.cfg.area_frac, self.cfg.irregularity)
        if self.rng.random() < self.cfg.mass_effect_p:
            image, _ = mass_effect(image, fg, center, radius, self.rng.uniform(*self.cfg.mass_effect))
        return paint_lesion(self.rng, image, mask, radius, self.cfg), mask


class RandCutMix:
    """DRA's CutMix pseudo anomaly: a colour-jittered rectangle copied to another place.

    As in DRA's official ``CutMix``: area a fraction of the image, aspect ratio log-uniform in
    [aspect, 1/aspect], source and target anywhere in the image (not restricted to the foreground),
    brightness/contrast/saturation jitter of the patch (hue is not jittered: medical images are grey).
    The official class defines a +-45 degree rotation but never applies it; ``rotation`` (degrees)
    defaults to that behaviour (0: none).

    Args:
        rng: Seeded generator.
        area: Patch area as a fraction of the image (official: 0.02-0.15).
        aspect: Smallest aspect ratio (official: 0.3).
        jitter: Colour jitter strength (official: 0.1).
        rotation: Max rotation of the patch in degrees.
    """

    def __init__(
        self,
        rng: np.random.Generator,
        *,
        area=(0.02, 0.15),
        aspect: float = 0.3,
        jitter: float = 0.1,
        rotation: float = 0.0,
    ):
        self.rng, self.area, self.aspect, self.jitter, self.rotation = rng, area, aspect, jitter, rotation

    def __call__(self, image: np.ndarray, foreground=None):
        del foreground  # CutMix places patches anywhere, as the official code does
        image = np.asarray(image, dtype=np.float32)
        h, w = image.shape[:2]
        area = self.rng.uniform(*self.area) * h * w
        ratio = np.exp(self.rng.uniform(np.log(self.aspect), -np.log(self.aspect)))
        cw = int(np.clip(round(np.sqrt(area * ratio)), 1, w - 1))
        ch = int(np.clip(round(np.sqrt(area / ratio)), 1, h - 1))
        sy, sx = int(self.rng.integers(0, h - ch + 1)), int(self.rng.integers(0, w - cw + 1))
        ty, tx = int(self.rng.integers(0, h - ch + 1)), int(self.rng.integers(0, w - cw + 1))
        patch = image[sy : sy + ch, sx : sx + cw].copy()
        j = self.jitter
        patch = patch * self.rng.uniform(1 - j, 1 + j)  # brightness
        patch = (patch - patch.mean()) * self.rng.uniform(1 - j, 1 + j) + patch.mean()  # contrast
        if patch.ndim == 3:  # saturation: towards or away from the patch's grey
            gray = patch.mean(-1, keepdims=True)
            patch = (patch - gray) * self.rng.uniform(1 - j, 1 + j) + gray
        if self.rotation:
            angle = self.rng.uniform(-self.rotation, self.rotation)
            patch = ndimage.rotate(patch, angle, axes=(1, 0), reshape=False, order=1, mode="nearest")
        out = image.copy()
        out[ty : ty + ch, tx : tx + cw] = np.clip(patch, 0, 1)
        changed = out != image
        mask = changed.any(-1) if image.ndim == 3 else changed
        return out, mask


# Lesion kinds of the demo's seen/unseen protocols (DRA, papers.md section 4): each a LesionConfig.
LESION_KINDS = {
    # compact, brighter than tissue, textured, sometimes with a necrotic core
    "hyperintense_mass": LesionConfig(
        area_frac=(0.03, 0.15), hypo_p=0.0, hyper_factor=(1.3, 1.7), ring_p=0.3, mass_effect_p=0.5
    ),
    # round, dark, homogeneous, sharp-edged
    "hypointense_cyst": LesionConfig(
        area_frac=(0.02, 0.10),
        hypo_p=1.0,
        hypo_factor=(0.15, 0.4),
        ring_p=0.0,
        texture_amp=(0.0, 0.03),
        edge_frac=(0.05, 0.12),
        irregularity=(0.05, 0.15),
    ),
    # large, ill-defined, mild change of signal with very soft edges
    "diffuse_region": LesionConfig(
        area_frac=(0.10, 0.25),
        hypo_p=0.5,
        hypo_factor=(0.6, 0.8),
        hyper_factor=(1.2, 1.4),
        ring_p=0.0,
        edge_frac=(0.4, 0.7),
        irregularity=(0.5, 0.9),
    ),
    # several small, very bright, sharp punctate foci (calcification-like), no mass effect
    "calcified_foci": LesionConfig(
        area_frac=(0.001, 0.003),
        hypo_p=0.0,
        hyper_factor=(1.8, 2.4),
        ring_p=0.0,
        texture_amp=(0.0, 0.03),
        edge_frac=(0.05, 0.15),
        irregularity=(0.05, 0.2),
        n_foci=(4, 8),
    ),
}
