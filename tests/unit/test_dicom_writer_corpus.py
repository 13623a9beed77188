"""The DICOM writer over the real-file corpus, without Ray: an object pair for every image, valid.

Every DICOM file of pydicom's test data and pydicom-data that decodes is given rows as the job
would make them (one per frame, a mask on some frames) and goes through
:class:`jobs.scoring.dicom_out.DicomWriter`. One file per kind of source (SOP class, photometric
interpretation, single or multi-frame, with or without geometry, Modality and study UID) keeps it
fast; the kinds cover what the whole corpus holds. Each image instance gets its SEG(s) and SR,
valid for ``dciodvfy``; instances that are not images are skipped by SOP class; the few whose own
UIDs are malformed fail with that kind. The SR names the algorithm, its version and what the
result is not.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pydicom
import pytest

from adcore.data import decode_image
from jobs.scoring import dicom_out, dicom_source
from jobs.scoring import schema as S
from tests import real_corpus as corpus
from tests.dicom_checks import dciodvfy_errors

# Sources whose own SOP instance, study or series UID is malformed (a hash, a "999." root):
# nothing valid can reference them.
INVALID_UIDS = {"bad_sequence.dcm", "color-pl.dcm", "color-px.dcm"}
NOT_IMAGES = {"RT Dose Storage", "Segmentation Storage"}


def _kind(ds) -> tuple:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return (
        dicom_source.sop_class_name(ds),
        str(ds.get("PhotometricInterpretation", "")),
        frames > 1,
        "PerFrameFunctionalGroupsSequence" in ds,
        bool(ds.get("FrameOfReferenceUID")),
        bool(ds.get("Modality")),
        bool(ds.get("StudyInstanceUID")),
        bool(ds.get("PixelSpacing")),
    )


def _sources():
    """One decodable DICOM file per kind of source (plus every file known to be refused), with its frames."""
    from adcore.data import DecodeError

    seen, out = set(), []
    for f in corpus.dicom_files():
        data = f.path.read_bytes()
        try:
            frames = decode_image(data, f.name, max_pixels=10**9)
        except DecodeError:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kind = _kind(pydicom.dcmread(f.path, stop_before_pixels=True, force=True))
        base = f.path.name
        if kind in seen and base not in INVALID_UIDS:
            continue
        seen.add(kind)
        out.append((f, data, frames))
    return out


def _rows(uri: str, data: bytes, frames) -> list[dict]:
    rows = []
    for fr in frames:
        h, w = fr.pixels.shape[:2]
        mask = np.zeros((h, w), bool)
        mask[h // 4 : h // 2, w // 3 : w // 2] = fr.index % 2 == 0  # every other frame anomalous
        rows.append(
            {
                "image_uri": uri,
                "frame": fr.index,
                "content_sha256": S.content_sha256(data),
                "status": S.STATUS_OK,
                "modality": fr.modality,
                "score": 0.9 if mask.any() else 0.1,
                "label": int(mask.any()),
                "mask_png": S.encode_mask(mask),
                "mask_area": int(mask.sum()),
            }
        )
    return rows


def test_every_image_of_the_corpus_gets_valid_objects(tmp_path):
    sources = _sources()
    assert len(sources) >= 25, "the corpus lost its variety"
    writer = dicom_out.DicomWriter(str(tmp_path / "pacs"), "RUN", "tiny", "tiny-v1-0123", "0.1.0")
    skipped, failed, images = {}, {}, 0
    for f, data, frames in sources:
        uri = str(f.path)
        assert all(fr.modality is not None for fr in frames)  # a DICOM row: "" when the file has no Modality
        out = writer(pa.Table.from_pylist(_rows(uri, data, frames)))
        names = out.column(dicom_out.DICOM_COLUMN)[0].as_py()
        error = out.column(dicom_out.DICOM_ERROR_COLUMN)[0].as_py()
        if error and error.startswith(dicom_out.SKIPPED_PREFIX):
            skipped[f.path.name] = error[len(dicom_out.SKIPPED_PREFIX) :]
            assert not names
            continue
        if error:
            failed[f.path.name] = error
            continue
        images += 1
        n_frames = len(frames)
        segs = [n for n in names if n.endswith(".seg.dcm")]
        srs = [n for n in names if n.endswith(".sr.dcm")]
        assert len(srs) == 1 and segs, f.path.name
        src = pydicom.dcmread(f.path, stop_before_pixels=True, force=True)
        for name in names:
            blob = (tmp_path / "pacs" / "RUN" / name).read_bytes()
            assert dciodvfy_errors(blob, tmp_path) == [], (f.path.name, name)
            ds = pydicom.dcmread(pa.BufferReader(blob))
            if src.get("StudyInstanceUID"):
                assert ds.StudyInstanceUID == src.StudyInstanceUID  # filed in its source's study
            if name.endswith(".sr.dcm"):
                texts = _texts(ds)
                assert {"tiny", "tiny-v1-0123", dicom_out.INTENDED_USE} <= texts
                refs = {r.ReferencedSOPInstanceUID for e in ds.CurrentRequestedProcedureEvidenceSequence
                        for s in e.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}  # fmt: skip
                assert src.SOPInstanceUID in refs and len(refs) == 1 + len(segs)
            else:
                assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
                assert ds.SourceImageSequence[0].ReferencedSOPClassUID == src.SOPClassUID
        assert len(segs) <= max(1, (n_frames + 1) // 2)
    assert set(skipped.values()) == NOT_IMAGES
    assert failed == dict.fromkeys(INVALID_UIDS, "InvalidSourceUID")
    assert images >= 20


def _texts(ds) -> set[str]:
    out = set()
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "TEXT":
            out.add(item.TextValue)
        out |= _texts(item)
    return out


def test_non_images_are_skipped_by_sop_class_and_never_raise(tmp_path):
    from pydicom.data import get_testdata_file

    path = get_testdata_file("rtdose.dcm")
    data = Path(path).read_bytes()
    frames = decode_image(data, "rtdose.dcm")
    writer = dicom_out.DicomWriter(str(tmp_path / "pacs"), "RUN", "tiny", "tiny-v1-0123", "0.1.0")
    out = writer(pa.Table.from_pylist(_rows(path, data, frames)))
    assert out.column(dicom_out.DICOM_ERROR_COLUMN)[0].as_py() == dicom_out.SKIPPED_PREFIX + "RT Dose Storage"
    assert out.column(dicom_out.DICOM_COLUMN).to_pylist()[0] == []


@pytest.mark.parametrize("name", ["693_UNCI.dcm", "RG1_UNCI.dcm"])
def test_sources_without_usable_geometry_get_a_seg_without_it(name, tmp_path):
    """A CT without its frame of reference, a radiograph with a zero pixel spacing: the SEG has no
    geometry (no frame of reference, plane or pixel measures) and says so with PatientOrientation."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    data = Path(path).read_bytes()
    src = pydicom.dcmread(path, stop_before_pixels=True)
    assert not dicom_source.has_geometry(src)

    writer = dicom_out.DicomWriter(str(tmp_path / "pacs"), "RUN", "tiny", "tiny-v1-0123", "0.1.0")
    out = writer(pa.Table.from_pylist(_rows(path, data, decode_image(data, name))))
    seg_name = next(n for n in out.column(dicom_out.DICOM_COLUMN)[0].as_py() if n.endswith(".seg.dcm"))
    seg = pydicom.dcmread(tmp_path / "pacs" / "RUN" / seg_name)
    assert "FrameOfReferenceUID" not in seg and "PatientOrientation" in seg
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert "PixelMeasuresSequence" not in shared and "PlaneOrientationSequence" not in shared
    assert seg.SOPClassUID == pydicom.uid.SegmentationStorage
    assert seg.SourceImageSequence[0].ReferencedSOPClassUID == src.SOPClassUID
