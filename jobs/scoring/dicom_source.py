"""What a source instance offers a DICOM Segmentation, and the view of it highdicom is given.

Real archives hold instances that are not images (RT Dose, segmentations, parametric maps) and
images that lack what the SEG and SR IODs copy from them: a Type 2 patient attribute, a Modality,
a usable frame of reference (absent, or equal to the study's UID), a positive pixel spacing. The
functions here decide, per instance:

* :func:`skip_reason`: the SOP class name of an instance that is not an image a SEG can reference
  (the job counts it as skipped; never an exception);
* :func:`complete`: fills what DICOM requires of the objects' patient, study and series modules
  (Type 2 attributes empty, a missing study or series UID derived from the instance's UID), in
  place on the job's own parsed copy;
* :func:`has_geometry`: whether the SEG can carry the source's patient coordinate system (plane
  positions, orientation, pixel measures); otherwise each frame gets a SEG without geometry built
  from :func:`flat_view` and tied back to the source by :func:`restore_references`.

Nothing here logs or returns a value read from the file but standard SOP class names.
"""

from __future__ import annotations

import re

from pydicom.dataset import Dataset

# Images without "Image Storage" in their SOP class name.
EXTRA_IMAGE_CLASSES = ("Enhanced US Volume Storage",)
# Type 2 attributes of the Patient, General Study and General Series modules both objects copy.
TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
# A UID: dot-separated numbers without leading zeros (PS3.5 9.1).
UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
# DeidentificationMethod for a source that says its identity was removed but not how.
UID_ROOTS = ("0", "1", "2")  # ITU-T, ISO, joint: the only roots a UID may start with
NO_METHOD = "not stated by the source image"
UNKNOWN_MODALITY = "OT"  # DICOM's "Other": Modality is Type 1 in the General Series module
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Left out of the flat view: pixels, frames and every spatial attribute highdicom would copy.
NOT_IN_FLAT_VIEW = PIXEL_KEYWORDS + (
    "NumberOfFrames",
    "FrameIncrementPointer",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "SliceLocation",
)
# Single-frame image class the flat view poses as: its IOD asks for no frame of reference.
FLAT_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage


def sop_class_name(ds: Dataset) -> str:
    """The standard name of the instance's SOP class (never a raw value from the file)."""
    from pydicom.uid import UID

    uid = ds.get("SOPClassUID") or getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPClassUID")
    try:
        name = UID(str(uid)).name if uid else ""
    except Exception:  # noqa: BLE001 (a malformed value: no name)
        name = ""
    return name if name and name != str(uid) else "unknown SOP class"


def skip_reason(ds: Dataset) -> str | None:
    """The SOP class name when the instance is no image a Segmentation can reference, else None."""
    name = sop_class_name(ds)
    if "Image Storage" in name or name in EXTRA_IMAGE_CLASSES:
        return None
    return name


