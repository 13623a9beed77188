"""Streamed training input: the train split as a listing, decoded in parallel, synthesised per image.

The in-memory path (:func:`adcore.training.loop.load_split` + ``SyntheticAnomalyBatches``) decodes a
rank's whole shard into memory. For archive-sized training sets the job (``jobs/train.py``) instead
hands each rank a stream of decoded batches: the driver lists the train split (local folder or
``s3://`` prefix, :func:`train_listing`), cuts it into equal per-rank shards (:func:`shard_listing`),
and Ray Data decodes and resizes each shard in CPU tasks (:class:`DecodeTrain`). A rank holds only
the batches in flight.

Synthesis runs where the epoch is known, on the rank (:class:`StreamedBatches`): each image's
anomaly is drawn from its own generator seeded by ``(seed, epoch, image index)``, so a run is
reproducible whichever rank or task handles an image, and a resumed run sees the same images.

This module never imports Ray: the job passes the iteration as a callable.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa

from adcore import storage
from adcore.data import bmad
from adcore.data.decode import decode_image
from adcore.data.errors import DatasetLayoutError, DecodeError
from adcore.scorer import prepare, to_uint8
from adcore.training.data import Batch, MakerFactory, default_makers, resize_mask, stack_batch, synthesize
from adcore.training.frame_cache import FrameCache
from adcore.training.prefetch import prefetched
from adcore.training.skipped import SkippedImages, read_with_retries, reason_of

# Columns of a training listing: a stable image index (synthesis seed), the image, its mask ("" when
# none), and the label (0 normal, 1 labelled anomaly).
LISTING_SCHEMA = pa.schema(
    [("index", pa.int64()), ("uri", pa.string()), ("mask_uri", pa.string()), ("label", pa.int8())]
)
# What :func:`train_listing` adds: each file's version, "<size>:<ETag>" on S3, "<size>:<mtime ns>"
# locally ("" for no mask), so a changed file changes the frame cache's key (``frame_cache``).
VERSION_COLUMNS = ("version", "mask_version")


def train_listing(root: str, labelled: int = 0, seed: int = 0) -> pa.Table:
    """The train split of a BMAD folder or ``s3://`` prefix as a listing (:data:`LISTING_SCHEMA`
    and :data:`VERSION_COLUMNS`).

    The samples of ``adcore.data.bmad.list_split(root, "train", labelled=..., seed=...)``, in its
    order, without reading an image. An ``s3://`` prefix is listed once (paged LIST requests) and the
    reader runs on a local tree of empty files with the same names (and the dataset's
    ``categories.csv``), so local and S3 datasets follow exactly the same layout rules.
    """
    with split_samples(root, "train", labelled, seed) as (samples, local_root, base, versions):
        listing = _listing(samples, local_root, base)
        version = (lambda p: versions.get(p, "")) if versions is not None else _local_version
        for column, attr in zip(VERSION_COLUMNS, ("path", "mask_path")):
            values = [version(str(p)) if p else "" for p in (getattr(s, attr) for s in samples)]
            listing = listing.append_column(column, pa.array(values, pa.string()))
        return listing


def _local_version(path: str) -> str:
    """``"<size>:<mtime ns>"`` of a local file."""
    st = Path(path).stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def sampled_files(root: str, split: str, limit: int | None) -> list[str]:
    """The files ``load_split(root, split, limit)`` reads (images, then masks), relative to ``root``:
    what a node copies of a split it only samples (validation), found from the listing alone."""
    with split_samples(root, split) as (samples, local_root, _, _):
        chosen = pick_samples(samples, split, limit)
        paths = [s.path for s in chosen] + [s.mask_path for s in chosen if s.mask_path]
        return [Path(p).relative_to(local_root).as_posix() for p in paths]


@contextmanager
def split_samples(root: str, split: str, labelled: int = 0, seed: int = 0):
    """``(samples, local_root, root, versions)`` of a split: ``bmad.list_split`` on a local folder
    (``versions`` None), or on a local tree of empty files named as an ``s3://`` prefix's objects (no
    image read; ``versions``: ``"<size>:<ETag>"`` by the local name)."""
    base = str(root).rstrip("/")
    if not storage.is_s3(base):
        yield bmad.list_split(base, split, labelled=labelled, seed=seed), base, base, None
        return
    if not storage.exists(f"{base}/{split}"):
        raise DatasetLayoutError(f"{base}/{split}", f"a '{split}' folder under {root}")
    with tempfile.TemporaryDirectory(prefix="adcore-listing-") as shadow:
        versions = {}
        objects = storage.list_objects(f"{base}/{split}")
        for uri, size, version in zip(*(objects.column(c).to_pylist() for c in ("uri", "size", "version"))):
            rel = uri[len(base) + 1 :]
            if rel.startswith(f"{split}/") and not rel.endswith("/"):  # not a folder marker
                path = Path(shadow, rel)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
                versions[str(path)] = f"{size}:{version}"
        categories = f"{base}/{bmad.CATEGORIES_FILE}"
        if storage.exists(categories):
            Path(shadow, bmad.CATEGORIES_FILE).write_bytes(storage.read_bytes(categories))
        yield bmad.list_split(shadow, split, labelled=labelled, seed=seed), shadow, base, versions


def pick_samples(samples: list, split: str, limit: int | None, rank: int = 0, world_size: int = 1) -> list:
    """The samples of a split that one rank loads: at most ``limit`` normal-and-anomalous ones spread
    evenly over the listing, a train split padded to equal shards (as ``DistributedSampler`` pads)
    and strided by rank; labelled training anomalies (a handful) go to every rank, never dropped."""
    few = [s for s in samples if s.label == 1] if split == "train" else []
    samples = samples[: len(samples) - len(few)]
    if limit is not None and len(samples) > limit:
        step = len(samples) / limit  # even spread keeps both classes
        samples = [samples[int(i * step)] for i in range(limit)]
    if world_size > 1 and split == "train" and len(samples) % world_size:
        samples = samples + samples[: world_size - len(samples) % world_size]
    return samples[rank::world_size] + few


def _listing(samples: list[bmad.Sample], local_root: str, root: str) -> pa.Table:
    """Samples as listing rows, their paths under ``local_root`` named under ``root``."""

    def name(path) -> str:
        return root + str(path)[len(str(local_root)) :] if path else ""

    return pa.table(
        {
            "index": np.arange(len(samples)),
            "uri": [name(s.path) for s in samples],
            "mask_uri": [name(s.mask_path) for s in samples],
            "label": np.array([s.label for s in samples], np.int8),
        },
        schema=LISTING_SCHEMA,
    )


def shard_listing(listing: pa.Table, rank: int, world_size: int) -> pa.Table:
    """Rank ``rank``'s rows: an equal strided share of the normal images (a few repeated to make the
    shares equal, as ``DistributedSampler`` pads), plus every labelled anomaly (a handful)."""
    labels = listing.column("label").to_numpy()
    normal, few = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    if world_size > 1 and len(normal) % world_size:
        normal = np.concatenate([normal, normal[: world_size - len(normal) % world_size]])
    return listing.take(np.concatenate([normal[rank::world_size], few]))


class DecodeTrain:
    """Ray Data ``map_batches`` function: listing rows -> uint8 pixels ``[3, S, S]`` and masks ``[S, S]``.

    Reads each file once (local or S3, one filesystem per task; a failed read retried), decodes its
    first frame and resizes it to the network's input size, so only ``S*S*4`` bytes per image travel
    to the rank. A file that still cannot be read, or does not decode, keeps its row with an ``error``
    (its reason; empty pixels): the rank leaves it out and counts it (:class:`StreamedBatches`).
    With a ``cache`` (:class:`adcore.training.frame_cache.FrameCache`) a batch already decoded by an
    earlier pass or run is read from it instead, and a newly decoded one is written to it.
    """

    def __init__(self, size: int, cache: FrameCache | None = None):
        self.size, self.cache = size, cache
        self.reader = storage.Reader()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.cache.load(batch, self.reader) if self.cache is not None else None
        if out is None:
            out, read_failed = self._decode_batch(batch)
            if self.cache is not None and not read_failed:  # a failed read may pass: never kept
                self.cache.store(out, self.reader)
        out["error"] = np.asarray(out["error"], object)
        out["uri"] = np.asarray(batch["uri"], object)
        return out

    def _decode_batch(self, batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], bool]:
        pixels, masks, has_mask, errors, read_failed = [], [], [], [], False
        for uri, mask_uri in zip(batch["uri"], batch["mask_uri"]):
            has_mask.append(bool(mask_uri))
            try:
                image, mask = self._decode(str(uri), str(mask_uri) if mask_uri else "")
                errors.append("")
            except (OSError, DecodeError) as e:
                image = np.zeros((3, self.size, self.size), np.uint8)
                mask = np.zeros((self.size, self.size), bool)
                errors.append(reason_of(e))
                read_failed |= not isinstance(e, DecodeError)
            pixels.append(image)
            masks.append(mask)
        out = {
            "index": np.asarray(batch["index"], np.int64),
            "pixels": np.stack(pixels),  # [B, 3, S, S] uint8
            "mask": np.stack(masks),  # [B, S, S] bool
            "has_mask": np.asarray(has_mask, bool),  # False: no mask file (a labelled anomaly's is unknown)
            "label": np.asarray(batch["label"], np.int8),
            "error": np.asarray(errors, object),  # "" when decoded
        }
        return out, read_failed

    def _decode(self, uri: str, mask_uri: str) -> tuple[np.ndarray, np.ndarray]:
        image = decode_image(read_with_retries(self.reader.read, uri), uri)[0].pixels
        if not mask_uri:
            return to_uint8(prepare(image, self.size)), np.zeros((self.size, self.size), bool)
        mask = decode_image(read_with_retries(self.reader.read, mask_uri), mask_uri)[0].pixels
        mask = (mask > 0).any(axis=-1) if mask.ndim == 3 else mask > 0
        return to_uint8(prepare(image, self.size)), resize_mask(mask, self.size)


def image_level_only(listing: pa.Table) -> int:
    """Labelled anomalies of a listing without a mask: image-level supervision only."""
    labels = listing.column("label").to_numpy()
    no_mask = np.array([not m for m in listing.column("mask_uri").to_pylist()], bool)
    return int(((labels == 1) & no_mask).sum())


def decode_train(batch: dict[str, np.ndarray], size: int, cache: FrameCache | None = None) -> dict[str, np.ndarray]:
    """:class:`DecodeTrain` as a plain function (one reader per call: a Ray Data task's batch)."""
    return DecodeTrain(size, cache)(batch)


class StreamedBatches:
    """``SyntheticAnomalyBatches``' interface over a stream of decoded batches.

    Args:
        iterate: ``epoch -> iterable of DecodeTrain batches`` (the job: a Ray Data iterator over the
            rank's shard, shuffled with a seed of the epoch).
        n_images: rows in the rank's shard (equal on every rank).
        batch_size: images per batch the stream yields.
        anomaly_share: probability that a normal image gets a synthetic anomaly.
        seed: with the epoch and the image index, seeds each image's synthesis.
        image_level_only: labelled anomalies of the shard without a mask (:func:`image_level_only`).
        skipped: where the rows that could not be decoded are recorded (default: a new record).
        prefetch: batches read and synthesised ahead in a thread while the caller trains on the
            current one (0: none); the batches are the same either way.

    Rows with an ``error`` are left out; an epoch then ends early, and its last batch is repeated so
    that a pass still yields ``len(self)`` batches (every rank runs the same number of steps).
    """

    def __init__(
        self,
        iterate: Callable[[int], Iterable[dict]],
        n_images: int,
        batch_size: int,
        anomaly_share: float = 0.5,
        seed: int = 0,
        image_level_only: int = 0,
        skipped: SkippedImages | None = None,
        prefetch: int = 0,
    ):
        self.iterate, self.n_images, self.batch_size = iterate, n_images, batch_size
        self.prefetch = prefetch
        self.anomaly_share, self.seed = anomaly_share, seed
        self.image_level_only = image_level_only
        self.skipped = skipped if skipped is not None else SkippedImages(total=n_images)

    def __len__(self) -> int:
        return (self.n_images + self.batch_size - 1) // self.batch_size

    def epoch(
        self, epoch: int, anomaly_share: float | None = None, makers: MakerFactory | None = None
    ) -> Iterator[Batch]:
        """One pass over the stream; arguments as ``SyntheticAnomalyBatches.epoch``. Foreign
        textures come from the other images of the same batch."""
        return prefetched(self._epoch(epoch, anomaly_share, makers), self.prefetch)

    def _epoch(self, epoch: int, anomaly_share: float | None, makers: MakerFactory | None) -> Iterator[Batch]:
        share = self.anomaly_share if anomaly_share is None else anomaly_share
        factory = makers or default_makers
        yielded, last = 0, None
        for batch in self.iterate(epoch):
            batch = self._readable(batch)
            if not len(batch["index"]):
                continue
            images = [np.ascontiguousarray(p.transpose(1, 2, 0), np.float32) / 255.0 for p in batch["pixels"]]
            items = []
            known = batch.get("has_mask", np.ones(len(images), bool)) | (np.asarray(batch["label"]) == 0)
            for j, (index, mask, label) in enumerate(zip(batch["index"], batch["mask"], batch["label"])):
                rng = np.random.default_rng([self.seed, epoch, int(index)])
                mask = mask if known[j] else None  # a labelled anomaly without a mask: unknown
                others = images[:j] + images[j + 1 :] or images

                def options(rng=rng, others=others) -> list:
                    return factory(rng, others)

                items.append(synthesize(images[j], mask, int(label), rng, share, options))
            last = stack_batch(items)
            yielded += 1
            yield last
        while last is not None and yielded < len(self):  # rows were skipped: pad as the stream would have run
            yielded += 1
            yield last

    def _readable(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The rows of ``batch`` that decoded; the others go to ``skipped``."""
        errors = batch.get("error")
        if errors is None:
            return batch
        bad = np.asarray([bool(e) for e in errors])
        if not bad.any():
            return batch
        for uri, error in zip(batch["uri"][bad], errors[bad]):
            self.skipped.add(str(uri), str(error))
        return {k: v[~bad] for k, v in batch.items()}
