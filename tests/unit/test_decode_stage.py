"""The decode stage at CPU speed: reads run concurrently yet every frame is one row in order, the
content hash is the bytes' SHA-256, a grey frame is resized once as one plane and the network sees
the same values from it as from the three-channel float frame."""

from __future__ import annotations

import hashlib
import io
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from adcore import storage
from adcore.scorer import TorchNetwork, prepare, prepare_plane, to_device, to_uint8
from jobs.scoring import schema as S
from jobs.scoring.stages import Decoder

S_PX = 16
WAIT_S = 30  # a read waits this long for the other reads it should overlap with


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _files(n: int) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    files = {f"f{i:02d}.png": _png((rng.random((20 + i, 30)) * 255).astype(np.uint8)) for i in range(n)}
    files["f03.png"] = b"\x89PNG\r\n\x1a\n not a png at all"  # a bad file among good ones
    return files


def _batch(uris: list[str], sizes: list[int]) -> dict[str, np.ndarray]:
    n = len(uris)
    return {
        "uri": np.array(uris, dtype=object),
        "size": np.array(sizes, dtype=np.int64),
        "version": np.array([None] * n, dtype=object),
        "prior_sha": np.array([None] * n, dtype=object),
        "prior_done": np.array([None] * n, dtype=object),
    }


class _Overlapping(Decoder):
    """A decoder whose reads each wait until ``together`` reads are running at once (serial reads break it)."""

    def __init__(self, *args, together: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.barrier = threading.Barrier(together, timeout=WAIT_S)
        self.first = threading.Event()

    def _read(self, uri, size):
        if not self.first.is_set():  # the first wave of reads must all be in flight together
            try:
                self.barrier.wait()
            except threading.BrokenBarrierError:
                raise AssertionError("reads did not run concurrently") from None
            self.first.set()
        return super()._read(uri, size)

    def __getstate__(self):  # never pickled here
        raise TypeError


def _check_rows(out, uris, files):
    assert list(out["image_uri"]) == uris, "one row per single-frame file, in the listing's order"
    for uri, status, error, sha in zip(out["image_uri"], out["status"], out["error"], out["content_sha256"]):
        name = uri.rsplit("/", 1)[1]
        if name == "f03.png":
            assert status == S.STATUS_ERROR and S.error_kind(error) == "truncated"
        elif name == "gone.png":
            assert status == S.STATUS_ERROR and S.error_kind(error) == S.READ_ERROR
        else:
            assert status == S.STATUS_OK and error is None
            assert sha == hashlib.sha256(files[name]).hexdigest()  # hashed while reading, same value


def test_local_reads_overlap_and_every_file_is_one_row_in_order(tmp_path):
    files = _files(12)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    names = sorted(files) + ["gone.png"]
    uris = [str(tmp_path / n) for n in names]
    sizes = [len(files.get(n, b"12345")) for n in names]
    out = _Overlapping(S_PX, 10**6, input_root=str(tmp_path), together=4, read_threads=4)(_batch(uris, sizes))
    _check_rows(out, uris, files)
    serial = Decoder(S_PX, 10**6, input_root=str(tmp_path), read_threads=1)(_batch(uris, sizes))
    for c in ("image_uri", "status", "content_sha256"):
        assert list(serial[c]) == list(out[c])
    assert [S.error_kind(e) for e in serial["error"]] == [S.error_kind(e) for e in out["error"]]
    assert np.array_equal(serial["pixels"], out["pixels"])


def test_s3_gets_overlap_and_every_object_is_one_row(s3_server):
    bucket = s3_server.make_bucket("concurrent-gets")
    files = _files(10)
    for name, data in files.items():
        storage.write_bytes(f"{bucket}/in/{name}", data)
    names = sorted(files) + ["gone.png"]
    uris = [f"{bucket}/in/{n}" for n in names]
    sizes = [len(files.get(n, b"12345")) for n in names]
    dec = _Overlapping(S_PX, 10**6, input_root=f"{bucket}/in", together=8, read_threads=8)
    _check_rows(dec(_batch(uris, sizes)), uris, files)


def test_reads_ahead_stay_within_their_byte_budget(tmp_path):
    from jobs.scoring.stages import _read_ahead

    running, most, lock = [0], [0], threading.Lock()
    release = threading.Semaphore(0)

    def read(uri, size):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        release.acquire(timeout=WAIT_S)
        with lock:
            running[0] -= 1
        return uri

    files = [(f"f{i}", 100) for i in range(10)]
    reads = _read_ahead(read, files, threads=8, max_bytes=300)
    got = []
    for _ in files:
        for _ in range(3):
            release.release()
        got.append(next(reads))
    assert got == [u for u, _ in files] and most[0] <= 3  # 300 bytes: three files of 100 at once


def test_sha256_while_reading_equals_hashlib_over_the_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "READ_PIECE", 1000)  # many pieces
    data = np.random.default_rng(1).bytes(12_345)
    (tmp_path / "x.bin").write_bytes(data)
    digest = hashlib.sha256()
    assert storage.Reader().read_listed(str(tmp_path / "x.bin"), len(data), str(tmp_path), digest) == data
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    with pytest.raises(storage.ChangedSinceListing):
        storage.read_local_listed(str(tmp_path / "x.bin"), len(data) - 1, str(tmp_path), hashlib.sha256())
    (tmp_path / "y.bin").write_bytes(b"")
    empty = hashlib.sha256()
    assert storage.read_local_listed(str(tmp_path / "y.bin"), 0, str(tmp_path), empty) == b""
    assert empty.hexdigest() == hashlib.sha256(b"").hexdigest()


