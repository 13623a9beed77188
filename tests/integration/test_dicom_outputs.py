"""--dicom-output end to end: DICOM-SEG + TID 1500 SR per scored DICOM instance, validated with dciodvfy.

Real parts only: pydicom's test files with injected PHI on an S3 server, a local Ray, the
scoring job, highdicom, and the standard DICOM validator ``dciodvfy`` (Debian ``dicom3tools``,
installed by ``make setup``). The objects must read back with the Parquet's masks and scores,
carry the source's patient module (DICOM requires it), and nothing identifying may reach the
Parquet, the manifests or the logs.
"""

from __future__ import annotations

import io
import logging
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from adcore import storage
from jobs.scoring import dicom_out, ledger
from jobs.scoring.schema import decode_mask
from tests.dicom_checks import dciodvfy_errors
from tests.integration.test_score_job import (
    PHI,
    SECRET,
    _dicom_with_phi,
    _png,
    readable_bytes,
    upload,
    visible,
    write_local,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
MULTI_FRAME = "eCT_Supplemental.dcm"  # Enhanced CT, 2 frames of 512x512 with per-frame functional groups
NOT_AN_IMAGE = "rtdose.dcm"  # RT Dose: pixel data, scored, but no image a SEG references: skipped


def _with_phi(name: str) -> bytes:
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file(name))
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PHI["PatientName"], PHI["PatientID"], PHI["PatientBirthDate"]
    ds.StudyInstanceUID = PHI["StudyInstanceUID"]
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def sr_groups(ds) -> list[dict]:
    """Measurement groups of a TID 1500 report: values by code, the finding, the referenced image."""
    groups = []

    def walk(items):
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            if item.ValueType == "CONTAINER" and name == "Measurement Group":
                g = {"num": {}, "text": []}
                for sub in item.ContentSequence:
                    code = sub.ConceptNameCodeSequence[0].CodeValue
                    if sub.ValueType == "NUM":
                        g["num"][code] = float(sub.MeasuredValueSequence[0].NumericValue)
                        g["text"] += [t.TextValue for t in sub.get("ContentSequence", []) if t.ValueType == "TEXT"]
                    elif sub.ValueType == "CODE" and sub.ConceptNameCodeSequence[0].CodeMeaning == "Finding":
                        g["finding"] = sub.ConceptCodeSequence[0].CodeMeaning
                    elif sub.ValueType == "IMAGE":
                        ref = sub.ReferencedSOPSequence[0]
                        g["sop"] = ref.ReferencedSOPInstanceUID
                        g["frame"] = int(ref.ReferencedFrameNumber) - 1 if "ReferencedFrameNumber" in ref else 0
                groups.append(g)
            elif "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.ContentSequence)
    return groups


def check_objects(
    root: str, listed: list[str], rows: list[dict], sources: dict[str, bytes], refused: str | None, tmp: Path
) -> dict:
    """Every object listed: valid (dciodvfy), read back equal to the Parquet rows (``refused``: no objects)."""
    import highdicom as hd
    import pydicom

    on_disk = sorted(u.rsplit("/", 1)[-1] for u in storage.list_files(root) if u.endswith(".dcm"))
    assert sorted(listed) == on_disk
    ok = {(r["image_uri"], r["frame"]): r for r in rows if r["status"] == "ok" and r["modality"] is not None}
    if refused:
        assert any(uri == refused for uri, _ in ok)
        ok = {k: r for k, r in ok.items() if k[0] != refused}
    by_sop = {pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID: uri for uri, d in sources.items()}
    segs, reported = {}, set()
    for name in listed:
        data = storage.read_bytes(storage.join(root, name))
        assert dciodvfy_errors(data, tmp) == [], name
        ds = pydicom.dcmread(io.BytesIO(data))
        assert ds.PatientID == PHI["PatientID"] and ds.StudyInstanceUID == PHI["StudyInstanceUID"]
        if name.endswith(".seg.dcm"):
            seg = hd.seg.Segmentation.from_dataset(ds)
            src_uid = seg.SourceImageSequence[0].ReferencedSOPInstanceUID
            uri = by_sop[src_uid]
            n_frames = int(pydicom.dcmread(io.BytesIO(sources[uri])).get("NumberOfFrames", 1))
            if n_frames == 1:
                px = seg.get_pixels_by_source_instance([src_uid], segment_numbers=[1])[..., 0]
            else:
                numbers = list(range(1, n_frames + 1))
                px = seg.get_pixels_by_source_frame(
                    src_uid,
                    numbers,
                    segment_numbers=[1],
                    ignore_spatial_locations=True,
                    assert_missing_frames_are_empty=True,
                )[..., 0]
            for f in range(n_frames):  # frames a SEG omits (empty, or outside its range) read back as zeros
                if (uri, f) in ok:
                    segs.setdefault((uri, f), []).append(px[f].astype(bool))
            assert seg.SegmentSequence[0].SegmentLabel == "anomaly"
            algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
            assert dicom_out.INTENDED_USE in algorithm.AlgorithmParameters  # what produced it, and what it is not
        else:
            for g in sr_groups(ds):
                r = ok[(by_sop[g["sop"]], g["frame"])]
                assert g["num"]["anomaly-score"] == pytest.approx(r["score"], abs=1e-6)
                assert g["num"]["anomaly-area"] == r["mask_area"]
                assert g["finding"] == ("Abnormal" if r["label"] else "Normal")
                assert r["model_name"] in g["text"] and r["model_version"] in g["text"]
                assert dicom_out.INTENDED_USE in g["text"]  # TID 4019's algorithm parameter: not a diagnosis
                reported.add((r["image_uri"], r["frame"]))
    assert reported == set(ok), "every scored DICOM frame is in a report"
    for key, r in ok.items():
        mask = decode_mask(r["mask_png"])
        union = np.logical_or.reduce(segs[key]) if key in segs else np.zeros_like(mask)
        np.testing.assert_array_equal(union, mask, err_msg=str(key))
    return segs


