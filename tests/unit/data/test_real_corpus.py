"""Real files no one here wrote, through ``decode_image`` (the corpus is ``tests/real_corpus.py``).

Every DICOM of pydicom's test data and pydicom-data, nibabel's NIfTI test files and
scikit-image's data folder: nothing but a DecodeError leaves the decoder, every file that
carries pixel data in a syntax pydicom supports decodes (bar those broken on purpose), and
no error reason quotes an identifier of its file.
"""

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from adcore.data import DecodeError, decode_image, decode_path
from adcore.data import decode as decode_mod
from tests import real_corpus as corpus


@pytest.fixture(scope="module")
def outcomes():
    return corpus.decode_all()


def test_corpus_is_what_the_issue_names(outcomes):
    import importlib.metadata as md

    from nibabel.testing import data_path

    paths = {o.file.path.resolve() for o in outcomes}
    pydicom_data = {Path(f.locate()).resolve() for f in md.files("pydicom-data") if f.name.endswith(".dcm")}
    assert len(pydicom_data) >= 68 and pydicom_data <= paths  # every DICOM of pydicom-data
    pydicom_own = Path(pydicom.__file__).parent / "data" / "test_files"
    assert len([p for p in paths if pydicom_own in p.parents]) >= 150  # and pydicom's own test files
    nifti = {p.resolve() for p in Path(data_path).iterdir() if p.name.endswith((".nii", ".nii.gz"))}
    assert len(nifti) >= 8 and nifti <= paths
    import skimage

    images = {p.resolve() for p in (Path(skimage.__file__).parent / "data").glob("*.png")}
    assert len(images) >= 20 and images <= paths


def test_nothing_but_decode_error_leaves_the_decoder(outcomes):
    leaked = {o.file.name: f"{type(o.other).__name__}: {o.other}" for o in outcomes if o.other is not None}
    assert leaked == {}


def test_every_pydicom_syntax_has_an_installed_decoder():
    from pydicom.pixels import get_decoder
    from pydicom.uid import (
        HTJ2K,
        JPEG2000,
        JPEGExtended12Bit,
        JPEGLossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        RLELossless,
    )
    from pydicom.uid import JPEGLSNearLossless as JLSNear

    for ts in (JPEGLossless, JPEGLosslessSV1, JPEGExtended12Bit, JPEGLSLossless, JLSNear, JPEG2000, HTJ2K, RLELossless):
        decoder = get_decoder(ts)
        assert decoder.is_available, (ts.name, decoder.missing_dependencies)


def test_every_file_with_pixels_in_a_supported_syntax_decodes(outcomes):
    failed, checked = {}, 0
    for o in outcomes:
        if o.file.source != "pydicom":
            continue
        facts = corpus.dicom_facts(o.file.path)
        if not (facts.has_pixels and facts.decoder_exists):
            continue
        checked += 1
        expected = corpus.BROKEN_ON_PURPOSE.get(o.file.path.name)
        if o.kind != expected or o.frame_errors:
            failed[o.file.name] = (facts.transfer_syntax, o.kind, o.reason, expected)
    assert failed == {}
    assert checked >= 150


def test_nifti_and_skimage_images_decode(outcomes):
    refused = {o.file.name: o.kind for o in outcomes if o.file.source != "pydicom" and o.kind is not None}
    # Only CIFTI-2 (a connectivity matrix, not an image) and GIF (not a supported format)
    assert all(n.endswith((".dconn.nii", ".gif")) for n in refused), refused
    assert set(refused.values()) <= {"unsupported"}, refused


def test_error_reasons_quote_no_identifier(outcomes):
    for o in outcomes:
        if o.file.source != "pydicom" or o.reason is None:
            continue
        for needle in corpus.dicom_facts(o.file.path).identifiers:
            assert needle not in o.reason, (o.file.name, needle)


def test_bad_vr_is_an_invalid_header_row():
    with pytest.raises(DecodeError) as ei:
        decode_path(get_testdata_file("badVR.dcm"))
    assert ei.value.kind == "invalid_header" and "1A" not in ei.value.reason


@pytest.mark.parametrize(
    "reference, compressed",
    [
        ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm"),  # JPEG-LS lossless
        ("MR_small.dcm", "MR_small_RLE.dcm"),
        ("MR_small.dcm", "MR_small_jp2klossless.dcm"),  # JPEG 2000 lossless
        ("emri_small.dcm", "emri_small_jpeg_ls_lossless.dcm"),  # multi-frame
        ("emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm"),
        ("SC_rgb.dcm", "SC_rgb_jpeg_gdcm.dcm"),  # JPEG Lossless SV1 (Process 14), RGB
        ("JPEG2000_UNC.dcm", "JPEG2000.dcm"),
    ],
)
def test_lossless_syntaxes_decode_like_their_uncompressed_original(reference, compressed):
    ref, got = decode_path(get_testdata_file(reference)), decode_path(get_testdata_file(compressed))
    assert len(ref) == len(got)
    for a, b in zip(ref, got):  # same stored values, same modality LUT / VOI handling
        np.testing.assert_array_equal(a.pixels, b.pixels)


