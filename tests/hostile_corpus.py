"""Hostile inputs made at test time from the real corpus (``tests/real_corpus.py``).

Three kinds of file, all written into one folder by :func:`write_corpus`:

* damaged copies of real files (PNG, JPEG, TIFF, DICOM, NIfTI): truncated at several
  offsets, and with bits flipped at seeded random places (half of them inside the header);
* header fields at extremes: DICOM Rows, Columns, NumberOfFrames, BitsAllocated; NIfTI dims;
  PNG IHDR width/height (with the chunk's CRC fixed, so the header is "valid"); JPEG frame size;
* what a scoring job must refuse before reading or decoding (each with the error kind it must
  give): a 714-byte ``.nii.gz`` of 2x2x20000 voxels, a 1x1 DICOM of many frames, a multi-page
  TIFF of more pages than frames allowed, a file larger than the job's ``--max-file-bytes``, a
  sparse file of 64 GiB, a FIFO, a Unix socket, a character device (where ``mknod`` is allowed),
  links to ``/dev/zero``, to a file outside the folder and to nothing.

Nothing random outside a seeded ``numpy.random.Generator``: the same seed writes the same files.
"""

from __future__ import annotations

import gzip
import io
import os
import socket
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests import real_corpus

# Real files the damaged copies start from: small ones of every format and of several DICOM encodings.
SEEDS = (
    "pydicom:CT_small.dcm",  # explicit VR little endian, 16-bit
    "pydicom:MR_small.dcm",
    "pydicom:MR_small_RLE.dcm",
    "pydicom:JPEG2000.dcm",
    "pydicom:JPEG-lossy.dcm",
    "pydicom:MR_small_jpeg_ls_lossless.dcm",
    "pydicom:emri_small_jpeg_2k_lossless.dcm",  # multi-frame, encapsulated
    "pydicom:emri_small.dcm",  # multi-frame, native
    "pydicom:SC_rgb_rle.dcm",
    "pydicom:rtdose.dcm",
    "nibabel:anatomical.nii",
    "nibabel:example_nifti2.nii.gz",
    "nibabel:functional.nii",
    "skimage:camera.png",
    "skimage:chessboard_RGB.png",
    "skimage:microaneurysms.png",
    "skimage:rocket.jpg",
    "skimage:multipage.tif",
    "skimage:multipage_rgb.tif",
)
TRUNCATE_AT = (0.02, 0.1, 0.3, 0.5, 0.8, 0.98)  # fractions of the file's length
FLIPS = 6  # bit-flipped copies per seed: half in the first KiB (the header), half anywhere
HEADER_BYTES = 1024
SPARSE_BYTES = 64 * 2**30


@dataclass(frozen=True)
class Expect:
    """What the job must make of one entry: a refusal kind, or (None) what the decoder makes of it."""

    name: str
    kind: str | None = None


def seed_files() -> dict[str, Path]:
    """Seed name -> path in the installed packages."""
    wanted = {tuple(s.split(":", 1)) for s in SEEDS}
    found = {(f.source, f.path.name): f.path for f in real_corpus.all_files()}
    missing = wanted - set(found)
    assert not missing, f"seed files missing from the real corpus: {sorted(missing)}"
    return {f"{source}__{name}": found[(source, name)] for source, name in sorted(wanted)}


def damaged(seeds: dict[str, Path], rng: np.random.Generator) -> dict[str, bytes]:
    """Truncated and bit-flipped copies of every seed, by file name (the seed's suffix kept)."""
    out = {}
    for name, path in seeds.items():
        data = path.read_bytes()
        stem, suffix = _split(name)
        for f in TRUNCATE_AT:
            out[f"trunc{int(f * 100):02d}__{stem}{suffix}"] = data[: max(1, int(len(data) * f))]
        for i in range(FLIPS):
            buf = bytearray(data)
            span = min(len(buf), HEADER_BYTES) if i % 2 == 0 else len(buf)
            for pos in rng.integers(0, span, size=1 + i):
                buf[pos] ^= 1 << int(rng.integers(0, 8))
            out[f"flip{i}__{stem}{suffix}"] = bytes(buf)
    return out