def test_dicom_outputs_valid_match_parquet_and_leak_nothing(
    s3_server, ray_local, tiny_artifact, tmp_path, monkeypatch, caplog, capfd
):
    from jobs.score import main
    from tests.integration.test_score_job import config

    bucket = s3_server.make_bucket("dicom-out")
    files = {
        "ct/one.dcm": _dicom_with_phi(),
        "ct/multi.dcm": _with_phi(MULTI_FRAME),
        "rt/dose.dcm": _with_phi(NOT_AN_IMAGE),
        "png/a.png": _png((np.random.default_rng(0).random((40, 40)) * 255).astype(np.uint8)),
        "bad/empty.dcm": b"",
    }
    upload(f"{bucket}/in", files)
    sources = {f"{bucket}/in/{k}": v for k, v in files.items() if k.endswith(".dcm") and v}
    refused = f"{bucket}/in/rt/dose.dcm"
    out, pacs = f"{bucket}/scores", f"{bucket}/pacs"
    # A dead run's DICOM folder (marker names this output) goes; a folder this job did not write stays.
    dead = "20000101T000000Z-deadbeef"
    dicom_out.write_run_marker(pacs, dead, out)
    storage.write_bytes(f"{pacs}/{dead}/x.seg.dcm", b"partial")
    storage.write_bytes(f"{pacs}/other/keep.dcm", b"not ours")
    monkeypatch.setenv("ADCORE_STUDY_KEY_SECRET", SECRET)
    caplog.set_level(logging.INFO)

    m1 = main(config(input=f"{bucket}/in", model=tiny_artifact, output=out, dicom_output=pacs, max_pixels=10**7))
    assert not storage.exists(f"{pacs}/{dead}") and storage.exists(f"{pacs}/other/keep.dcm")
    assert m1["dicom_output"] == f"{pacs}/{m1['run_id']}"
    objects = m1["dicom_objects"]
    assert objects["seg"] == objects["sr"] == 2 and objects["failed"] == {}
    assert objects["skipped"] == {"RT Dose Storage": 1}
    assert "files" not in objects and objects["lists"], "the manifest names the tasks' lists, not the objects"
    names, unsent = dicom_out.read_object_lists(m1["dicom_output"], objects["lists"])
    # The write tasks' lists cover every object in the run's folder exactly once.
    written = sorted(
        u.removeprefix(m1["dicom_output"] + "/") for u in storage.list_files(m1["dicom_output"], suffixes=[".dcm"])
    )
    assert names == written and len(set(names)) == len(names) == 4 and unsent == []
    rows, _ = visible(out)
    check_objects(m1["dicom_output"], names, rows, sources, refused, tmp_path)
    assert set(names) >= {dicom_out.object_key(f"{bucket}/in/ct/one.dcm") + ".seg.dcm"}

    # Nothing identifying outside --dicom-output: Parquet, manifests, latest table, logs.
    blobs = readable_bytes(out)
    assert not any(f.endswith(".dcm") for f in storage.list_files(out))
    captured = capfd.readouterr()
    texts = [caplog.text, captured.out, captured.err]
    for value in PHI.values():
        for needle in {value, value.replace("^", " ")}:
            assert not any(needle.encode() in b for b in blobs), needle
            assert not any(needle in t for t in texts), needle
    assert any("progress: files" in t and "ETA" in t for t in texts)  # periodic log lines off a terminal


