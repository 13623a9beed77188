"""Decoded training frames, written once per listing and input size, read by every later pass.

A streamed run's first pass reads, decodes and resizes every training image (``stream.DecodeTrain``);
each later epoch, the head's fit, a resumed run and a second run on the same listing would do it all
again (from S3: a GET of megabytes per image and pass). The decode tasks instead keep what they
produce, uint8 frames at the network's input size, in a cache folder beside the checkpoints:

    <location>/<key>/manifest.json          what the cache holds: format, key, input size, image count
    <location>/<key>/blocks/<name>.npy      one decode block: its arrays, ``numpy.save`` one after another
    <location>/<key>/blocks/<name>.json     the block's entry: listing indexes, sha256, array shapes

The key is a hash of the listing (every image's and mask's name, size and ETag or mtime, label and
index), the input size and the decode settings, so a changed file, another input size or another
decoder version reads nothing of an older cache. A block is named by the key and its listing indexes,
so a rerun with the same number of workers finds its blocks where the first run wrote them.

The folder is shared storage, so nothing in it is trusted: a manifest that does not match the run's is
ignored and the cache rebuilt; a block is used only when its bytes hash to its entry's sha256 and its
arrays have the shapes, dtypes, indexes and labels the listing expects, otherwise its images are
decoded again and the block rewritten. Frames that failed to decode are kept as failures (the file is
at fault); a block with a failed read (the store's fault, perhaps passing) is never written.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from adcore import storage

log = logging.getLogger("adcore.train")

FORMAT = 1  # layout of blocks and manifest; part of the key
# The decode settings frames depend on (besides the input size): bump with any change to
# DecodeTrain's decoding, resizing or mask rule, so no older frame is read.
DECODE_SETTINGS = {"frame": "first", "resize": "prepare-bilinear", "pixels": "uint8", "mask": "any>0-nearest"}
MANIFEST = "manifest.json"
BLOCKS = "blocks"
# Listing columns the key hashes (``stream.train_listing``).
KEY_COLUMNS = ("index", "uri", "mask_uri", "label", "version", "mask_version")


def _arrays(rows: int, size: int) -> tuple[tuple[str, str, tuple], ...]:
    """(name, dtype kind, shape) of a block's arrays, in file order."""
    return (
        ("index", "<i8", (rows,)),
        ("pixels", "|u1", (rows, 3, size, size)),
        ("mask", "|b1", (rows, size, size)),
        ("has_mask", "|b1", (rows,)),
        ("label", "|i1", (rows,)),
        ("error", "<U", (rows,)),  # "" when decoded; else the reason (a decode error's kind)
    )


