"""Decoders on real files (pydicom-data, nibabel test data) and on written/broken ones."""

import io
import logging
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
from nibabel.testing import data_path as NIB_DATA
from PIL import Image
from pydicom.data import get_testdata_file

from adcore.data import DecodeError, decode_image, decode_path

PHI = {"PatientName": "Doe^Jane", "PatientID": "PID-98765", "PatientBirthDate": "19700101"}


def dicom_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def png_bytes(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ DICOM
def test_ct_small_modality_and_uid():
    path = get_testdata_file("CT_small.dcm")
    frames = decode_path(path)
    ds = pydicom.dcmread(path)
    assert len(frames) == 1
    f = frames[0]
    assert f.pixels.shape == (128, 128) and f.pixels.dtype == np.float32
    assert f.pixels.min() >= 0.0 and f.pixels.max() <= 1.0 and f.pixels.std() > 0.05
    assert f.modality == "CT" and f.index == 0
    assert f.study_uid == ds.StudyInstanceUID
    assert ds.StudyInstanceUID not in repr(f)  # the raw UID stays out of logs


def test_window_is_applied_after_modality_lut():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = 40, 400  # soft-tissue window, in HU
    pix = decode_image(dicom_bytes(ds), "ct.dcm")[0].pixels
    hu = ds.pixel_array.astype(np.float64) - 1024
    expected = np.clip((hu - 39.5) / 399 + 0.5, 0, 1)
    np.testing.assert_allclose(pix, expected, atol=1e-5)
    raw_windowed = np.clip((ds.pixel_array - 39.5) / 399 + 0.5, 0, 1)
    assert np.abs(pix - raw_windowed).mean() > 0.05  # windowing raw values would differ


def test_multiframe_gives_one_frame_each():
    frames = decode_path(get_testdata_file("emri_small.dcm"))
    assert [f.index for f in frames] == list(range(10))
    assert all(f.pixels.shape == (64, 64) and f.modality == "MR" for f in frames)
    assert not np.allclose(frames[0].pixels, frames[5].pixels)


def test_monochrome1_is_inverted():
    path = get_testdata_file("RG1_UNCI.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    inverted = decode_path(path)[0].pixels
    ds.PhotometricInterpretation = "MONOCHROME2"
    plain = decode_image(dicom_bytes(ds), "rg1.dcm")[0].pixels
    np.testing.assert_allclose(inverted, 1.0 - plain, atol=1e-6)


def test_lossless_jpeg2000_matches_uncompressed():
    ref = decode_path(get_testdata_file("MR_small.dcm"))[0].pixels
    j2k = decode_path(get_testdata_file("MR_small_jp2klossless.dcm"))[0].pixels
    np.testing.assert_allclose(j2k, ref, atol=1e-6)


# pydicom's reference pixels for JPEG-lossy.dcm (12-bit JPEG Extended; stored values at [row, col]).
JPEG_LOSSY_REFERENCE = {(420, 140): 244, (230, 120): 95}


def test_12bit_jpeg_extended_decodes_to_the_reference_values():
    path = get_testdata_file("JPEG-lossy.dcm")
    frames = decode_path(path)
    assert len(frames) == 1 and frames[0].error is None
    pixels = frames[0].pixels
    assert pixels.shape == (1024, 256) and pixels.min() == 0.0 and pixels.max() == 1.0
    # A window of exactly the 12-bit range maps a stored value v to v / 4095: the stored values come back.
    ds = pydicom.dcmread(path)
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    stored = decode_image(dicom_bytes(ds), "jpeg-lossy.dcm")[0].pixels * 4095
    for (row, col), value in JPEG_LOSSY_REFERENCE.items():
        assert stored[row, col] == pytest.approx(value, abs=0.01), (row, col)


def test_palette_color_becomes_rgb():
    f = decode_path(get_testdata_file("OBXXXX1A.dcm"))[0]
    assert f.pixels.shape == (600, 800, 3) and f.pixels.max() > 0.5


def test_dicom_found_by_magic_whatever_the_name():
    data = Path(get_testdata_file("MR_small.dcm")).read_bytes()
    assert decode_image(data, "s3://bucket/no_extension")[0].pixels.shape == (64, 64)


def test_phi_never_in_errors_or_frames(caplog):
    caplog.set_level(logging.DEBUG)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for k, v in PHI.items():
        setattr(ds, k, v)
    good = decode_image(dicom_bytes(ds), "phi.dcm")[0]
    texts = [repr(good), str(good.modality), str(good.index)]
    data = dicom_bytes(ds)
    for broken in (data[: len(data) - 5000], data[:600]):  # cut in pixel data, cut in header
        with pytest.raises(DecodeError) as ei:
            decode_image(broken, "phi.dcm")
        assert ei.value.kind == "truncated"
        texts.append(str(ei.value))
    lossy = pydicom.dcmread(get_testdata_file("JPEG-lossy.dcm"))
    for k, v in PHI.items():
        setattr(lossy, k, v)
    try:
        decode_image(dicom_bytes(lossy), "phi2.dcm")
    except DecodeError as e:
        texts.append(str(e))
    texts.append(caplog.text)
    joined = "\n".join(texts)
    for v in list(PHI.values()) + ["Doe", "Jane"]:
        assert v not in joined


def test_truncated_dicom():
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    with pytest.raises(DecodeError) as ei:
        decode_image(data[: int(len(data) * 0.8)], "s3://b/ct.dcm")
    assert ei.value.kind == "truncated" and "s3://b/ct.dcm" in str(ei.value)


def test_dicom_too_large_checked_before_pixels():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows = ds.Columns = 60000  # header claims 3.6e9 pixels; the data is tiny
    with pytest.raises(DecodeError) as ei:
        decode_image(dicom_bytes(ds), "big.dcm")
    assert ei.value.kind == "too_large"
    with pytest.raises(DecodeError) as ei:
        decode_path(get_testdata_file("emri_small.dcm"), max_pixels=64 * 64 * 9)
    assert ei.value.kind == "too_large"


# ------------------------------------------------------------------ NIfTI
def test_nibabel_example4d():
    path = Path(NIB_DATA) / "example4d.nii.gz"
    shape = nib.load(path).shape  # (128, 96, 24, 2)
    frames = decode_path(path)
    assert len(frames) == shape[2] * shape[3]
    assert [f.index for f in frames] == list(range(len(frames)))
    assert frames[0].pixels.shape == (shape[1], shape[0])
    assert all(f.modality is None and f.study_uid is None for f in frames)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_written_nifti_orientation_and_scaling(tmp_path, suffix):
    rng = np.random.default_rng(0)
    nx, ny, nz, nt = 10, 12, 5, 2
    vol = rng.uniform(100, 200, size=(nx, ny, nz, nt)).astype(np.float32)
    vol[0, ny - 1, :, :] = 1000.0  # patient left, anterior: hot voxel
    vol[..., 1] *= 10  # second volume on another scale: per-volume normalisation
    path = tmp_path / f"v{suffix}"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), path)
    frames = decode_path(path)
    assert len(frames) == nz * nt and frames[nz + 3].index == nz + 3
    f = frames[2].pixels
    assert f.shape == (ny, nx)
    assert f[0, 0] == pytest.approx(1.0)  # anterior at the top, patient left at the left
    lo, hi = np.percentile(vol[..., 0], [0.5, 99.5])
    np.testing.assert_allclose(f, np.clip((np.rot90(vol[:, :, 2, 0]) - lo) / (hi - lo), 0, 1), atol=1e-5)
    assert abs(frames[nz + 2].pixels.mean() - f.mean()) < 0.05