def _uid(*parts: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(prefix=None, entropy_srcs=[str(p) for p in parts])


def complete(ds: Dataset) -> None:
    """Fills, in place, what the objects copy from the source and DICOM requires of it.

    Raises:
        InvalidSourceUID: the instance's own UIDs are missing or malformed (nothing valid could
            reference it).
    """
    if "SOPClassUID" not in ds and "MediaStorageSOPClassUID" in getattr(ds, "file_meta", Dataset()):
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    for kw in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = ds.get(kw)
        if (value or kw == "SOPInstanceUID") and not _valid_uid(value):
            raise InvalidSourceUID(f"the source's {kw} is missing or not a valid UID")
    _conform_dates(ds)
    if str(ds.get("PatientIdentityRemoved", "")).upper() == "YES" and not (
        ds.get("DeidentificationMethod") or ds.get("DeidentificationMethodCodeSequence")
    ):
        ds.DeidentificationMethod = NO_METHOD  # Type 1C once identity removal is claimed
    for kw in TYPE2:
        if kw not in ds:
            setattr(ds, kw, "")
    if not ds.get("Modality"):
        ds.Modality = UNKNOWN_MODALITY
    # A study or series UID the source lacks: derived from its instance UID, the same for every run.
    for kw in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not ds.get(kw):
            setattr(ds, kw, _uid(ds.SOPInstanceUID, kw))


class InvalidSourceUID(ValueError):
    """The source's SOP instance, study or series UID is missing or malformed."""


def _valid_uid(value) -> bool:
    text = str(value or "")
    return 0 < len(text) <= 64 and UID_PATTERN.fullmatch(text) is not None and text.split(".")[0] in UID_ROOTS


def _conform_dates(ds: Dataset) -> None:
    """Top-level DA/TM values in an old form ("15:18:59", "2001.02.03") rewritten, unusable ones emptied."""
    from pydicom.valuerep import DA, TM

    for elem in ds:
        if elem.VR not in ("DA", "TM") or elem.VM != 1 or not elem.value:
            continue
        kind = DA if elem.VR == "DA" else TM
        text = str(elem.value).strip().replace(":" if elem.VR == "TM" else ".", "")
        try:
            kind(text)
        except ValueError:
            text = ""
        elem.value = text


def multi_frame_iod(ds: Dataset) -> bool:
    """Whether the source's IOD has frames to reference (a single-frame class with NumberOfFrames has none)."""
    from highdicom.utils import is_multiframe_image

    try:
        return bool(is_multiframe_image(ds))
    except Exception:  # noqa: BLE001 (a class highdicom does not know: referenced as a whole)
        return False


def _positive(values, n: int) -> bool:
    try:
        return values is not None and len(values) == n and all(float(v) > 0 for v in values)
    except (TypeError, ValueError):
        return False


def _has_for(ds: Dataset) -> bool:
    """A frame of reference worth the name: set, and not the study's own UID (a copy-paste error)."""
    uid = str(ds.get("FrameOfReferenceUID", "") or "")
    return bool(uid) and uid != str(ds.get("StudyInstanceUID", ""))


def has_geometry(ds: Dataset) -> bool:
    """Whether the SEG can carry the source's geometry (highdicom's spatial path, without guessing)."""
    if not _has_for(ds):
        return False
    if "PerFrameFunctionalGroupsSequence" in ds:  # an enhanced multi-frame image
        try:
            shared = ds.SharedFunctionalGroupsSequence[0]
            measures = shared.PixelMeasuresSequence[0]
            per = ds.PerFrameFunctionalGroupsSequence
            oriented = "PlaneOrientationSequence" in shared or all("PlaneOrientationSequence" in f for f in per)
            placed = all("PlanePositionSequence" in f for f in per) or "PlanePositionSequence" in shared
        except (AttributeError, IndexError, KeyError, TypeError):
            return False
        return (
            oriented
            and placed
            and _positive(measures.get("PixelSpacing"), 2)
            and _positive([measures.get("SliceThickness")], 1)
        )
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:  # a multi-frame image without functional groups
        return False
    return (
        "ImagePositionPatient" in ds
        and "ImageOrientationPatient" in ds
        and _positive(ds.get("PixelSpacing"), 2)
        and _positive([ds.get("SliceThickness")], 1)
    )


def flat_view(ds: Dataset) -> Dataset:
    """A single-frame view of the source without geometry, posing as a Secondary Capture image.

    highdicom builds a SEG without a frame of reference only for a single frame of an IOD that
    does not require one; :func:`restore_references` then puts the source's SOP class (and frame
    number) back into the SEG's references.
    """
    view = Dataset()
    for elem in ds:  # elements shared with ``ds``: only those set below are new ones
        if elem.keyword not in NOT_IN_FLAT_VIEW and elem.keyword != "SOPClassUID":
            view.add(elem)
    view.file_meta = ds.file_meta
    view.SOPClassUID = FLAT_CLASS
    return view


def restore_references(seg: Dataset, src: Dataset, frame_number: int | None) -> None:
    """Points the SEG's references to ``src`` at its real SOP class, and at ``frame_number`` (1-based;
    only for a multi-frame IOD)."""
    if not multi_frame_iod(src):
        frame_number = None
    sop_uid, sop_class = src.SOPInstanceUID, src.SOPClassUID

    def walk(ds: Dataset, in_source_seq: bool) -> None:
        if ds.get("ReferencedSOPInstanceUID") == sop_uid:
            ds.ReferencedSOPClassUID = sop_class
            if in_source_seq and frame_number is not None:
                ds.ReferencedFrameNumber = frame_number
        for elem in ds:
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item, elem.keyword == "SourceImageSequence")

    walk(seg, False)


def patient_orientation(src: Dataset) -> list[str] | str:
    """The source's PatientOrientation when it is two values, else empty (Type 2C in a SEG without geometry)."""
    value = src.get("PatientOrientation")
    try:
        if value is not None and len(value) == 2 and all(str(v) for v in value):
            return [str(v) for v in value]
    except TypeError:
        pass
    return ""