def _split(name: str) -> tuple[str, str]:
    suffix = ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]
    return name[: -len(suffix)], suffix


# ----------------------------------------------------------------------------- header extremes
def dicom_extremes(seeds: dict[str, Path]) -> dict[str, bytes]:
    """CT_small and the native multi-frame file with Rows, Columns, NumberOfFrames, BitsAllocated at extremes."""
    import pydicom

    values = {
        "Rows": (0, 1, 65535),
        "Columns": (0, 1, 65535),
        "NumberOfFrames": ("0", "-1", "2147483647"),
        "BitsAllocated": (0, 1, 7, 64, 65535),
    }
    out = {}
    for seed in ("pydicom__CT_small.dcm", "pydicom__emri_small.dcm"):
        for keyword, options in values.items():
            for v in options:
                ds = pydicom.dcmread(seeds[seed])
                setattr(ds, keyword, v)
                out[f"extreme_{keyword}_{v}__{seed}"] = _dicom_bytes(ds)
    return out


def _dicom_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


def dicom_many_frames(n_frames: int) -> bytes:
    """A 1x1 8-bit DICOM of ``n_frames`` frames (one byte each)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["hostile", str(n_frames)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows = ds.Columns = 1
    ds.NumberOfFrames = n_frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(n_frames + n_frames % 2)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def nifti_bytes(shape: tuple[int, ...], gz: bool = True, dtype=np.uint8) -> bytes:
    """A NIfTI-1 volume of zeros of ``shape`` (the 2x2x20000 one gzips to about 700 bytes)."""
    import nibabel as nib

    img = nib.Nifti1Image(np.zeros(shape, dtype), np.eye(4))
    raw = img.to_bytes()
    return gzip.compress(raw, mtime=0) if gz else raw


def nifti_extremes(seeds: dict[str, Path]) -> dict[str, bytes]:
    """anatomical.nii with dim[0..4] at extremes (the header edited in place, the data left as is)."""
    data = seeds["nibabel__anatomical.nii"].read_bytes()
    little = struct.unpack("<i", data[:4])[0] == 348
    end = "<" if little else ">"
    cases = {
        "ndim0": (0, 0),
        "ndim8": (0, 8),
        "x0": (1, 0),
        "xneg": (1, -5),
        "xmax": (1, 32767),
        "ymax": (2, 32767),
        "zmax": (3, 32767),
        "tmax": (4, 32767),
    }
    out = {}
    for label, (index, value) in cases.items():
        buf = bytearray(data)
        struct.pack_into(end + "h", buf, 40 + 2 * index, value)  # dim[8] (int16) starts at byte 40
        if label == "tmax":
            struct.pack_into(end + "h", buf, 40, 4)
        out[f"extreme_dim_{label}__anatomical.nii"] = bytes(buf)
    return out


def png_extremes(seeds: dict[str, Path]) -> dict[str, bytes]:
    """camera.png with IHDR width/height at extremes, the IHDR CRC recomputed."""
    data = seeds["skimage__camera.png"].read_bytes()
    out = {}
    for w, h in ((0, 512), (512, 0), (1, 2**31 - 1), (65535, 65535), (2**31 - 1, 2**31 - 1), (1, 1)):
        buf = bytearray(data)
        struct.pack_into(">II", buf, 16, w, h)  # IHDR data starts at 16: width, height
        struct.pack_into(">I", buf, 29, zlib.crc32(bytes(buf[12:29])))  # CRC of type + 13 data bytes
        out[f"extreme_ihdr_{w}x{h}__camera.png"] = bytes(buf)
    return out


def jpeg_extremes(seeds: dict[str, Path]) -> dict[str, bytes]:
    """rocket.jpg with its frame header (SOF) announcing extreme sizes."""
    data = seeds["skimage__rocket.jpg"].read_bytes()
    sof = next(data.find(m) for m in (b"\xff\xc0", b"\xff\xc2", b"\xff\xc1") if data.find(m) > 0)
    out = {}
    for h, w in ((0, 640), (65535, 65535), (1, 1)):
        buf = bytearray(data)
        struct.pack_into(">HH", buf, sof + 5, h, w)  # marker(2) length(2) precision(1), then height, width
        out[f"extreme_sof_{h}x{w}__rocket.jpg"] = bytes(buf)
    return out


def tiff_pages(n_pages: int) -> bytes:
    """A multi-page TIFF of ``n_pages`` 1x1 pages."""
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((n_pages, 1, 1), np.uint8), photometric="minisblack")
    return buf.getvalue()


# ----------------------------------------------------------------------------- the folder
def write_corpus(folder: Path, outside: Path, *, max_file_bytes: int, max_frames: int, seed: int = 0):
    """Writes the hostile corpus into ``folder``; returns the entries with the kind each must give.

    ``outside`` is a folder beside it (the target of a link leading out). ``max_file_bytes`` and
    ``max_frames`` are the job's bounds the refusals are made for.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    outside.mkdir(parents=True, exist_ok=True)
    seeds = seed_files()
    files: dict[str, bytes] = {}
    for name, path in seeds.items():  # the seeds themselves: good files, scored frame by frame
        files[name] = path.read_bytes()
    for make in (damaged,):
        files.update(make(seeds, rng))
    for make in (dicom_extremes, nifti_extremes, png_extremes, jpeg_extremes):
        files.update(make(seeds))
    expect = [Expect(n) for n in files]
    refused = {
        "bomb__2x2x20000.nii.gz": (nifti_bytes((2, 2, 20000)), "too_many_frames"),
        "bomb__2x2x10x1000_4d.nii.gz": (nifti_bytes((2, 2, 10, 1000)), "too_many_frames"),
        "bomb__1x1_frames.dcm": (dicom_many_frames(max_frames * 64), "too_many_frames"),
        "bomb__1x1_pages.tif": (tiff_pages(max_frames + 1), "too_many_frames"),
        "big__over_max_file_bytes.png": (files["skimage__camera.png"] + bytes(max_file_bytes), "too_large"),
    }
    for name, (data, kind) in refused.items():
        files[name] = data
        expect.append(Expect(name, kind))
    for name, data in files.items():
        (folder / name).write_bytes(data)
    with open(folder / "sparse__huge.dcm", "wb") as f:  # a hole: nothing on disk, 64 GiB listed
        f.truncate(SPARSE_BYTES)
    expect.append(Expect("sparse__huge.dcm", "too_large"))
    expect += special_entries(folder, outside, "skimage__camera.png")
    return expect


