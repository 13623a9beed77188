"""Pure pieces of the scoring job: schema, study keys, masks, run ids, resource plan, ledger view."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json

import numpy as np

from jobs.scoring import ledger
from jobs.scoring import schema as S


def test_schema_is_versioned_and_has_the_documented_columns():
    names = set(S.SCHEMA.names)
    for col in (
        "image_uri",
        "content_sha256",
        "frame",
        "score",
        "label",
        "mask_png",
        "mask_area",
        "model_name",
        "model_version",
        "scored_at",
        "status",
        "error",
        "run_id",
        "schema_version",
        "peak_row",
        "peak_col",
        "height",
        "width",
        "modality",
        "study_key",
    ):
        assert col in names and col in S.__doc__
    assert S.SCHEMA.metadata[b"adcore.schema_version"] == str(S.SCHEMA_VERSION).encode()
    assert not any(("patient" in n.lower() or n == "study_uid") for n in names)


def test_study_key_is_hmac_and_null_without_secret_or_uid():
    uid = "1.2.3.4"
    assert S.study_key(uid, b"k") == hmac.new(b"k", uid.encode(), hashlib.sha256).hexdigest()
    assert S.study_key(uid, b"k") != S.study_key(uid, b"other")
    assert S.study_key(uid, None) is None and S.study_key(None, b"k") is None


def test_mask_roundtrip(rng):
    mask = rng.random((37, 51)) > 0.7
    assert np.array_equal(S.decode_mask(S.encode_mask(mask)), mask)


def test_run_ids_sort_by_time():
    t = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    a = S.new_run_id(t, "ffffffff")
    b = S.new_run_id(t + dt.timedelta(seconds=1), "00000000")
    assert a < b and a.startswith("20250102T030405Z-")


def test_to_table_casts_to_schema():
    now = dt.datetime.now(dt.timezone.utc)
    t = S.to_table(
        {"image_uri": ["a"], "frame": [0], "status": ["error"], "error": [S.format_error("empty", "x")]},
        model_name="m",
        model_version="m-v1-abc",
        run_id="r",
        scored_at=now,
    )
    assert t.schema.equals(S.SCHEMA) and t.column("score").null_count == 1
    assert S.error_kind(t.column("error")[0].as_py()) == "empty"


def _run(tmp_path, run_id, rows):
    import pyarrow.parquet as pq

    d = tmp_path / f"run_date=2025-01-01/run_id={run_id}"
    d.mkdir(parents=True)
    now = dt.datetime.now(dt.timezone.utc)
    cols = {k: [r[i] for r in rows] for i, k in enumerate(("image_uri", "content_sha256", "frame", "status", "error"))}
    pq.write_table(
        S.to_table(cols, model_name="m", model_version="v", run_id=run_id, scored_at=now), d / "part-00000.parquet"
    )
    return d


def test_ledger_view_skip_index_and_cleanup(tmp_path):
    out = str(tmp_path)
    _run(
        tmp_path,
        "r1",
        [
            ("a", "h1", 0, "ok", None),
            ("a", "h1", 1, "error", "inference: down"),
            ("b", "h2", 0, "error", "corrupt: bad"),
        ],
    )
    ledger.write_manifest(
        out, {"run_id": "r1", "model_version": "v", "files": ["run_date=2025-01-01/run_id=r1/part-00000.parquet"]}
    )
    _run(tmp_path, "r2", [("a", "h1", 1, "ok", None)])
    ledger.write_manifest(
        out, {"run_id": "r2", "model_version": "v", "files": ["run_date=2025-01-01/run_id=r2/part-00000.parquet"]}
    )
    dead = _run(tmp_path, "r3", [("c", "h3", 0, "ok", None)])  # no manifest: a killed run
    assert [m["run_id"] for m in ledger.completed_runs(out)] == ["r1", "r2"]
    index = ledger.scored_index(out, "v")
    assert index["a"] == ledger.FileState("h1", frozenset({0, 1}), True)
    assert index["b"].complete and "c" not in index
    latest = ledger.latest_rows(ledger.read_runs(out, ledger.completed_runs(out)))
    assert sorted(zip(latest["image_uri"].to_pylist(), latest["frame"].to_pylist(), latest["run_id"].to_pylist())) == [
        ("a", 0, "r1"),
        ("a", 1, "r2"),
        ("b", 0, "r1"),
    ]
    assert ledger.cleanup_incomplete(out, {"r1", "r2"}) == [str(dead)] and not dead.exists()
    assert json.loads((tmp_path / "_manifests/r1.json").read_text())["format"] == ledger.MANIFEST_FORMAT


def test_decoder_skips_done_frames_and_reports_errors():
    from jobs.scoring.stages import Decoder

    png = S.encode_mask(np.ones((8, 8), bool))
    sha = S.content_sha256(png)
    dec = Decoder(16, 10_000, {"done.png": ledger.FileState(sha, frozenset({0}), True)}, secret=b"s")
    out = dec({"bytes": np.array([png, png, b""], dtype=object), "path": np.array(["done.png", "new.png", "z.png"])})
    assert list(out["status"]) == ["skipped", "ok", "error"] and out["pixels"].shape == (3, 3, 16, 16)
    assert out["error"][2].startswith("empty:")


def test_decoder_holds_the_job_secret_but_never_shows_it(monkeypatch):
    import io
    import os

    import pydicom
    from pydicom.data import get_testdata_file

    from jobs.score import SECRET_ENV
    from jobs.scoring.stages import Decoder

    text = "decoder-secret-Zq81xv"
    monkeypatch.setenv(SECRET_ENV, text)
    secret = os.environ.get(SECRET_ENV, "").encode() or None  # as jobs/score.py reads it
    dec = Decoder(128, 100_000, {}, "", secret)  # as jobs/score.py builds it (CT_small is 128x128)
    # It does hold the secret: a DICOM's study_key is keyed by it.
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    buf = io.BytesIO()
    ds.save_as(buf)
    out = dec({"bytes": np.array([buf.getvalue()], dtype=object), "path": np.array(["ct.dcm"])})
    assert list(out["status"]) == ["ok"], out["error"]
    assert list(out["study_key"]) == [hmac.new(secret, ds.StudyInstanceUID.encode(), hashlib.sha256).hexdigest()]
    # Ray may print the callable (and log the stage's repr): the secret's text is in neither form.
    for shown in (repr(dec), str(dec), f"{dec}", repr([dec]), repr({"fn": dec})):
        assert text not in shown and repr(secret) not in shown, shown
    assert repr(dec).startswith("Decoder(")  # the class's own repr, not object.__repr__ by accident
