"""Patient data in archive paths: ``--path-privacy pseudonymize`` through the real job, rerun and report."""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest

from adcore import storage
from jobs.scoring import ledger
from tests.integration.test_score_job import _png, config, readable_bytes, write_local

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

# What hospital archives put in folder and file names.
PATIENT_DIR = "DOE^JOHN_MRN7654321"
STUDY_DIR = "ACC20261207X"
IDENTIFIERS = ("DOE", "JOHN", "MRN7654321", "ACC20261207X", "scan-of-john")
SECRET = "0123456789abcdef0123456789abcdef-study"  # >= 32 bytes


def _archive(root) -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    files = {
        f"{PATIENT_DIR}/{STUDY_DIR}/scan-of-john-{i}.png": _png((rng.random((40, 36)) * 255).astype(np.uint8))
        for i in range(5)
    }
    files[f"{PATIENT_DIR}/{STUDY_DIR}/scan-of-john-broken.png"] = b"\x89PNG\r\n\x1a\n-truncated"
    write_local(root, files)
    return files


def _parquet_values(folder) -> list[dict]:
    return [r for f in storage.list_files(str(folder), suffixes=[".parquet"]) for r in pq.read_table(f).to_pylist()]


def test_pseudonymized_paths_reach_only_the_path_map(ray_local, tiny_artifact, tmp_path, monkeypatch, caplog, capfd):
    from jobs.report import build_image_page, build_report
    from jobs.score import main

    monkeypatch.setenv("ADCORE_STUDY_KEY_SECRET", SECRET)
    caplog.set_level(logging.INFO)
    files = _archive(tmp_path / "in")
    out, pmap = tmp_path / "out", tmp_path / "restricted" / "map"
    cfg = config(input=str(tmp_path / "in"), model=tiny_artifact, output=str(out))
    cfg = replace(cfg, path_privacy="pseudonymize", path_map=str(pmap))
    m1 = main(cfg)
    assert m1["rows"] == len(files) and m1["counts"] == {"ok": 5, "error": 1} and m1["path_privacy"] == "pseudonymize"

    # Analysts' tables (run files and latest) carry keys, never paths; the map has every pair, owner-only.
    rows = _parquet_values(out)
    assert rows and all(r.get("image_uri") is None for r in rows)
    assert all(len(r["image_key"]) == 64 for r in rows)
    mapped = {r["image_key"]: r["image_uri"] for r in _parquet_values(pmap)}
    assert set(mapped.values()) == {str(tmp_path / "in" / name) for name in files}
    assert {r["image_key"] for r in rows} == set(mapped)
    for f in storage.list_files(str(pmap)):
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f

    # An unchanged rerun reads nothing: skipping works on keys.
    m2 = main(cfg)
    assert m2["rows"] == 0 and m2["unchanged_files"] == len(files)

    # The report names images by key and draws them only with the map; written owner-only.
    text, figures = build_report(str(out), top_k=2)
    assert "image not drawn" in text and 'src="data:image/png' not in text.split("Score histogram")[0]
    drawn, _ = build_report(str(out), top_k=2, path_map=str(pmap))
    assert drawn.count('<img src="data:image/png;base64,') == 4  # 2 thumbnails + 2 sections
    key = figures["top"][0]["image_key"]
    page, row = build_image_page(str(out), key, 0, str(pmap))
    assert row["image_key"] == key and '<img src="data:image/png' in page
    report_file = tmp_path / "report.html"
    from jobs.report import ReportConfig
    from jobs.report import main as report

    report(ReportConfig(scores=str(out), output=str(report_file), path_map=str(pmap)))
    assert stat.S_IMODE(os.stat(report_file).st_mode) == 0o600

    # Nowhere outside the map: Parquet values and metadata, manifests, report pages, logs.
    captured = capfd.readouterr()
    texts = [caplog.text, captured.out, captured.err, text, drawn, page, report_file.read_text()]
    blobs = readable_bytes(str(out))
    for needle in IDENTIFIERS:
        assert not any(needle.encode() in b for b in blobs), needle
        assert not any(needle in t for t in texts), needle
    assert any(PATIENT_DIR.encode() in storage.read_bytes(f) for f in storage.list_files(str(pmap)))

    # One output, one mode: a later run that would keep paths is refused, as is a short secret.
    with pytest.raises(SystemExit, match="--path-privacy pseudonymize"):
        main(config(input=str(tmp_path / "in"), model=tiny_artifact, output=str(out)))
    monkeypatch.setenv("ADCORE_STUDY_KEY_SECRET", "short")
    with pytest.raises(SystemExit, match="use at least 32"):
        main(cfg)


