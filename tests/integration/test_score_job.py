"""The nightly scoring job end to end: S3 server, Ray, real decoders, a real Triton, Parquet + DuckDB."""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from adcore import storage
from jobs.scoring import ledger
from jobs.scoring.schema import SCHEMA, decode_mask
from tests.integration.conftest import STUDY_SECRET
from tests.jobproc import kill_group_when

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
MAX_PIXELS = 100_000  # the "very large" image below announces more; keeps the test fast
PHI = {
    "PatientName": "Doe^Jane",
    "PatientID": "PID-4242-XYZ",
    "PatientBirthDate": "19700131",
    "StudyInstanceUID": "1.2.826.0.1.3680043.99.424242",
}
SECRET = STUDY_SECRET  # what the workers of ray_local have
NIFTI_SLICES = 3


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _dicom_with_phi() -> bytes:
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PHI["PatientName"], PHI["PatientID"], PHI["PatientBirthDate"]
    ds.StudyInstanceUID = PHI["StudyInstanceUID"]
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def _nifti(rng) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image((rng.random((24, 20, NIFTI_SLICES)) * 100).astype(np.float32), np.eye(4))
    return img.to_bytes()


def make_archive(rng, n_png: int = 4) -> dict[str, bytes]:
    """name -> bytes: normal PNGs and every kind of bad file the job must survive."""
    files = {f"normal/img{i:02d}.png": _png((rng.random((40 + i, 56)) * 255).astype(np.uint8)) for i in range(n_png)}
    good = _png((rng.random((64, 64)) * 255).astype(np.uint8))
    dcm = _dicom_with_phi()
    files.update(
        {
            "bad/zero.png": b"",
            "bad/truncated.png": good[: len(good) // 2],
            "bad/broken.dcm": dcm[:400],
            "bad/text.png": b"this is not an image at all\n" * 4,
            "bad/huge.png": _png(np.zeros((400, 300), np.uint8)),  # 120k px > MAX_PIXELS: refused at the header
            "dicom/ct_phi.dcm": dcm,
            "volumes/brain.nii": _nifti(rng),
        }
    )
    return files


EXPECTED = {  # name -> (frames, status, error kind)
    "bad/zero.png": (1, "error", "empty"),
    "bad/truncated.png": (1, "error", "truncated"),
    "bad/broken.dcm": (1, "error", None),
    "bad/text.png": (1, "error", "corrupt"),
    "bad/huge.png": (1, "error", "too_large"),
    "dicom/ct_phi.dcm": (1, "ok", None),
    "volumes/brain.nii": (NIFTI_SLICES, "ok", None),
}


def upload(prefix: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        storage.write_bytes(storage.join(prefix, name), data)


def write_local(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return []  # numbers, and bytes: masks and other pixels


def readable_bytes(output: str) -> list[bytes]:
    """What a reader of the output files can find text in: every file's bytes, but a Parquet file's
    schema, key-value metadata and string values instead of its pages (compressed numbers and pixels,
    where ASCII digits turn up by chance: a run of mask bytes 0x31..0x38 reads "12345678")."""
    import pyarrow.parquet as pq

    out = []
    for path in storage.list_files(output):
        raw = storage.read_bytes(path)
        if not path.endswith(".parquet"):
            out.append(raw)
            continue
        pf = pq.ParquetFile(io.BytesIO(raw))
        meta = pf.schema_arrow.metadata or {}
        texts = [str(pf.schema_arrow), *(k.decode() + v.decode("utf-8", "replace") for k, v in meta.items())]
        texts += _strings(pf.read().to_pylist())
        out.append("\n".join(texts).encode())
    return out


def visible(output: str):
    """The reader's view (latest completed run per key) as a list of dicts, via DuckDB, and the raw rows
    of the completed runs (checked first: no run wrote a key twice)."""
    import duckdb

    table = ledger.read_runs(output, ledger.completed_runs(output))
    con = duckdb.connect()
    con.register("scores", table)
    # The run files themselves, before any window: one row per key in each run.
    dup = con.execute(
        "SELECT image_key, frame, model_version, run_id, count(*) c FROM scores GROUP BY ALL HAVING c > 1"
    ).fetchall()
    assert dup == [], f"keys written more than once by one run: {dup[:5]}"
    con.execute(ledger.LATEST_VIEW_SQL)
    return con.sql("SELECT * FROM latest ORDER BY image_key, frame").to_arrow_table().to_pylist(), table


def config(**kw):
    from jobs.score import ScoreConfig

    return ScoreConfig(**({"max_pixels": MAX_PIXELS, "batch_size": 8, "progress_every_s": 0.5} | kw))


def test_s3_archive_end_to_end(s3_server, ray_local, tiny_artifact, monkeypatch, caplog, capfd):
    from jobs.score import main

    bucket = s3_server.make_bucket("score-e2e")
    archive = make_archive(np.random.default_rng(0))
    # A colour frame among grey ones: its chunk ships three channels, the others one plane each.
    archive["colour/rgb.png"] = _png((np.random.default_rng(1).random((30, 50, 3)) * 255).astype(np.uint8))
    upload(f"{bucket}/archive", archive)
    out = f"{bucket}/scores"
    monkeypatch.setenv("ADCORE_STUDY_KEY_SECRET", SECRET)
    caplog.set_level(logging.INFO)

    m1 = main(config(input=f"{bucket}/archive", model=tiny_artifact, output=out))
    rows, raw = visible(out)
    assert raw.schema.equals(SCHEMA, check_metadata=False)
    by_name = {}
    for r in rows:
        by_name.setdefault(r["image_uri"].removeprefix(f"{bucket}/archive/"), []).append(r)
    assert set(by_name) == set(archive)  # every file: rows, URIs with s3:// restored
    for name, recs in by_name.items():
        frames, status, kind = EXPECTED.get(name, (1, "ok", None))
        assert sorted(r["frame"] for r in recs) == list(range(frames)), name
        assert {r["status"] for r in recs} == {status}, (name, recs[0]["error"])
        if kind:
            assert recs[0]["error"].startswith(kind + ":"), (name, recs[0]["error"])
        for r in recs:
            assert r["content_sha256"] == hashlib.sha256(archive[name]).hexdigest()
            assert r["model_version"] == m1["model_version"] and r["run_id"] == m1["run_id"]
            if status == "ok":
                mask = decode_mask(r["mask_png"])
                assert mask.shape == (r["height"], r["width"]) and mask.sum() == r["mask_area"]
                assert 0 <= r["score"] <= 1 and r["label"] in (0, 1)
                assert 0 <= r["peak_row"] < r["height"] and 0 <= r["peak_col"] < r["width"]
            else:
                assert r["score"] is None and r["mask_png"] is None
    assert by_name["normal/img01.png"][0]["height"] == 41
    ct = by_name["dicom/ct_phi.dcm"][0]
    assert ct["modality"] == "CT"
    assert ct["study_key"] == hmac.new(SECRET.encode(), PHI["StudyInstanceUID"].encode(), hashlib.sha256).hexdigest()
    assert m1["counts"] == {"ok": len(archive) - 5 + NIFTI_SLICES - 1, "error": 5}
    assert m1["rows"] == raw.num_rows == len(rows)

    # Rerun: nothing new is scored (bad files neither: their errors are permanent), nothing is duplicated.
    # Changed and new files and --rescore-all: tests/integration/test_incremental.py.
    m2 = main(config(input=f"{bucket}/archive", model=tiny_artifact, output=out))
    assert m2["rows"] == 0 and m2["skipped_files"] == len(archive)

    # No identifier anywhere: output files, manifests, logs.
    blobs = readable_bytes(out)
    captured = capfd.readouterr()
    texts = [caplog.text, captured.out, captured.err]
    for value in PHI.values():
        needles = {value, value.replace("^", " ")}
        for needle in needles:
            assert not any(needle.encode() in b for b in blobs), needle
            assert not any(needle in t for t in texts), needle


def test_secret_unset_warns_once_and_leaves_study_key_null(
    s3_server, ray_local, tiny_artifact, tmp_path, monkeypatch, caplog
):
    from jobs.score import SECRET_ENV, main

    monkeypatch.delenv(SECRET_ENV, raising=False)
    write_local(
        tmp_path / "in",
        {"a.dcm": _dicom_with_phi(), "b.dcm": _dicom_with_phi(), "c.png": _png(np.zeros((20, 20), np.uint8))},
    )
    caplog.set_level(logging.INFO)
    main(config(input=str(tmp_path / "in"), model=tiny_artifact, output=str(tmp_path / "out")))
    rows, _ = visible(str(tmp_path / "out"))
    assert [r["study_key"] for r in rows] == [None, None, None]
    assert [r["modality"] for r in rows] == ["CT", "CT", None]
    assert sum(SECRET_ENV in rec.getMessage() for rec in caplog.records) == 1


def test_killed_run_then_rerun_loses_and_duplicates_nothing(tiny_artifact, tmp_path):
    rng = np.random.default_rng(1)
    n = 80
    write_local(
        tmp_path / "in", {f"i{i:03d}.png": _png((rng.random((24, 24)) * 255).astype(np.uint8)) for i in range(n)}
    )
    out = tmp_path / "out"
    env = {
        **os.environ,
        "RAY_TMPDIR": "/tmp/ray-score-kill",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
    }
    cmd = [
        PY,
        str(REPO / "jobs/score.py"),
        "--input",
        str(tmp_path / "in"),
        "--model",
        tiny_artifact,
        "--output",
        str(out),
        "--batch-size",
        "2",
        "--rows-per-file",
        "2",
        "--files-per-block",
        "8",
    ]
    # Each model call of the run to kill takes at least 0.2 s: 40 calls, so it is still running when killed.
    first = cmd + ["--simulated-batch-s", "0.2"]
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.Popen(first, env=env, start_new_session=True, **quiet)
    kill_group_when(proc, lambda: len(list(out.glob("run_date=*/run_id=*/part-*.parquet"))) >= 3, 150, "progress")
    assert ledger.completed_runs(str(out)) == []
    killed = ledger.incomplete_run_dirs(str(out), set())
    assert len(killed) == 1

    from jobs.score import main

    # The rerun goes through the command line too (its own Ray), then the data is read back.
    # Progress every write (not every 10 s), so its lines do not depend on how fast the machine is.
    done = subprocess.run(
        cmd[:-6] + ["--files-per-block", "64", "--batch-size", "32", "--progress-every-s", "0"],
        env=env,
        timeout=180,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # The killed run committed nothing itself; the rerun commits its whole part files (salvaged) and
    # scores only the other files, logging progress and then its summary.
    salvaged, rerun = ledger.completed_runs(str(out))
    assert salvaged["salvaged"] and salvaged["rows"] >= 3 * 2 and rerun["rows"] == n - salvaged["rows"]
    left = n - salvaged["rows"]
    assert f"progress: files {n}/{n}, rows {left} " in done.stderr, done.stderr[-3000:]
    assert f"done: {left} rows ({left} ok, 0 errors" in done.stderr, done.stderr[-3000:]
    assert Path(killed[0]).exists()  # the dead run's whole files are kept, never deleted
    rows, raw = visible(str(out))
    assert raw.num_rows == n == len(rows)  # physically one row per image: none lost, none twice
    assert {r["status"] for r in rows} == {"ok"}
    del main


def test_triton_stopped_mid_run_then_rerun_fixes_errors(ray_local, tiny_artifact, tmp_path):
    from adcore.export import export_onnx
    from adcore.scorer import load
    from adcore.serving import LocalTriton
    from adcore.serving.artifacts import write_triton_repository
    from jobs.score import main

    scorer = load(tiny_artifact)
    onnx_path = export_onnx(scorer, tmp_path / "model.onnx")
    repo = tmp_path / "repo"
    name = next(iter(write_triton_repository(scorer, onnx_path, repo, max_batch_size=8)))
    rng = np.random.default_rng(2)
    n = 96
    write_local(
        tmp_path / "in", {f"i{i:03d}.png": _png((rng.random((24, 24)) * 255).astype(np.uint8)) for i in range(n)}
    )
    out = tmp_path / "out"
    kw = dict(
        input=str(tmp_path / "in"),
        model=tiny_artifact,
        output=str(out),
        batch_size=4,
        rows_per_file=4,
        files_per_block=8,
        triton_model=name,
        triton_batch=2,
        triton_retries=1,
        triton_backoff_s=0.1,
        triton_timeout_s=5.0,
    )

    server = LocalTriton(repo, models=[name]).start()
    result = {}
    job = threading.Thread(
        target=lambda: result.update(m=main(config(triton_url=server.http_url, triton_protocol="http", **kw)))
    )
    try:
        job.start()
        deadline = time.monotonic() + 120
        while _served(server.http_url, name) < 3:  # Ray runs ahead of the driver: watch the server
            assert job.is_alive(), "job ended before Triton could be stopped"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # mid-run, no graceful drain: later batches fail
        server.stop()
    job.join(180)
    m1 = result["m"]
    assert m1["rows"] == n and m1["counts"]["error"] > 0 and m1["counts"]["ok"] > 0, m1
    assert set(m1["errors_by_kind"]) == {"inference"}

    with LocalTriton(repo, models=[name]) as server2:
        m2 = main(config(triton_url=server2.http_url, triton_protocol="http", **kw))
    assert m2["rows"] == m1["counts"]["error"]  # only the failed frames were scored again
    rows, raw = visible(str(out))
    assert len(rows) == n and {r["status"] for r in rows} == {"ok"}
    assert raw.num_rows == n + m1["counts"]["error"]  # superseded error rows only, never a second ok row
    # Triton's scores match the in-process network's.
    local = main(config(**{**kw, "output": str(tmp_path / "out_local"), "triton_model": ""}))
    assert local["counts"]["ok"] == n
    lrows, _ = visible(str(tmp_path / "out_local"))
    np.testing.assert_allclose([r["score"] for r in rows], [r["score"] for r in lrows], atol=1e-4)


def _served(http_url: str, model: str) -> int:
    """Successful inference requests so far, from Triton's statistics endpoint."""
    import json
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{http_url}/v2/models/{model}/stats", timeout=2) as r:
            stats = json.load(r)["model_stats"]
    except OSError:
        return 0
    return sum(int(m["inference_stats"]["success"]["count"]) for m in stats)
