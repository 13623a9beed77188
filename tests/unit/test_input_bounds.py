"""The scoring job's input bounds, decided before a byte is read or a pixel decoded.

Special entries (FIFO, socket, links leaving the folder) are refused as ``not_a_file`` without
being opened; a read stops at the listed size; a listed size over ``max_file_bytes`` is refused
unread; a header announcing more frames than ``max_frames`` is refused undecoded; and the
decoder's chunks of prepared frames are the one-shot output cut in pieces.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from adcore import storage
from adcore.data import DecodeError, decode_image
from jobs.scoring import schema as S
from jobs.scoring.stages import Decoder
from tests import hostile_corpus as hc

S_PX = 16  # network input size of these tests' decoders
WAIT_S = 60  # generous: a decoder that blocks on a FIFO never returns at all


def _listing_batch(root) -> dict[str, np.ndarray]:
    listing = storage.list_objects(str(root))
    n = listing.num_rows
    return {
        "uri": np.array(listing.column("uri").to_pylist(), dtype=object),
        "size": np.array(listing.column("size").to_pylist(), dtype=np.int64),
        "version": np.array(listing.column("version").to_pylist(), dtype=object),
        "prior_sha": np.array([None] * n, dtype=object),
        "prior_done": np.array([None] * n, dtype=object),
    }


def _decode_in_thread(decoder: Decoder, batch) -> dict:
    """The decoder's output, failing (not hanging) if it blocks."""
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(decoder(batch)), daemon=True)
    worker.start()
    worker.join(WAIT_S)
    assert not worker.is_alive(), "the decoder blocked on a special file"
    return out


def _kinds(out) -> dict[str, str | None]:
    return {os.path.basename(u): S.error_kind(e) for u, e in zip(out["image_uri"], out["error"])}


def test_special_entries_are_listed_and_refused_unopened(tmp_path):
    root, outside = tmp_path / "in", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    png = hc.seed_files()["skimage__chessboard_RGB.png"].read_bytes()
    (root / "good.png").write_bytes(png)
    entries = hc.special_entries(root, outside, "good.png")

    batch = _listing_batch(root)  # a broken link, a FIFO, a folder link: listed, no error
    names = [os.path.basename(u) for u in batch["uri"]]
    assert sorted(names) == sorted(["good.png"] + [e.name for e in entries])
    out = _decode_in_thread(Decoder(S_PX, 10**6, input_root=str(root)), batch)
    kinds = _kinds(out)
    assert {e.name: kinds[e.name] for e in entries} == {e.name: e.kind for e in entries}
    assert kinds["good.png"] is None and kinds["special__link_in.png"] is None  # a link inside to a file inside
    assert list(out["frame"]) == [0] * len(names)  # one row each
    for e in entries:  # nothing read: no content hash
        if e.kind:
            assert out["content_sha256"][names.index(e.name)] is None


