"""DICOM outputs for a PACS: a Segmentation and a TID 1500 measurement report per scored DICOM instance.

:class:`DicomWriter` is a Ray Data stage after ``Postprocess`` (CPU tasks). For the rows of
DICOM inputs scored ``ok`` it re-reads the source file from its ``image_uri``, builds with
highdicom

* a Segmentation (BINARY, one segment "anomaly": the rows' masks, at the source's own
  resolution), referencing its source instance (and frames), and
* a Comprehensive 3D SR holding a TID 1500 measurement report: per frame the calibrated
  score, the label (SCT Abnormal / Normal), the mask area in pixels (and in mm² when the
  source has a pixel spacing), the model name and version (the algorithm and the observing
  device), with the source and the Segmentation as evidence,

and writes them under ``<dicom-output>/<run_id>/`` as ``<key>.seg.dcm`` / ``<key>.sr.dcm``,
``key`` = the first 20 hex digits of SHA-256(image_uri) (plus ``-f<first>-<last>`` for a
multi-frame source): deterministic, so a retried task overwrites its own files, and nothing
identifying in the name. Their UIDs are derived from the model version, the file's content,
its key and the frames (``2.25.`` UUID UIDs): the same result gets the same UIDs, so a run
repeated after a crash replaces its objects in a PACS instead of adding copies. A SEG series and
an SR series per source series and model version.

A multi-frame source whose frames are split over several model batches gets one SEG + SR per
batch (frame range in the name): each SEG holds the anomalous frames of its range (empty frames
are omitted, highdicom's default), each SR the measurements of every frame of its range. A
split range with no anomalous pixel gets no SEG (an all-empty SEG would claim every frame of the
source), only its SR.

Sources without usable geometry (no frame of reference, or one equal to the study UID; no
positive pixel spacing or slice thickness; a multi-frame image without functional groups) get
SEGs without any (``jobs.scoring.dicom_source``): one per anomalous frame (``<key>-f<n>-<n>``
for a multi-frame source; the first frame's, empty, for an instance without anomalous pixels).
Instances that are not images (RT Dose, a SEG) are skipped, counted by SOP class.

With a ``pacs`` sender each object is stored in the PACS (DICOMweb STOW-RS or DICOM C-STORE) as
soon as it is written, in this task (``jobs.scoring.pacs``); the objects the PACS did not take are passed on
in ``PACS_UNSENT_COLUMN`` for the next run to send.

The objects carry the source's patient and study modules, as DICOM requires: they go only
under ``--dicom-output``, never into the Parquet, and nothing here logs a value read from
them. The table passes on with the written paths (relative to the run's folder) in
``DICOM_COLUMN`` and failures in ``DICOM_ERROR_COLUMN`` (both on the first row of each
object pair, counted into the manifest by ``jobs.scoring.sink``, dropped before Parquet).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from adcore import storage
from jobs.scoring import dicom_source, dicomweb, qido
from jobs.scoring import schema as S

log = logging.getLogger("jobs.score")

DICOM_COLUMN = "_dicom_objects"  # list<string>: objects written for the row's instance (first row of a group)
DICOM_ERROR_COLUMN = "_dicom_error"  # string: why an instance's objects were not written (first row of a group)
SKIPPED_PREFIX = "skipped: "  # in DICOM_ERROR_COLUMN: not an image a SEG references (its SOP class follows)
PACS_SENT_COLUMN = "_pacs_sent"  # int: objects of the instance stored in the PACS (with --pacs-url)
PACS_UNSENT_COLUMN = "_pacs_unsent"  # list<string>: its objects the PACS did not take (retried by the next run)
OBJECT_LISTS = "_objects"  # in each run's folder: one list of objects per write task (write_object_list)
RUN_MARKER = "_run.json"  # in each run's folder: which scoring output it belongs to (for cleanup)
SEG_SERIES_NUMBER = 9701  # series numbers of the derived series: high, to sort after the source series
SR_SERIES_NUMBER = 9702
KEY_HEX = 20  # hex digits of SHA-256(image_uri) in object names (80 bits: no collision in any archive)
MANUFACTURER = "adcore"
# Carried in both objects' algorithm identification (SEG: Algorithm Parameters; SR: TID 4019's
# Algorithm Parameter), where a PACS viewer shows what produced a finding.
INTENDED_USE = "Research use only: not a medical device and not a diagnosis; above-threshold means unusual"
# Private codes (coding scheme designator "99" + name: DICOM PS3.16 8.2) for what no standard code names.
CODING_SCHEME = "99ADCORE"


def _codes():
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    return {
        "score": Code("anomaly-score", CODING_SCHEME, "Anomaly score"),
        "area_px": Code("anomaly-area", CODING_SCHEME, "Anomaly mask area"),
        "no_units": Code("1", "UCUM", "no units"),
        "pixels": Code("{pixels}", "UCUM", "pixels"),
        "mm2": codes.UCUM.SquareMillimeter,
        "area": codes.SCT.Area,
        "finding": codes.DCM.Finding,
        "abnormal": codes.SCT.Abnormal,
        "normal": codes.SCT.Normal,
        "category": codes.SCT.MorphologicallyAbnormalStructure,
        "property": codes.SCT.Lesion,
        "ai": codes.cid7162.ArtificialIntelligence,
        "device": codes.cid270.Device,
        "procedure": codes.cid100.ImagingProcedure,
    }


def object_key(image_uri: str, frames: list[int] | None = None) -> str:
    """The file name stem of an instance's objects (``frames`` for a multi-frame source)."""
    key = hashlib.sha256(image_uri.encode()).hexdigest()[:KEY_HEX]
    return f"{key}-f{min(frames):05d}-{max(frames):05d}" if frames is not None else key