def listing_key(listing: pa.Table, size: int) -> str:
    """The cache key of a training listing at an input size (hex sha256)."""
    h = hashlib.sha256(json.dumps({"format": FORMAT, "size": size, "decode": DECODE_SETTINGS}).encode())
    for column in KEY_COLUMNS:
        h.update(json.dumps([column, listing.column(column).to_pylist()]).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class FrameCache:
    """One listing's cache folder; picklable into decode tasks (no filesystem, no credentials).

    Args:
        root: ``<location>/<key>``, local or ``s3://``.
        key: :func:`listing_key` of the run's listing.
        size: The network's input size, the frames' height and width.
    """

    root: str
    key: str
    size: int

    def manifest(self, images: int) -> dict:
        return {"format": FORMAT, "key": self.key, "size": self.size, "decode": DECODE_SETTINGS, "images": images}

    def block_uri(self, indexes: np.ndarray, suffix: str) -> str:
        name = hashlib.sha256(self.key.encode() + np.asarray(indexes, "<i8").tobytes()).hexdigest()[:40]
        return f"{self.root}/{BLOCKS}/{name}.{suffix}"

    def load(self, batch: dict, reader: storage.Reader) -> dict[str, np.ndarray] | None:
        """The cached decode of a batch of listing rows, or None (not cached, or refused and logged)."""
        indexes = np.asarray(batch["index"], np.int64)
        try:
            entry = json.loads(reader.read(self.block_uri(indexes, "json")))
        except (OSError, ValueError):  # not written yet (or unreadable: decoded again, rewritten)
            return None
        try:
            data = reader.read(self.block_uri(indexes, "npy"))
            return self._checked(entry, data, batch)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError) as e:  # whatever the bytes hold
            log.warning("frame cache block %s refused (%s): its images are decoded again", entry_name(self, indexes), e)
            return None

    def _checked(self, entry: dict, data: bytes, batch: dict) -> dict[str, np.ndarray]:
        indexes = np.asarray(batch["index"], np.int64)
        if entry.get("format") != FORMAT or entry.get("key") != self.key or entry.get("size") != self.size:
            raise ValueError("entry of another cache")
        if entry.get("indexes") != indexes.tolist():
            raise ValueError("entry names other images")
        if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
            raise ValueError("sha256 differs from its entry")
        out, f = {}, io.BytesIO(data)
        for name, dtype, shape in _arrays(len(indexes), self.size):
            a = np.load(f, allow_pickle=False)
            kind_ok = a.dtype.str.startswith(dtype) if dtype == "<U" else a.dtype.str == dtype
            if not kind_ok or a.shape != shape:
                raise ValueError(f"{name} is {a.dtype.str} {a.shape}, expected {dtype} {shape}")
            out[name] = a
        if f.tell() != len(data):
            raise ValueError("trailing bytes")
        expect_mask = np.array([bool(m) for m in batch["mask_uri"]], bool)
        if not np.array_equal(out["index"], indexes) or not np.array_equal(out["has_mask"], expect_mask):
            raise ValueError("rows differ from the listing's")
        if not np.array_equal(out["label"], np.asarray(batch["label"], np.int8)):
            raise ValueError("labels differ from the listing's")
        return out

    def store(self, out: dict[str, np.ndarray], reader: storage.Reader) -> None:
        """Write a decoded block (``DecodeTrain``'s columns), then its entry: an entry names only a
        complete file. A failed write is logged; training goes on without it."""
        indexes = np.asarray(out["index"], np.int64)
        f = io.BytesIO()
        for name, _, _ in _arrays(len(indexes), self.size):
            column = out[name].astype(str) if name == "error" else np.ascontiguousarray(out[name])
            np.save(f, column, allow_pickle=False)
        data = f.getvalue()
        entry = {
            "format": FORMAT,
            "key": self.key,
            "size": self.size,
            "indexes": indexes.tolist(),
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
        }
        try:
            storage.write_bytes(self.block_uri(indexes, "npy"), data)
            storage.write_bytes(self.block_uri(indexes, "json"), json.dumps(entry).encode())
        except OSError as e:
            log.warning("frame cache block %s not written (%s)", entry_name(self, indexes), type(e).__name__)


def entry_name(cache: FrameCache, indexes: np.ndarray) -> str:
    """A block's file name without its folder (for messages: it names no image)."""
    return cache.block_uri(indexes, "npy").rsplit("/", 1)[-1]


def open_cache(location: str, listing: pa.Table, size: int) -> FrameCache:
    """The cache of ``listing`` at ``size`` under ``location``: reused when its manifest matches,
    else (absent, unreadable, another's) started afresh, its folder cleared and a manifest written."""
    key = listing_key(listing, size)
    cache = FrameCache(f"{str(location).rstrip('/')}/{key}", key, size)
    manifest_uri = f"{cache.root}/{MANIFEST}"
    expected = cache.manifest(listing.num_rows)
    found = None
    if storage.exists(manifest_uri):
        try:
            found = json.loads(storage.read_bytes(manifest_uri))
        except (OSError, ValueError):
            found = "unreadable"
    if found == expected:
        log.info("frame cache %s: reusing what earlier runs decoded (%d images listed)", cache.root, listing.num_rows)
        return cache
    if found is not None:
        log.warning("frame cache %s: its manifest does not match this run's; rebuilt", cache.root)
        storage.delete_dir(cache.root)
    storage.write_bytes(manifest_uri, json.dumps(expected).encode())
    log.info("frame cache %s: the first pass writes the decoded frames of %d images", cache.root, listing.num_rows)
    return cache