def test_a_link_to_dev_zero_is_refused_not_read(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    (root / "zero.dcm").symlink_to("/dev/zero")
    with pytest.raises(storage.NotAFile, match="outside"):
        storage.read_local_listed(str(root / "zero.dcm"), 0, str(root))
    # Even when the whole file system is the input, a device is not a file.
    with pytest.raises(storage.NotAFile, match="device"):
        storage.read_local_listed(str(root / "zero.dcm"), 0, "/")


def _rchar() -> int:
    """Bytes this process has read through read(2) and friends so far (Linux)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def test_a_local_read_never_goes_past_the_listed_size(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    grown = root / "grown.png"
    grown.write_bytes(b"\x89PNG" + bytes(8 * 2**20))  # listed at 100 bytes, then it grew to 8 MiB
    before = _rchar()
    with pytest.raises(storage.ChangedSinceListing, match="listed 100"):
        storage.read_local_listed(str(grown), 100, str(root))
    assert _rchar() - before < 2**20  # one buffer at most, not the 8 MiB
    assert storage.read_local_listed(str(grown), grown.stat().st_size, str(root))[:4] == b"\x89PNG"
    batch = _listing_batch(root)
    batch["size"][:] = 100
    out = Decoder(S_PX, 10**6, input_root=str(root))(batch)
    assert S.error_kind(out["error"][0]) == S.READ_ERROR  # transient: the next listing has the new size


def test_a_listed_size_over_max_file_bytes_is_refused_unread(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    png = hc.seed_files()["skimage__chessboard_RGB.png"].read_bytes()
    (root / "a.png").write_bytes(png)
    (root / "b.png").write_bytes(png)
    with open(root / "sparse.png", "wb") as f:
        f.truncate(hc.SPARSE_BYTES)
    batch = _listing_batch(root)
    # a.png listed far larger than it is: were it read, the sizes would disagree (a read error).
    batch["size"][0] = 10**12
    out = Decoder(S_PX, 10**6, max_file_bytes=len(png), input_root=str(root))(batch)
    assert [S.error_kind(e) for e in out["error"]] == ["too_large", None, "too_large"]
    assert out["content_sha256"][0] is None and out["content_sha256"][2] is None
    assert "max_file_bytes" in out["error"][2]
    tight = Decoder(S_PX, 10**6, max_file_bytes=len(png) - 1)({"bytes": np.array([png], object), "path": ["x.png"]})
    assert S.error_kind(tight["error"][0]) == "too_large"


@pytest.mark.parametrize(
    "name, make",
    [
        ("volume.nii.gz", lambda n: hc.nifti_bytes((2, 2, n))),
        ("series.nii.gz", lambda n: hc.nifti_bytes((2, 2, 2, n // 2))),  # slices times volumes
        ("frames.dcm", hc.dicom_many_frames),
        ("pages.tif", hc.tiff_pages),
    ],
)
def test_max_frames_is_read_from_the_header(name, make):
    limit = 40
    ok = decode_image(make(limit), name, max_frames=limit)
    assert len(ok) == limit  # at the bound: decoded
    data = make(limit + 2)
    with pytest.raises(DecodeError) as e:
        decode_image(data, name, max_frames=limit)
    assert e.value.kind == "too_many_frames" and f"max_frames={limit}" in e.value.reason
    # Decided from the header alone: the same header with its pixel data cut off is refused the same way.
    head = _header_only(data, name)
    with pytest.raises(DecodeError) as e:
        decode_image(head, name, max_frames=limit)
    assert e.value.kind == "too_many_frames"


def _header_only(data: bytes, name: str) -> bytes:
    import gzip

    if name.endswith(".nii.gz"):
        return gzip.compress(gzip.decompress(data)[:352])
    if name.endswith(".dcm"):
        return data[: data.rindex(b"\xe0\x7f\x10\x00") + 12]  # up to the Pixel Data element's header
    return data  # TIFF: every page is a header; its pixels are a byte each


def test_the_bomb_volume_is_refused_by_the_job_default():
    from jobs.score import ScoreConfig

    cfg = ScoreConfig()
    assert (cfg.max_frames, cfg.max_file_bytes) == (4096, 2 * 2**30)
    data = hc.nifti_bytes((2, 2, 20000))
    assert len(data) < 1024  # 714 bytes that would be 20,000 prepared frames
    with pytest.raises(DecodeError) as e:
        decode_image(data, "bomb.nii.gz", max_frames=cfg.max_frames)
    assert e.value.kind == "too_many_frames"


def test_chunks_are_the_one_shot_output_cut_in_pieces(tmp_path):
    seeds = hc.seed_files()
    names = ("pydicom__emri_small.dcm", "skimage__camera.png", "nibabel__functional.nii", "skimage__multipage.tif")
    data = [seeds[n].read_bytes() for n in names]
    data.insert(2, b"not an image")  # an error row between multi-frame files
    batch = {"bytes": np.array(data, dtype=object), "path": np.array(["a.dcm", "b.png", "c.png", "d.nii", "e.tif"])}
    whole = Decoder(S_PX, 10**8, chunk_bytes=2**40)
    assert len(list(whole.chunks(batch))) == 1
    one_shot = next(whole.chunks(batch))
    n = len(one_shot["frame"])
    assert n > 20
    for rows in (1, 7, n - 1):
        dec = Decoder(S_PX, 10**8, chunk_bytes=rows * 3 * S_PX * S_PX)
        parts = list(dec.chunks(batch))
        assert all(0 < len(p["frame"]) <= rows for p in parts) and len(parts) == -(-n // rows)
        for col, want in one_shot.items():
            got = np.concatenate([p[col] for p in parts])
            assert got.dtype == want.dtype and np.array_equal(got, want), (rows, col)
    assert np.array_equal(Decoder(S_PX, 10**8, chunk_bytes=1)(batch)["pixels"], one_shot["pixels"])


def test_s3_reads_stop_at_the_listed_size_and_big_objects_are_never_fetched(s3_server):
    bucket = s3_server.make_bucket("bounds")
    data = hc.seed_files()["skimage__chessboard_RGB.png"].read_bytes()
    storage.write_bytes(f"{bucket}/in/a.png", data)
    storage.write_bytes(f"{bucket}/in/b.png", data + data)
    reader = storage.Reader()
    assert reader.read_listed(f"{bucket}/in/a.png", len(data), f"{bucket}/in") == data
    with pytest.raises(storage.ChangedSinceListing):
        reader.read_listed(f"{bucket}/in/b.png", len(data), f"{bucket}/in")
    batch = _listing_batch(f"{bucket}/in")
    storage.delete(f"{bucket}/in/b.png")  # a GET of b.png would now fail: a read error, not too_large
    out = Decoder(S_PX, 10**6, max_file_bytes=len(data), input_root=f"{bucket}/in")(batch)
    assert [S.error_kind(e) for e in out["error"]] == [None, "too_large"]


def test_dicom_excess_pixel_data_beyond_the_header_frame_count_is_not_decoded():
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(hc.dicom_many_frames(50_000)))
    ds.NumberOfFrames = 1  # the header says one 1x1 frame; the pixel data holds 50,000
    buf = io.BytesIO()
    ds.save_as(buf)
    frames = decode_image(buf.getvalue(), "excess.dcm", max_frames=4)
    assert [f.pixels.shape for f in frames] == [(1, 1)]


def test_a_many_slice_volume_never_holds_all_its_prepared_frames(tmp_path):
    import tracemalloc

    size, slices, chunk = 112, 1000, 2 * 2**20  # 1,000 slices at 112 px: 38 MB prepared in all
    batch = {"bytes": np.array([hc.nifti_bytes((2, 2, slices))], dtype=object), "path": np.array(["ct.nii.gz"])}
    dec = Decoder(size, 10**9, max_frames=slices, chunk_bytes=chunk)
    rows = 0
    tracemalloc.start()
    try:
        for part in dec.chunks(batch):  # handed on (here dropped) chunk by chunk, as Ray Data does
            rows += len(part["frame"])
            del part
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows == slices
    assert peak < 4 * chunk, f"{peak / 2**20:.0f} MiB traced at the peak"  # a chunk, its stack, one frame's work