def run_root(dicom_output: str, run_id: str) -> str:
    return storage.join(dicom_output, run_id)


def _uid(*parts: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(prefix=None, entropy_srcs=[str(p) for p in parts])


@contextlib.contextmanager
def _quiet():
    """pydicom and highdicom warnings may quote element values: none reach the logs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class DicomWriter:
    """Ray Data stage: Postprocess's table -> the same table with the DICOM objects' paths.

    Args:
        dicom_output: The job's ``--dicom-output`` (local folder or s3:// prefix).
        run_id: This run; objects go to ``<dicom_output>/<run_id>/``.
        model_name, model_version: The artifact's identity, written into both objects.
        software_version: adcore's version (the SEG's Software Versions).
        pacs: A ``jobs.scoring.pacs`` sender: each object is stored with it as soon as it is written.
    """

    def __init__(
        self,
        dicom_output: str,
        run_id: str,
        model_name: str,
        model_version: str,
        software_version: str,
        pacs=None,
    ):
        self.root = run_root(dicom_output, run_id)
        self.run_id = run_id
        self.model_name, self.model_version = model_name, model_version
        self.software_version = software_version
        self.pacs = pacs  # a STOW-RS sender's pickle has no credentials: the worker reads its own
        self._pacs_down = False  # set in a task once the PACS stopped answering (after the retries)
        self._reader = storage.Reader()
        self._wado = qido.WadoReader()  # DICOMweb inputs are read again from the PACS

    def __call__(self, table: pa.Table) -> pa.Table:
        n = table.num_rows
        paths: list[list[str]] = [[] for _ in range(n)]
        errors: list[str | None] = [None] * n
        sent: list[int] = [0] * n
        unsent: list[list[str]] = [[] for _ in range(n)]
        ok = pc.and_(pc.equal(table.column("status"), S.STATUS_OK), pc.is_valid(table.column("modality")))
        groups: dict[str, list[int]] = {}
        for i in np.flatnonzero(ok.to_numpy(zero_copy_only=False)):
            groups.setdefault(table.column("image_uri")[int(i)].as_py(), []).append(int(i))
        if groups:
            logging.getLogger("highdicom").setLevel(logging.WARNING)
        for uri, idx in groups.items():
            rows = table.take(idx).select(["frame", "content_sha256", "score", "label", "mask_png", "mask_area"])
            self._sop_class = "DICOM"
            try:
                written = self.write_instance(uri, rows.to_pylist())
            except OSError:
                raise  # the store failed: the task is retried, and rewrites the same files
            except NotAnImage as e:
                errors[idx[0]] = SKIPPED_PREFIX + str(e)
                continue
            except Exception as e:  # noqa: BLE001 (a source highdicom refuses must not sink the run)
                errors[idx[0]] = type(e).__name__
                log.warning("DICOM outputs of one %s instance not written: %s", self._sop_class, type(e).__name__)
                continue
            paths[idx[0]] = [name for name, _ in written]
            if self.pacs is not None:
                sent[idx[0]], unsent[idx[0]] = self.send(written)
        table = table.append_column(DICOM_COLUMN, pa.array(paths, pa.list_(pa.string())))
        table = table.append_column(DICOM_ERROR_COLUMN, pa.array(errors, pa.string()))
        if self.pacs is not None:
            table = table.append_column(PACS_SENT_COLUMN, pa.array(sent, pa.int32()))
            table = table.append_column(PACS_UNSENT_COLUMN, pa.array(unsent, pa.list_(pa.string())))
        return table

    def send(self, written: list[tuple[str, bytes]]) -> tuple[int, list[str]]:
        """Stores one instance's objects in the PACS as soon as they are written: (sent, names not sent).

        Once the PACS is unavailable (after the retries), this task sends nothing more: its objects
        wait for the next run rather than each waiting out the backoff.
        """
        from jobs.scoring.pacs import PacsError

        done, failed = 0, []
        for name, data in written:
            if self._pacs_down:
                failed.append(name)
                continue
            try:
                self.pacs.send(data)
                done += 1
            except PacsError as e:
                failed.append(name)
                self._pacs_down = e.unavailable
                log.warning("one DICOM object not stored in the PACS (%s): kept for the next run", e)
                if e.unavailable:
                    log.warning("the PACS is unavailable: this task's other objects are kept for the next run")
        return done, failed

    def write_instance(self, uri: str, rows: list[dict]) -> list[tuple[str, bytes]]:
        """Build and write one instance's SEG(s) and SR; returns their names under the run, and bytes."""
        import pydicom

        data = self._wado.read(uri, None) if dicomweb.is_dicomweb(uri) else self._reader.read(uri)
        if any(r["content_sha256"] != S.content_sha256(data) for r in rows):
            raise ChangedSinceScored("the file changed since it was scored")
        with _quiet():
            src = pydicom.dcmread(io.BytesIO(data), force=True)
            self._sop_class = dicom_source.sop_class_name(src)
            reason = dicom_source.skip_reason(src)
            if reason is not None:
                raise NotAnImage(reason)
            dicom_source.complete(src)
            n_frames = int(src.get("NumberOfFrames", 1) or 1)
            rows = sorted(rows, key=lambda r: r["frame"])
            frames = [int(r["frame"]) for r in rows]
            masks = [S.decode_mask(r["mask_png"]) for r in rows]
            for m in masks:
                if m.shape != (int(src.Rows), int(src.Columns)):
                    raise ValueError("mask size differs from the source's Rows/Columns")
            key = object_key(uri, frames if n_frames > 1 else None)
            # Same content, model and frames: same UIDs (a rerun after a crash replaces, never duplicates, in a PACS).
            salt = (self.model_version, rows[0]["content_sha256"])
            whole = n_frames == 1 or len(frames) == n_frames
            segs = []  # (name stem, dataset)
            if dicom_source.has_geometry(src):
                if whole or any(m.any() for m in masks):
                    segs.append((key, self.segmentation(src, n_frames, frames, masks, key, salt)))
            else:  # one SEG per anomalous frame (or the first frame of a whole normal instance), no geometry
                chosen = [(f, m) for f, m in zip(frames, masks) if m.any()]
                chosen = chosen or ([(frames[0], masks[0])] if whole else [])
                for f, m in chosen:
                    stem = object_key(uri, [f]) if n_frames > 1 else key
                    segs.append((stem, self.flat_segmentation(src, f if n_frames > 1 else None, m, stem, salt)))
            sr = self.report(src, n_frames, rows, [s for _, s in segs], key, salt)
            out = []
            for stem, obj, suffix in [(k, s, "seg") for k, s in segs] + [(key, sr, "sr")]:
                buf = io.BytesIO()
                obj.save_as(buf, enforce_file_format=True)
                name = f"{stem}.{suffix}.dcm"
                storage.write_bytes(storage.join(self.root, name), buf.getvalue())
                out.append((name, buf.getvalue()))
        return out

    def _segmentation(self, source, pixels: np.ndarray, stem: str, salt: tuple, instance_number: int):
        """A BINARY Segmentation of ``source`` with one segment, ``pixels`` [F, R, C]."""
        import highdicom as hd

        c = _codes()
        algorithm = hd.AlgorithmIdentificationSequence(
            name=self.model_name,
            version=self.model_version,
            family=c["ai"],
            source=MANUFACTURER,
            parameters={"intended_use": INTENDED_USE},
        )
        segment = hd.seg.SegmentDescription(
            segment_number=1,
            segment_label="anomaly",
            segmented_property_category=c["category"],
            segmented_property_type=c["property"],
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        return hd.seg.Segmentation(
            source_images=[source],
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment],
            series_instance_uid=_uid(self.model_version, source.SeriesInstanceUID, "seg-series"),
            series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=_uid(*salt, stem, "seg"),
            instance_number=instance_number,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=self.model_name,
            software_versions=self.software_version,
            device_serial_number=self.model_version,
            series_description=f"adcore anomaly mask ({self.model_name})",
        )

    def segmentation(self, src, n_frames: int, frames: list[int], masks: list[np.ndarray], key: str, salt: tuple):
        """The SEG of a source with geometry: the frames' masks, placed in its frame of reference."""
        pixels = np.zeros((n_frames, int(src.Rows), int(src.Columns)), bool)
        for f, m in zip(frames, masks):
            pixels[f] = m
        return self._segmentation(src, pixels, key, salt, min(frames) + 1)

    def flat_segmentation(self, src, frame: int | None, mask: np.ndarray, stem: str, salt: tuple):
        """The SEG of one frame of a source without usable geometry (``frame``: of a multi-frame source)."""
        seg = self._segmentation(dicom_source.flat_view(src), mask[None], stem, salt, (frame or 0) + 1)
        dicom_source.restore_references(seg, src, None if frame is None else frame + 1)
        seg.PatientOrientation = dicom_source.patient_orientation(src)
        return seg

    def report(self, src, n_frames: int, rows: list[dict], segs: list, key: str, salt: tuple):
        """A Comprehensive 3D SR with a TID 1500 measurement report: one group per frame."""
        import highdicom as hd

        c = _codes()
        algorithm = hd.sr.AlgorithmIdentification(
            name=self.model_name, version=self.model_version, parameters=[INTENDED_USE], manufacturer=MANUFACTURER
        )
        device = hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid(self.model_version, "device"),
            name=self.model_name,
            manufacturer_name=MANUFACTURER,
            model_name=self.model_version,
        )
        context = hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=c["device"], observer_identifying_attributes=device
            )
        )
        spacing = _pixel_spacing(src)
        groups = []
        for r in rows:
            refs = [int(r["frame"]) + 1] if n_frames > 1 and dicom_source.multi_frame_iod(src) else None
            measurements = [
                hd.sr.Measurement(c["score"], float(r["score"]), c["no_units"], algorithm_id=algorithm),
                hd.sr.Measurement(c["area_px"], int(r["mask_area"]), c["pixels"], algorithm_id=algorithm),
            ]
            if spacing is not None:
                mm2 = float(r["mask_area"]) * spacing[0] * spacing[1]
                measurements.append(hd.sr.Measurement(c["area"], mm2, c["mm2"], algorithm_id=algorithm))
            label = c["abnormal"] if r["label"] else c["normal"]
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=_uid(*salt, key, r["frame"], "tracking"), identifier=f"frame {r['frame']}"
                    ),
                    algorithm_id=algorithm,
                    measurements=measurements,
                    qualitative_evaluations=[hd.sr.QualitativeEvaluation(c["finding"], label)],
                    source_images=[
                        hd.sr.SourceImageForMeasurementGroup(
                            src.SOPClassUID, src.SOPInstanceUID, referenced_frame_numbers=refs
                        )
                    ],
                )
            )
        content = hd.sr.MeasurementReport(
            observation_context=context, procedure_reported=c["procedure"], imaging_measurements=groups
        )
        return hd.sr.Comprehensive3DSR(
            evidence=[src] + segs,
            content=content,
            series_instance_uid=_uid(self.model_version, src.SeriesInstanceUID, "sr-series"),
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=_uid(*salt, key, "sr"),
            instance_number=min(int(r["frame"]) for r in rows) + 1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            series_description=f"adcore anomaly report ({self.model_name})",
        )


