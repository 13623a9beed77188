"""The frame cache: decoded training frames written once, read by later passes and runs, never trusted."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from adcore import storage
from adcore.data.demo import make_demo_dataset
from adcore.training import frame_cache, skipped
from adcore.training.frame_cache import MANIFEST, listing_key, open_cache
from adcore.training.stream import DecodeTrain, train_listing
from tests.faults_proxy import FaultProxy

SIZE = 32


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    data = make_demo_dataset(
        tmp_path_factory.mktemp("fcache"), n_train=6, n_valid=2, n_test=2, size=48, seed=0, n_train_anomalous=2
    )
    bad = sorted((data / "train" / "good").rglob("*.png"))[2]
    bad.write_bytes(bad.read_bytes()[:100])  # a file that does not decode: its failure is cached too
    return data


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].tolist() == b[k].tolist() if a[k].dtype == object else np.array_equal(a[k], b[k]), k


def _blocks(cache) -> list[str]:
    folder = f"{cache.root}/{frame_cache.BLOCKS}"
    return sorted(storage.list_files(folder)) if storage.exists(folder) else []


def test_a_second_pass_and_a_second_run_read_no_image_from_s3(demo, s3_server, monkeypatch):
    bucket = s3_server.make_bucket("frame-cache")
    storage.upload_dir(demo, f"{bucket}/data")
    with FaultProxy(s3_server.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        listing = train_listing(f"{bucket}/data", labelled=2, seed=0)
        batch = listing.to_pydict()
        files = len(batch["uri"]) + sum(1 for m in batch["mask_uri"] if m)
        plain = DecodeTrain(SIZE)(batch)
        assert proxy.gets("/data/train/") == files
        cache = open_cache(f"{bucket}/cache", listing, SIZE)
        first = DecodeTrain(SIZE, cache)(batch)
        assert proxy.gets("/data/train/") == 2 * files, "the first pass reads every image"
        again = DecodeTrain(SIZE, cache)(batch)
        rerun = DecodeTrain(SIZE, open_cache(f"{bucket}/cache", listing, SIZE))(batch)  # a second run
        assert proxy.gets("/data/train/") == 2 * files, "later passes and runs read no image"
    for out in (first, again, rerun):
        _assert_same(out, plain)
    assert [bool(e) for e in again["error"]] == [i == 2 for i in range(len(batch["uri"]))], "a bad file stays bad"
    assert again["mask"][-2:].any(axis=(1, 2)).all(), "the labelled anomalies' masks come back"


def test_a_tampered_block_is_refused_and_rebuilt(demo, tmp_path, caplog):
    listing = train_listing(str(demo), labelled=2, seed=0)
    batch = listing.to_pydict()
    plain = DecodeTrain(SIZE)(batch)
    cache = open_cache(str(tmp_path / "cache"), listing, SIZE)
    DecodeTrain(SIZE, cache)(batch)
    npy = Path(_blocks(cache)[1 if _blocks(cache)[0].endswith(".json") else 0])
    assert npy.suffix == ".npy"
    data = bytearray(npy.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the last frame
    npy.write_bytes(bytes(data))
    reader = storage.Reader()
    assert cache.load(batch, reader) is None and "sha256 differs" in caplog.text
    _assert_same(DecodeTrain(SIZE, cache)(batch), plain)  # decoded again, block rewritten
    assert cache.load(batch, reader) is not None

    # A consistent forgery (its entry's sha256 updated) of frames at another size is refused too.
    small = DecodeTrain(SIZE // 2)(batch)
    other = frame_cache.FrameCache(cache.root, cache.key, SIZE // 2)
    other.store(small, reader)
    entry = json.loads(npy.with_suffix(".json").read_text()) | {"size": SIZE}
    entry["sha256"] = json.loads(npy.with_suffix(".json").read_text())["sha256"]
    npy.with_suffix(".json").write_text(json.dumps(entry))
    caplog.clear()
    assert cache.load(batch, reader) is None and "expected |u1" in caplog.text

    # Whatever else the files hold is refused, never raised: an empty block with its sha256, an entry
    # that is not an object.
    npy.write_bytes(b"")
    entry["sha256"] = hashlib.sha256(b"").hexdigest()
    npy.with_suffix(".json").write_text(json.dumps(entry))
    assert cache.load(batch, reader) is None
    npy.with_suffix(".json").write_text("[]")
    assert cache.load(batch, reader) is None
    _assert_same(DecodeTrain(SIZE, cache)(batch), plain)


def test_a_manifest_of_another_cache_is_ignored_and_rebuilt(demo, tmp_path, caplog):
    listing = train_listing(str(demo))
    batch = listing.to_pydict()
    cache = open_cache(str(tmp_path / "cache"), listing, SIZE)
    DecodeTrain(SIZE, cache)(batch)
    assert _blocks(cache)
    manifest = Path(cache.root, MANIFEST)
    manifest.write_text(json.dumps(json.loads(manifest.read_text()) | {"images": 999}))
    cache = open_cache(str(tmp_path / "cache"), listing, SIZE)
    assert "does not match" in caplog.text and not _blocks(cache), "blocks of a mismatched cache are dropped"
    assert json.loads(manifest.read_text())["images"] == listing.num_rows


def test_the_key_follows_the_files_and_the_input_size(tmp_path):
    data = make_demo_dataset(tmp_path / "demo", n_train=3, n_valid=2, n_test=2, size=48, seed=0)
    listing = train_listing(str(data))
    key = listing_key(listing, SIZE)
    assert listing_key(train_listing(str(data)), SIZE) == key, "the same listing, the same key"
    assert listing_key(listing, SIZE * 2) != key
    image = Path(listing.column("uri")[1].as_py())
    image.write_bytes(image.read_bytes() + b"\0")  # a file changed since the cache was written
    assert listing_key(train_listing(str(data)), SIZE) != key


def test_a_failed_read_is_never_cached(demo, s3_server, tmp_path, monkeypatch):
    bucket = s3_server.make_bucket("frame-cache-gone")
    storage.upload_dir(demo, f"{bucket}/data")
    monkeypatch.setattr(skipped, "RETRY_WAIT_S", 0.0)
    listing = train_listing(f"{bucket}/data")
    batch = listing.to_pydict()
    cache = open_cache(str(tmp_path / "cache"), listing, SIZE)
    with FaultProxy(s3_server.endpoint, gone=r"/data/train/good/") as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        out = DecodeTrain(SIZE, cache)(batch)
    assert all(out["error"]), "every read failed"
    assert not _blocks(cache), "a block with a failed read is not kept"