def test_nifti_truncated_and_too_large(tmp_path):
    path = tmp_path / "v.nii"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4)), path)
    data = path.read_bytes()
    with pytest.raises(DecodeError) as ei:
        decode_image(data[:-1000], "v.nii")
    assert ei.value.kind == "truncated"
    with pytest.raises(DecodeError) as ei:
        decode_image(data, "v.nii", max_pixels=7999)
    assert ei.value.kind == "too_large"


# ------------------------------------------------------------------ PNG / JPEG / TIFF
def test_png_8_and_16_bit():
    rng = np.random.default_rng(1)
    a8 = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    np.testing.assert_allclose(decode_image(png_bytes(a8), "a.png")[0].pixels, a8 / 255.0, atol=1e-6)
    a16 = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
    np.testing.assert_allclose(decode_image(png_bytes(a16), "a.png")[0].pixels, a16 / 65535.0, atol=1e-6)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    np.testing.assert_allclose(decode_image(png_bytes(rgb), "a.png")[0].pixels, rgb / 255.0, atol=1e-6)


def test_jpeg_and_magic_over_extension():
    gradient = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))
    buf = io.BytesIO()
    Image.fromarray(gradient).save(buf, format="JPEG", quality=95)
    pix = decode_image(buf.getvalue(), "x.png")[0].pixels  # misnamed: content wins
    assert pix.shape == (48, 64) and np.abs(pix - gradient / 255.0).max() < 0.05