def special_entries(folder: Path, outside: Path, good: str) -> list[Expect]:
    """FIFO, socket, device and links: entries that are not regular files inside ``folder``.

    ``good`` names a regular file in ``folder``: one link inside leads to it (read as that file).
    """
    out = []
    os.mkfifo(folder / "special__fifo.dcm")
    out.append(Expect("special__fifo.dcm", "not_a_file"))
    (folder / "special__zero.dcm").symlink_to("/dev/zero")
    out.append(Expect("special__zero.dcm", "not_a_file"))
    target = outside / "elsewhere.png"
    target.write_bytes((folder / good).read_bytes())
    (folder / "special__link_out.png").symlink_to(target)
    out.append(Expect("special__link_out.png", "not_a_file"))
    (folder / "special__link_nowhere.png").symlink_to(folder / "no-such-file.png")
    out.append(Expect("special__link_nowhere.png", "not_a_file"))
    (folder / "special__link_folder").symlink_to(outside)
    out.append(Expect("special__link_folder", "not_a_file"))
    (folder / "special__link_in.png").symlink_to(good)  # inside: read as the file it names
    out.append(Expect("special__link_in.png"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cwd = os.getcwd()
    try:  # a relative bind: socket paths are limited to about 100 bytes
        os.chdir(folder)
        sock.bind("special__socket.png")
    finally:
        os.chdir(cwd)
        sock.close()
    out.append(Expect("special__socket.png", "not_a_file"))
    try:
        os.mknod(folder / "special__device.dcm", 0o600 | 0o020000, os.makedev(1, 5))  # a /dev/zero of its own
    except (PermissionError, OSError):
        pass  # no CAP_MKNOD here: the link to /dev/zero stands for devices
    else:
        out.append(Expect("special__device.dcm", "not_a_file"))
    return out