def test_dicom_output_inside_output_or_input_is_refused(tiny_artifact, tmp_path):
    from jobs.score import main
    from tests.integration.test_score_job import config

    write_local(tmp_path / "in", {"a.dcm": _dicom_with_phi()})
    for inside in (tmp_path / "out" / "pacs", tmp_path / "in" / "pacs"):
        with pytest.raises(SystemExit, match="must not lie inside one another"):
            main(
                config(
                    input=str(tmp_path / "in"),
                    model=tiny_artifact,
                    output=str(tmp_path / "out"),
                    dicom_output=str(inside),
                )
            )


def test_job_on_a_terminal_draws_one_progress_line(tiny_artifact, tmp_path):
    """From a terminal (a real pseudo-terminal): one line redrawn with \\r, not periodic log lines."""
    write_local(
        tmp_path / "in",
        {"ct.dcm": _dicom_with_phi(), **{f"i{i}.png": _png(np.full((24, 24), i, np.uint8)) for i in range(24)}},
    )
    env = {**os.environ, "RAY_TMPDIR": "/tmp/ray-tty", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    master, slave = pty.openpty()
    cmd = [sys.executable, str(REPO / "jobs/score.py"), "--input", str(tmp_path / "in"), "--model", tiny_artifact]
    cmd += ["--output", str(tmp_path / "out"), "--dicom-output", str(tmp_path / "pacs"), "--batch-size", "2"]
    cmd += ["--simulated-batch-s", "0.2", "--progress-every-s", "0.5"]
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the job closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    redraws = [s for s in text.split("\r") if s.startswith("scoring: files ")]
    assert len(redraws) >= 2, text[-3000:]
    assert all(", ETA " in s and "rows/s" in s and "errors " in s for s in redraws)
    assert text.count("progress: files") == 1  # the closing line only: no periodic log lines on a terminal
    assert "done: 25 rows (25 ok, 0 errors" in text
    m = ledger.completed_runs(str(tmp_path / "out"))[-1]
    assert m["dicom_objects"]["seg"] == m["dicom_objects"]["sr"] == 1
    for value in PHI.values():
        assert value not in text


def test_multi_frame_instance_split_over_batches(tmp_path):
    """A multi-frame source whose frames arrive in two batches: one SEG + SR per frame range, no SEG
    for a range without anomalous pixels; together they hold exactly the frames' masks and scores."""
    import pyarrow as pa

    from jobs.scoring import schema as S

    data = _with_phi(MULTI_FRAME)
    uri = str(tmp_path / "in" / "multi.dcm")
    write_local(tmp_path / "in", {"multi.dcm": data})
    masks = [np.zeros((512, 512), bool), np.zeros((512, 512), bool)]
    masks[0][100:140, 200:260] = True
    rows = [
        {
            "image_uri": uri,
            "frame": f,
            "content_sha256": S.content_sha256(data),
            "status": "ok",
            "modality": "CT",
            "score": 0.75 + f / 10,
            "label": 1 - f,
            "mask_png": S.encode_mask(m),
            "mask_area": int(m.sum()),
            "model_name": "tiny",
            "model_version": "tiny-v1-0123",
        }
        for f, m in enumerate(masks)
    ]
    table = pa.Table.from_pylist(rows)
    writer = dicom_out.DicomWriter(str(tmp_path / "pacs"), "RUN", "tiny", "tiny-v1-0123", "0.1.0")
    first, second = writer(table.slice(0, 1)), writer(table.slice(1, 1))
    key = dicom_out.object_key(uri)
    objects = [t.column(dicom_out.DICOM_COLUMN).to_pylist() for t in (first, second)]
    first_range = [f"{key}-f00000-00000.seg.dcm", f"{key}-f00000-00000.sr.dcm"]
    assert objects == [[first_range], [[f"{key}-f00001-00001.sr.dcm"]]]
    listed = [p for o in objects for ps in o for p in ps]
    check_objects(str(tmp_path / "pacs" / "RUN"), listed, rows, {uri: data}, None, tmp_path)
    # The same frames in one batch: one SEG + SR for the whole instance.
    whole = writer(table).column(dicom_out.DICOM_COLUMN).to_pylist()
    assert whole == [[f"{key}-f00000-00001.seg.dcm", f"{key}-f00000-00001.sr.dcm"], []]
