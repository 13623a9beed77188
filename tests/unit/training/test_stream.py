"""The streamed training input: listing (local and S3), equal shards, decoding, seeded synthesis."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adcore import storage
from adcore.data import bmad
from adcore.data.demo import make_demo_dataset
from adcore.training.skipped import BadImageShareError, SkippedImages
from adcore.training.stream import DecodeTrain, StreamedBatches, shard_listing, train_listing

SIZE = 32


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(
        tmp_path_factory.mktemp("stream"), n_train=11, n_valid=2, n_test=2, size=48, seed=0, n_train_anomalous=3
    )


def test_listing_matches_the_bmad_reader(demo):
    listing = train_listing(str(demo), labelled=2, seed=5)
    samples = bmad.list_split(demo, "train", labelled=2, seed=5)
    assert listing.column("uri").to_pylist() == [str(s.path) for s in samples]
    assert listing.column("label").to_pylist() == [s.label for s in samples]
    masks = [str(s.mask_path) if s.mask_path else "" for s in samples]
    assert listing.column("mask_uri").to_pylist() == masks
    assert listing.column("index").to_pylist() == list(range(len(samples)))


def test_listing_from_s3_names_the_same_files(demo, s3_server):
    bucket = s3_server.make_bucket("stream-listing")
    storage.upload_dir(demo, f"{bucket}/data")
    local = train_listing(str(demo), labelled=1, seed=0)
    remote = train_listing(f"{bucket}/data", labelled=1, seed=0)
    strip = lambda uris, root: [u[len(root) :] if u else "" for u in uris]  # noqa: E731
    for col in ("uri", "mask_uri"):
        remote_rel = strip(remote.column(col).to_pylist(), f"{bucket}/data")
        assert remote_rel == strip(local.column(col).to_pylist(), str(demo))
    batch = DecodeTrain(SIZE)(remote.slice(0, 2).to_pydict())
    assert batch["pixels"].shape == (2, 3, SIZE, SIZE) and batch["pixels"].dtype == np.uint8


def test_missing_train_folder_is_a_clear_error(tmp_path):
    with pytest.raises(Exception, match="train"):
        train_listing(str(tmp_path))


def test_shards_are_equal_and_every_rank_gets_the_labelled_anomalies(demo):
    listing = train_listing(str(demo), labelled=3, seed=0)  # 11 normal + 3 labelled
    shards = [shard_listing(listing, r, 3) for r in range(3)]
    assert [s.num_rows for s in shards] == [4 + 3] * 3  # 11 normal padded to 12, split in 3
    normal = sorted(i for s in shards for i, lab in zip(s["index"].to_pylist(), s["label"].to_pylist()) if lab == 0)
    assert set(normal) == set(range(11))  # none dropped, one repeated
    for s in shards:
        assert [i for i, lab in zip(s["index"].to_pylist(), s["label"].to_pylist()) if lab == 1] == [11, 12, 13]


def test_decoded_batch_carries_masks_of_labelled_anomalies(demo):
    listing = train_listing(str(demo), labelled=3, seed=0)
    batch = DecodeTrain(SIZE)(listing.slice(10, 4).to_pydict())  # one normal, three anomalies
    assert batch["mask"].shape == (4, SIZE, SIZE) and batch["mask"].dtype == bool
    assert not batch["mask"][0].any() and all(m.any() for m in batch["mask"][1:])
    assert batch["label"].tolist() == [0, 1, 1, 1]


def _stream(demo):
    decoded = DecodeTrain(SIZE)(train_listing(str(demo)).to_pydict())

    def iterate(epoch):
        order = np.random.default_rng(epoch).permutation(len(decoded["index"]))
        for start in range(0, len(order), 4):
            yield {k: v[order[start : start + 4]] for k, v in decoded.items()}

    return iterate


def test_synthesis_is_seeded_by_epoch_and_image(demo):
    batches = StreamedBatches(_stream(demo), n_images=11, batch_size=4, anomaly_share=0.7, seed=3)
    assert len(batches) == 3
    first = list(batches.epoch(0))
    again = list(batches.epoch(0))
    for a, b in zip(first, again):
        assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks) and torch.equal(a.labels, b.labels)
    labels = torch.cat([b.labels for b in first])
    assert 0 < labels.sum() < len(labels)  # some images got a synthetic anomaly, some did not
    for b in first:  # a label says whether the image carries a synthetic mask
        assert torch.equal(b.labels, (b.masks.flatten(1).sum(1) > 0).float())
    other = torch.cat([b.images for b in batches.epoch(1)])
    assert not torch.equal(torch.cat([b.images for b in first]).sort(0).values, other.sort(0).values)


def test_prefetched_synthesis_gives_the_same_batches(demo):
    plain = StreamedBatches(_stream(demo), n_images=11, batch_size=4, anomaly_share=0.7, seed=3)
    ahead = StreamedBatches(_stream(demo), n_images=11, batch_size=4, anomaly_share=0.7, seed=3, prefetch=2)
    for epoch in (0, 1):
        got, expected = list(ahead.epoch(epoch)), list(plain.epoch(epoch))
        assert len(got) == len(expected) == 3
        for a, b in zip(got, expected):
            assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
            assert torch.equal(a.labels, b.labels)


def test_share_zero_passes_the_decoded_images_through(demo):
    batches = StreamedBatches(_stream(demo), n_images=11, batch_size=4, anomaly_share=0.0)
    out = torch.cat([b.images for b in batches.epoch(0)])
    assert out.shape == (11, 3, SIZE, SIZE) and float(out.max()) <= 1.0
    assert all(b.labels.sum() == 0 for b in batches.epoch(0))


def _corrupt(path) -> None:
    """Truncate an image file to its first half: a real file that no longer decodes."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_an_unreadable_image_is_skipped_counted_and_named(tmp_path, s3_server):
    data = make_demo_dataset(tmp_path / "demo", n_train=9, n_valid=2, n_test=2, size=48, seed=0)
    bad = sorted((data / "train" / "good").rglob("*.png"))[4]
    _corrupt(bad)
    bucket = s3_server.make_bucket("stream-bad")
    storage.upload_dir(data, f"{bucket}/data")
    listing = train_listing(f"{bucket}/data")
    decoded = DecodeTrain(SIZE)(listing.to_pydict())
    errors = decoded["error"].tolist()
    assert [bool(e) for e in errors] == [i == 4 for i in range(9)]
    skipped = SkippedImages(f"{bucket}/data", max_share=0.2, total=9)

    def iterate(epoch):  # one image per batch: the bad image's batch is empty once it is left out
        for i in range(9):
            yield {k: v[i : i + 1] for k, v in decoded.items()}

    batches = StreamedBatches(iterate, n_images=9, batch_size=1, anomaly_share=0.0, skipped=skipped)
    out = list(batches.epoch(0))
    assert len(out) == len(batches) == 9, "as many batches as the shard gives: every rank runs its steps"
    assert out[-1] is out[-2], "the last batch repeated in place of the skipped one"
    assert skipped.files == {bad.relative_to(data).as_posix(): errors[4]}
    assert skipped.summary(None) == {"count": 1, "of": 9, "files": skipped.files}
    list(batches.epoch(1))
    assert len(skipped) == 1, "an image skipped in every epoch is counted once"
    for prefetch in (0, 2):  # the refusal reaches the caller from the prefetching thread too
        skipped = SkippedImages(f"{bucket}/data", max_share=0.1, total=9)
        strict = StreamedBatches(iterate, 9, 1, skipped=skipped, prefetch=prefetch)
        with pytest.raises(BadImageShareError, match="1 of 9 train images"):
            list(strict.epoch(0))


def test_more_unreadable_images_than_the_share_refuse_the_run(tmp_path):
    skipped = SkippedImages(str(tmp_path), max_share=0.01, total=150)
    skipped.add(str(tmp_path / "train/good/a.png"), "truncated")
    with pytest.raises(BadImageShareError, match=r"^2 of 150 train images .*--max-bad-share 0.01.*train/good/a.png"):
        skipped.add(str(tmp_path / "train/good/b.png"), "not_an_image")