def test_locations_inside_one_another_are_refused_by_real_path(tiny_artifact, tmp_path, monkeypatch):
    from jobs.score import main

    monkeypatch.setenv("ADCORE_STUDY_KEY_SECRET", SECRET)
    write_local(tmp_path / "in", {"a.png": _png(np.zeros((8, 8), np.uint8))})
    (tmp_path / "elsewhere").symlink_to(tmp_path / "in")  # a link that resolves inside --input
    base = dict(input=str(tmp_path / "in"), model=tiny_artifact)
    cases = [
        dict(output=str(tmp_path / "in" / "scores")),
        dict(output=str(tmp_path / "elsewhere" / "scores")),
        dict(output=str(tmp_path / "out"), dicom_output=str(tmp_path / "elsewhere" / "pacs")),
        dict(output=str(tmp_path / "out"), dicom_output=str(tmp_path / "out" / "pacs")),
        dict(output=str(tmp_path / "out"), path_privacy="pseudonymize", path_map=str(tmp_path / "elsewhere" / "m")),
        dict(output=str(tmp_path / "out"), path_privacy="pseudonymize", path_map=str(tmp_path / "out" / "m")),
    ]
    for case in cases:
        with pytest.raises(SystemExit, match="must not lie inside one another"):
            main(config(**base, **case))
    assert not (tmp_path / "out").exists() and not (tmp_path / "in" / "scores").exists()


def test_retain_runs_keeps_the_dicom_objects_of_completed_runs(tmp_path):
    """Expired manifests must not make a completed run's PACS objects look like a dead run's."""
    from jobs.scoring import dicom_out

    out, pacs = str(tmp_path / "out"), str(tmp_path / "pacs")
    done, expired, dead = "20260101T000000Z-aaaaaaaa", "20260102T000000Z-bbbbbbbb", "20260103T000000Z-cccccccc"
    for run in (done, expired, dead):
        dicom_out.write_run_marker(pacs, run, out)
        storage.write_bytes(f"{pacs}/{run}/x.seg.dcm", b"object")
    # done: committed and marked; expired: committed, marked, then its manifest expired; dead: never committed.
    ledger.write_manifest(out, {"run_id": done})
    dicom_out.write_run_marker(pacs, done, out, completed=True)
    dicom_out.write_run_marker(pacs, expired, out, completed=True)
    assert dicom_out.cleanup_incomplete(pacs, out, ledger.completed_ids(out), keep="") == [dead]
    assert storage.exists(f"{pacs}/{done}/x.seg.dcm") and storage.exists(f"{pacs}/{expired}/x.seg.dcm")
    # A run that committed but died before its mark: marked by the next cleanup, then safe from expiry.
    late = "20260104T000000Z-dddddddd"
    dicom_out.write_run_marker(pacs, late, out)
    storage.write_bytes(f"{pacs}/{late}/x.seg.dcm", b"object")
    ledger.write_manifest(out, {"run_id": late})
    assert dicom_out.cleanup_incomplete(pacs, out, ledger.completed_ids(out), keep="") == []
    assert json.loads(storage.read_bytes(f"{pacs}/{late}/_run.json"))["completed"] is True
    storage.delete(ledger.manifest_uri(out, late))
    assert dicom_out.cleanup_incomplete(pacs, out, ledger.completed_ids(out), keep="") == []
    assert storage.exists(f"{pacs}/{late}/x.seg.dcm")