def _prepare_three_channels(image: np.ndarray, size: int) -> np.ndarray:
    """The earlier preparation: float32, a grey plane repeated to three channels, then resized."""
    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=2)
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return t[0].clamp_(0, 1).numpy()


@pytest.mark.parametrize("shape", [(97, 130), (224, 224), (300, 200, 3), (64, 64, 4), (50, 70, 1)])
def test_one_plane_resize_gives_the_three_channel_values(shape):
    image = np.random.default_rng(2).random(shape).astype(np.float32)
    colour = len(shape) == 3 and shape[2] in (3, 4)
    want = _prepare_three_channels(image[..., :3] if colour else image.reshape(shape[:2]), 32)
    plane = prepare_plane(image, 32)
    assert plane.shape[0] == (3 if colour else 1)
    np.testing.assert_array_equal(prepare(image, 32), want)
    np.testing.assert_array_equal(np.broadcast_to(plane, (3, 32, 32)), want)


def test_uint8_frames_are_resized_as_uint8():
    image = (np.random.default_rng(3).random((90, 120)) * 255).astype(np.uint8)
    plane = prepare_plane(image, 32)
    assert plane.dtype == np.uint8 and plane.shape == (1, 32, 32)
    # Within one grey level of the float path (each rounds once, at a different step).
    floats = to_uint8(prepare_plane(image.astype(np.float32) / 255, 32))
    assert np.abs(plane.astype(int) - floats.astype(int)).max() <= 1


def test_the_network_sees_the_same_input_from_one_uint8_plane():
    frames = to_uint8(np.random.default_rng(4).random((5, 1, 16, 16)).astype(np.float32))
    x = to_device(frames, torch.device("cpu"))
    want = np.broadcast_to(frames, (5, 3, 16, 16)).astype(np.float32) * np.float32(1 / 255)
    assert x.shape == (5, 3, 16, 16) and x.dtype == torch.float32
    np.testing.assert_array_equal(x.numpy(), want)
    ragged = np.empty(2, dtype=object)  # blocks of grey and colour chunks handed over together
    ragged[0], ragged[1] = frames[0], np.broadcast_to(frames[1], (3, 16, 16))
    np.testing.assert_array_equal(to_device(ragged, torch.device("cpu")).numpy(), want[:2])


def test_torch_network_scores_a_grey_uint8_plane_as_its_float_frame():
    from adcore.testing import tiny_scorer

    scorer = tiny_scorer()
    assert isinstance(scorer.network, TorchNetwork)
    size = scorer.input_size
    grey = to_uint8(np.random.default_rng(5).random((3, 1, size, size)).astype(np.float32))
    three = np.broadcast_to(grey, (3, 3, size, size)).astype(np.float32) / np.float32(255)
    a, b = scorer.raw(grey), scorer.raw(three)
    np.testing.assert_allclose(a[0], b[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(a[1], b[1], rtol=0, atol=1e-6)


def test_index_search_takes_a_tensor_off_the_gpu_as_numpy():
    from adcore.index import PatchIndex

    rng = np.random.default_rng(6)
    bank, queries = rng.random((50, 8)).astype(np.float32), rng.random((7, 8)).astype(np.float32)
    for metric in ("l2", "cosine"):
        index = PatchIndex(bank, metric=metric, use_gpu=False)
        want = index.search(queries, k=3)
        got = index.search(torch.from_numpy(queries), k=3)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_autocast_is_the_familys_and_changes_nothing_on_the_cpu(tmp_path, monkeypatch):
    from dataclasses import replace

    import adcore.scorer as scoring
    from adcore.testing import tiny_artifact

    scorer = scoring.Scorer.load(tiny_artifact(tmp_path / "pc", preset="patchcore"), use_gpu=False)
    family = scoring.family_of_config(scorer.artifact_config["model"])
    size = scorer.input_size
    frames = to_uint8(np.random.default_rng(7).random((2, 1, size, size)).astype(np.float32))
    want = scorer.raw(frames)
    scorer.use_autocast()
    assert scorer.network.autocast == family.autocast  # what the family declares (none measured yet)
    monkeypatch.setattr(scoring, "family_of_config", lambda cfg: replace(family, autocast="bfloat16"))
    scorer.use_autocast()
    assert scorer.network.autocast == "bfloat16"
    got = scorer.raw(frames)  # a CUDA path: on the CPU the network stays fp32
    np.testing.assert_array_equal(got[0], want[0])


def test_grey_and_colour_files_in_one_call_give_three_channels_where_needed(tmp_path):
    rng = np.random.default_rng(8)
    grey, colour = (
        _png((rng.random((20, 30)) * 255).astype(np.uint8)),
        _png((rng.random((20, 30, 3)) * 255).astype(np.uint8)),
    )
    batch = {"bytes": np.array([grey, colour, grey], dtype=object), "path": np.array(["a.png", "b.png", "c.png"])}
    one_chunk = Decoder(S_PX, 10**6)(batch)["pixels"]
    per_row = Decoder(S_PX, 10**6, chunk_bytes=1)(batch)["pixels"]  # a chunk per row: 1, 3 and 1 channels
    assert one_chunk.shape == per_row.shape == (3, 3, S_PX, S_PX)
    np.testing.assert_array_equal(one_chunk, per_row)
    alone = Decoder(S_PX, 10**6)({"bytes": batch["bytes"][:1], "path": batch["path"][:1]})["pixels"]
    assert alone.shape == (1, 1, S_PX, S_PX)
    np.testing.assert_array_equal(np.broadcast_to(alone[0], (3, S_PX, S_PX)), one_chunk[0])