def test_tiff_16bit_multipage(tmp_path):
    rng = np.random.default_rng(2)
    stack = rng.integers(0, 65536, (3, 16, 24), dtype=np.uint16)
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")  # a (3, H, W) array is planar RGB by default
    frames = decode_path(path)
    assert [f.index for f in frames] == [0, 1, 2]
    np.testing.assert_allclose(frames[1].pixels, stack[1] / 65535.0, atol=1e-6)


def test_tiff_planar_rgb_is_one_colour_frame(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (3, 16, 24), dtype=np.uint8)
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", planarconfig="separate")
    frames = decode_path(path)
    assert len(frames) == 1 and frames[0].pixels.shape == (16, 24, 3)
    np.testing.assert_allclose(frames[0].pixels, np.moveaxis(rgb, 0, -1) / 255.0, atol=1e-6)


# ------------------------------------------------------------------ broken files
def _png_header(width: int, height: int) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "make, name, kinds",
    [
        (lambda: b"", "s3://b/empty.png", {"empty"}),
        (lambda: png_bytes(np.full((64, 64), 7, np.uint8))[:-40], "s3://b/x.png", {"truncated"}),
        (lambda: b"hello, this is not an image\n" * 10, "s3://b/notes.png", {"corrupt", "unsupported"}),
        (lambda: _png_header(9000, 9000), "s3://b/wide.png", {"too_large"}),  # 81 Mpx > 50 M default
        (lambda: _png_header(100000, 100000), "s3://b/bomb.png", {"too_large"}),
        (lambda: b"\x00\x01\x02garbage", "s3://b/thing.xyz", {"unsupported"}),
    ],
)
def test_broken_files(make, name, kinds):
    with pytest.raises(DecodeError) as ei:
        decode_image(make(), name)
    assert ei.value.kind in kinds and ei.value.uri == name
    assert str(ei.value).startswith(f"cannot decode {name}: {ei.value.kind}: ")


def test_truncated_jpeg():
    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (128, 128), dtype=np.uint8)).save(buf, format="JPEG")
    with pytest.raises(DecodeError) as ei:
        decode_image(buf.getvalue()[: len(buf.getvalue()) // 2], "cut.jpg")
    assert ei.value.kind == "truncated"


def test_decode_error_pickles():
    import pickle

    e = pickle.loads(pickle.dumps(DecodeError("s3://b/x.png", "truncated", "cut")))
    assert (e.uri, e.kind, e.reason) == ("s3://b/x.png", "truncated", "cut")