class NotAnImage(Exception):
    """The instance is no image a SEG can reference (RT Dose, a SEG, ...): skipped on purpose, its SOP class."""


class ChangedSinceScored(Exception):
    """The source's bytes differ from those scored (replaced between decoding and this stage)."""


def _pixel_spacing(src) -> tuple[float, float] | None:
    """Row and column spacing in mm: the image's own, or a multi-frame image's shared one; None unless positive."""
    try:
        if "PixelSpacing" in src:
            spacing = float(src.PixelSpacing[0]), float(src.PixelSpacing[1])
        else:
            shared = src.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
            spacing = float(shared.PixelSpacing[0]), float(shared.PixelSpacing[1])
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None
    return spacing if min(spacing) > 0 else None


def write_object_list(run_root_uri: str, task_idx: int, objects: list[str], unsent: list[str]) -> str:
    """A write task's list of the DICOM objects of its rows, ``<run folder>/_objects/part-<task>.json``:
    ``files`` (names under the run folder) and ``unsent`` (those the PACS did not take). A retried task
    overwrites its own list. Returns its name under the run folder (what the manifest lists)."""
    name = f"{OBJECT_LISTS}/part-{task_idx:05d}.json"
    body = {"files": sorted(objects), "unsent": sorted(unsent)}
    storage.write_bytes(storage.join(run_root_uri, name), json.dumps(body).encode())
    return name


