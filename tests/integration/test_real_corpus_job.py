"""The real-file corpus (``tests/real_corpus.py``) as one folder through ``jobs/score.py``.

Every DICOM of pydicom's test data and pydicom-data, nibabel's NIfTI test files and
scikit-image's data folder, copied into one archive folder and scored in-process on a
local Ray with the tiny artifact: the run completes (no bad file fails the job), every
file has rows (one per decoded frame, an error row for the rest, with the kind the
decoder gives), and no identifier of any file reaches the output or the logs. One real volume
with one frame damaged checks that a frame that fails alone is one error row.
"""

from __future__ import annotations

import io
import logging
import os
import shutil

import pytest
from pydicom.data import get_testdata_file

from tests import real_corpus as corpus
from tests.integration.conftest import STUDY_SECRET
from tests.integration.test_score_job import readable_bytes, visible

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SECRET = STUDY_SECRET  # what the workers of ray_local have


def _one_frame_damaged(path: str, index: int) -> bytes:
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(path)
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    frames[index] = b"\xff\x4f\xff\x51" + b"\x00" * (len(frames[index]) - 4)  # a J2K start, then nothing valid
    ds.PixelData = encapsulate(frames)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def test_corpus_folder_scores_with_a_row_for_every_file(ray_local, tiny_artifact, tmp_path, monkeypatch, caplog, capfd):
    from jobs.score import SECRET_ENV, ScoreConfig, main

    files = corpus.all_files()
    archive = tmp_path / "archive"
    archive.mkdir()
    for f in files:
        shutil.copyfile(f.path, archive / f.name)
    # And one real volume with one damaged frame: that frame alone becomes an error row.
    damaged = archive / "damaged__emri_small_jpeg_2k_lossless.dcm"
    damaged.write_bytes(_one_frame_damaged(get_testdata_file("emri_small_jpeg_2k_lossless.dcm"), 3))
    files.append(corpus.CorpusFile("pydicom", damaged, damaged.name))
    expected = {o.file.name: o for o in corpus.decode_all(files)}
    assert not [n for n, o in expected.items() if o.other is not None]
    # Identifiers of every DICOM file, but those its path already shows (pydicom's folders are named by
    # PatientID): the job writes the URIs it is given.
    needles = set()
    for f in files:
        if f.source == "pydicom":
            needles |= corpus.dicom_facts(f.path).identifiers
    needles = {n for n in needles if not any(n in f.name for f in files)}
    assert len(needles) > 100
    monkeypatch.setenv(SECRET_ENV, SECRET)
    caplog.clear()  # from here on, only the job's own logs
    capfd.readouterr()
    caplog.set_level(logging.INFO)
    out = tmp_path / "scores"

    manifest = main(ScoreConfig(input=str(archive), model=tiny_artifact, output=str(out), batch_size=32))

    rows, _ = visible(str(out))
    by_file: dict[str, list[dict]] = {}
    for r in rows:
        by_file.setdefault(os.path.basename(r["image_uri"]), []).append(r)
    assert set(by_file) == set(expected)  # every file has at least one row
    for name, o in expected.items():
        recs = sorted(by_file[name], key=lambda r: r["frame"])
        if o.kind is not None:  # the whole file failed: one error row with the decoder's kind
            assert [(r["frame"], r["status"]) for r in recs] == [(0, "error")], name
            assert recs[0]["error"].startswith(o.kind + ":"), (name, recs[0]["error"])
        else:  # one row per frame: ok rows for decoded frames, error rows for frames that failed alone
            assert [r["frame"] for r in recs] == list(range(o.frames + o.frame_errors)), name
            assert sum(r["status"] == "ok" for r in recs) == o.frames, (name, [r["error"] for r in recs])
    assert [(r["frame"], r["status"]) for r in by_file[damaged.name] if r["status"] != "ok"] == [(3, "error")]
    n_ok = sum(o.frames for o in expected.values())
    assert manifest["counts"].get("ok", 0) == n_ok
    n_error = sum(o.frame_errors + (o.kind is not None) for o in expected.values())
    assert manifest["rows"] == len(rows) == n_ok + n_error

    # No identifier of any DICOM file in the output (values and raw bytes), the manifests or the logs.
    values = "\n".join(str(v) for r in rows for k, v in r.items() if isinstance(v, str))
    blobs = readable_bytes(str(out))
    captured = capfd.readouterr()
    texts = [values, caplog.text, captured.out, captured.err]
    leaks = sorted(n for n in needles if any(n in t for t in texts) or any(n.encode() in b for b in blobs))
    assert leaks == []
