"""The real-file corpus: image files no one here wrote, shipped by installed packages.

* every DICOM file of pydicom's test data and of ``pydicom-data`` (what
  ``pydicom.data.get_testdata_files()`` resolves: files with the ``DICM`` prefix, and ``.dcm``
  files without a preamble),
* the NIfTI files (``.nii``, ``.nii.gz``) of nibabel's test data,
* the images in scikit-image's data folder, when scikit-image is installed.

``python -m tests.real_corpus`` prints what :func:`adcore.data.decode_image` makes of them,
per format and per DICOM transfer syntax (the table in docs/data.md).
"""

from __future__ import annotations

import collections
import gzip
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

DICOM_PREFIX_AT = 128
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp")

# pydicom's own test files that are broken on purpose, although they carry pixel data in a
# syntax pydicom supports: name -> the DecodeError kind they must give.
BROKEN_ON_PURPOSE = {
    "MR_truncated.dcm": "truncated",  # pixel data cut short
    "JPEG2000-embedded-sequence-delimiter.dcm": "corrupt",  # a sequence delimiter inside the codestream
    "badVR.dcm": "invalid_header",  # NumberOfFrames (IS) holds "1A"
    "nested_priv_SQ.dcm": "corrupt",  # Pixel Data but no Rows/Columns
}

# Attributes whose values identify a patient or a study: never in an error, a row or a log.
IDENTIFIER_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientAddress",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
)


@dataclass(frozen=True)
class CorpusFile:
    source: str  # "pydicom", "nibabel" or "skimage"
    path: Path
    name: str  # unique flat file name for a test folder: "<source>__<relative path, / as __>"


@dataclass(frozen=True)
class DicomFacts:
    """What pydicom itself says about a file, independently of adcore."""

    transfer_syntax: str | None  # UID name, None without one
    has_pixels: bool
    decoder_exists: bool  # pydicom has a pixel decoder for the syntax
    identifiers: frozenset[str]


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(DICOM_PREFIX_AT + 4)
    return head[DICOM_PREFIX_AT:] == b"DICM" or path.suffix.lower() == ".dcm"


def _flat(source: str, root: Path, path: Path) -> str:
    return f"{source}__" + "__".join(path.relative_to(root).parts)


def dicom_files() -> list[CorpusFile]:
    from pydicom.data import get_testdata_files

    paths = sorted({Path(p) for p in get_testdata_files() if os.path.isfile(p)})
    paths = [p for p in paths if _is_dicom(p)]
    root = Path(os.path.commonpath(paths))  # pydicom's own test files and pydicom-data's are two folders
    out = [CorpusFile("pydicom", p, _flat("pydicom", root, p)) for p in paths]
    names = [f.name for f in out]
    assert len(names) == len(set(names)), "corpus names must be unique"
    return out


def nifti_files() -> list[CorpusFile]:
    from nibabel.testing import data_path

    root = Path(data_path)
    paths = sorted(p for p in root.iterdir() if p.is_file() and p.name.endswith((".nii", ".nii.gz")))
    return [CorpusFile("nibabel", p, _flat("nibabel", root, p)) for p in paths]


def skimage_files() -> list[CorpusFile]:
    try:
        import skimage
    except ImportError:
        return []
    root = Path(skimage.__file__).parent / "data"
    paths = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [CorpusFile("skimage", p, _flat("skimage", root, p)) for p in paths]


def all_files() -> list[CorpusFile]:
    return dicom_files() + nifti_files() + skimage_files()


def dicom_facts(path: Path) -> DicomFacts:
    import pydicom
    from pydicom.pixels import get_decoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception:
            return DicomFacts(None, False, False, frozenset())
        ts = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
        try:
            get_decoder(ts)
            decoder_exists = ts is not None
        except Exception:
            decoder_exists = False
        has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
        ids = set()
        for kw in IDENTIFIER_KEYWORDS:
            try:
                value = ds.get(kw)
            except Exception:
                continue
            values = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
            for v in values:
                text = str(v or "").strip()
                if len(text) >= 6:  # shorter values ("1", "Anon") also occur in innocent text
                    ids |= {text, text.replace("^", " ")}
    return DicomFacts(ts.name if ts is not None else None, has_pixels, decoder_exists, frozenset(ids))


@dataclass
class Outcome:
    file: CorpusFile
    frames: int = 0  # frames decoded
    frame_errors: int = 0  # frames that failed alone
    kind: str | None = None  # DecodeError kind when the whole file failed
    reason: str | None = None
    other: BaseException | None = None  # anything but a DecodeError: a bug


def decode_all(files: list[CorpusFile] | None = None) -> list[Outcome]:
    from adcore.data import DecodeError, decode_image

    out = []
    for f in all_files() if files is None else files:
        o = Outcome(f)
        try:
            frames = decode_image(f.path.read_bytes(), f.name, frame_errors=True)
        except DecodeError as e:
            o.kind, o.reason = e.kind, e.reason
        except Exception as e:  # noqa: BLE001 - recorded, the test fails on it
            o.other = e
        else:
            o.frame_errors = sum(fr.error is not None for fr in frames)
            o.frames = len(frames) - o.frame_errors
        out.append(o)
    return out


def fmt_of(f: CorpusFile) -> str:
    if f.source == "pydicom":
        return "DICOM"
    if f.source == "nibabel":
        data = f.path.read_bytes()
        head = gzip.decompress(data)[:4] if data[:2] == b"\x1f\x8b" else data[:4]
        gz = " (gzip)" if data[:2] == b"\x1f\x8b" else ""
        return ("NIfTI-2" if 540 in struct.unpack("<i", head) + struct.unpack(">i", head) else "NIfTI-1") + gz
    return f.path.suffix.lower().lstrip(".").replace("jpeg", "jpg").upper()


def summary(outcomes: list[Outcome]) -> str:
    """A Markdown table: decoded / refused (by kind), per format and per DICOM transfer syntax."""
    rows: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for o in outcomes:
        key = fmt_of(o.file)
        if key == "DICOM":
            facts = dicom_facts(o.file.path)
            if not facts.has_pixels:
                key = "DICOM without pixel data (DICOMDIR, SR, RT, pixel-less test files)"
            else:
                key = f"DICOM, {facts.transfer_syntax or 'no transfer syntax'}"
        rows[key]["files"] += 1
        if o.kind is None and o.other is None:
            rows[key]["decoded"] += 1
            rows[key]["frames"] += o.frames
        else:
            rows[key][o.kind or "exception"] += 1
    lines = ["| input | files | decoded (frames) | refused, by kind |", "|---|---:|---:|---|"]
    for key in sorted(rows):
        c = rows[key]
        refused = ", ".join(f"{k} {n}" for k, n in sorted(c.items()) if k not in ("files", "decoded", "frames"))
        lines.append(f"| {key} | {c['files']} | {c['decoded']} ({c['frames']}) | {refused or '-'} |")
    total = collections.Counter(o.kind or ("exception" if o.other else "decoded") for o in outcomes)
    lines.append("")
    lines.append(f"{len(outcomes)} files: " + ", ".join(f"{k} {n}" for k, n in sorted(total.items())))
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(decode_all()))