def read_object_lists(run_root_uri: str, lists: list[str]) -> tuple[list[str], list[str]]:
    """The run's objects and its objects the PACS did not take, from the lists its manifest names."""
    files, unsent = [], []
    for name in lists:
        body = json.loads(storage.read_bytes(storage.join(run_root_uri, name)))
        files += body["files"]
        unsent += body.get("unsent", [])
    return sorted(files), sorted(unsent)


def write_run_marker(dicom_output: str, run_id: str, output: str, completed: bool = False) -> None:
    """``<dicom_output>/<run_id>/_run.json``: names the scoring output, so cleanup deletes only its own runs,
    and says whether the run committed (``completed``: then its objects are never removed)."""
    marker = storage.join(run_root(dicom_output, run_id), RUN_MARKER)
    storage.write_bytes(marker, json.dumps({"output": output, "completed": completed}).encode())


def cleanup_incomplete(dicom_output: str, output: str, completed_ids: set[str], keep: str) -> list[str]:
    """Delete the DICOM folders of this output's runs that never completed (call it holding the lease).

    A run's folder is marked completed after its manifest is committed; one whose manifest
    exists but whose mark was not written (a crash in between) is marked here. Marked folders
    stay whatever happens to their manifests later (``--retain-runs`` expires manifests, and
    PACS-bound objects of a completed run must outlive that).
    """
    fs, base = storage.filesystem_for(dicom_output)
    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        return []
    prefix = storage.S3_PREFIX if storage.is_s3(dicom_output) else ""
    removed = []
    for info in fs.get_file_info(pafs.FileSelector(base)):
        name = info.base_name
        if info.type != pafs.FileType.Directory or name == keep:
            continue
        try:
            marker = json.loads(storage.read_bytes(storage.join(prefix + info.path, RUN_MARKER)))
        except (FileNotFoundError, ValueError):
            continue  # not a run folder this job wrote: left alone
        if marker.get("output") != output or marker.get("completed"):
            continue
        if name in completed_ids:
            write_run_marker(dicom_output, name, output, completed=True)
        else:
            storage.delete_dir(prefix + info.path)
            removed.append(name)
            log.info("removed the DICOM folder of incomplete run %s", name)
    return removed