def test_12bit_jpeg_extended_matches_pydicom_reference_values():
    data = Path(get_testdata_file("JPGExtended.dcm")).read_bytes()
    stored = decode_mod._gdcm_stack(data, 1, 1024, 256)
    assert stored is not None and stored.dtype == np.uint16
    assert (stored[0, 420, 140], stored[0, 230, 120]) == (244, 95)  # pydicom's pixel reference for this file
    frame = decode_image(data, "jpgext.dcm")[0]
    assert frame.pixels.shape == (1024, 256) and frame.pixels.std() > 0.01


def _dicom_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def test_one_bad_frame_of_a_compressed_volume_fails_that_frame_only():
    from pydicom.encaps import encapsulate, generate_frames

    path = get_testdata_file("emri_small_jpeg_2k_lossless.dcm")
    ds = pydicom.dcmread(path)
    frames = list(generate_frames(ds.PixelData, number_of_frames=10))
    frames[3] = b"\xff\x4f\xff\x51" + b"\x00" * (len(frames[3]) - 4)  # a J2K start, then nothing valid
    ds.PixelData = encapsulate(frames)
    data = _dicom_bytes(ds)
    got = decode_image(data, "vol.dcm", frame_errors=True)
    assert [f.index for f in got] == list(range(10))
    assert [f.index for f in got if f.error is not None] == [3]
    assert got[3].error.kind == "corrupt" and got[3].pixels.size == 0 and "frame 3" in got[3].error.reason
    clean = decode_path(path)
    for i in (0, 4, 9):
        np.testing.assert_array_equal(got[i].pixels, clean[i].pixels)
    assert [f.index for f in decode_image(data, "vol.dcm")] == [0, 1, 2, 4, 5, 6, 7, 8, 9]  # default: left out


def test_a_truncated_native_volume_keeps_its_whole_frames():
    data = Path(get_testdata_file("emri_small.dcm")).read_bytes()
    frame_bytes = 64 * 64 * 2
    got = decode_image(data[: len(data) - int(2.5 * frame_bytes)], "cut.dcm", frame_errors=True)
    assert [f.index for f in got if f.error is None] == list(range(7))
    assert [(f.index, f.error.kind) for f in got if f.error is not None] == [(i, "truncated") for i in (7, 8, 9)]


def test_a_volume_whose_every_frame_fails_is_one_file_error():
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(get_testdata_file("emri_small_jpeg_2k_lossless.dcm"))
    n = len(list(generate_frames(ds.PixelData, number_of_frames=10)))
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60] * n)
    with pytest.raises(DecodeError) as ei:
        decode_image(_dicom_bytes(ds), "dead.dcm", frame_errors=True)
    assert ei.value.kind == "corrupt"


def test_one_bad_page_of_a_tiff_fails_that_page_only(tmp_path):
    import tifffile

    stack = np.random.default_rng(0).integers(0, 255, (3, 32, 32), dtype=np.uint8)
    path = tmp_path / "pages.tif"
    tifffile.imwrite(path, stack, photometric="minisblack", compression="zlib")
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[1]
        off, size = page.dataoffsets[0], page.databytecounts[0]
    data[off : off + size] = b"\x00" * size  # page 1's zlib stream is garbage
    got = decode_image(bytes(data), "pages.tif", frame_errors=True)
    assert [(f.index, f.error is not None) for f in got] == [(0, False), (1, True), (2, False)]
    np.testing.assert_allclose(got[2].pixels, stack[2] / 255.0, atol=1e-6)


@pytest.mark.parametrize("exc", [KeyError("Doe^Jane"), IndexError("PID-4242"), ZeroDivisionError(), RecursionError()])
def test_any_library_exception_becomes_a_decode_error(monkeypatch, exc):
    def boom(*args, **kwargs):
        raise exc

    monkeypatch.setattr(decode_mod, "_decode_pil", boom)
    monkeypatch.setattr(decode_mod, "_decode_dicom", boom)
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
    for data, name in ((png, "x.png"), (Path(get_testdata_file("CT_small.dcm")).read_bytes(), "ct.dcm")):
        with pytest.raises(DecodeError) as ei:
            decode_image(data, name)
        assert ei.value.kind == "corrupt" and type(exc).__name__ in ei.value.reason
        assert "Doe" not in str(ei.value) and "PID" not in str(ei.value)


def test_memory_error_is_too_large(monkeypatch):
    def boom(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(decode_mod, "_decode_tiff", boom)
    with pytest.raises(DecodeError) as ei:
        decode_image(b"II*\x00" + b"\x00" * 16, "x.tif")
    assert ei.value.kind == "too_large"
