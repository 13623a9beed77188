"""Pure pieces of the scoring job: schema, study keys, masks, run ids, resource plan, ledger view."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac

import numpy as np

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


def test_decoder_reads_listed_files_skips_done_frames_and_reports_errors(tmp_path):
    from jobs.scoring.stages import Decoder

    png = S.encode_mask(np.ones((8, 8), bool))
    sha = S.content_sha256(png)
    for name in ("done.png", "new.png", "z.png"):
        (tmp_path / name).write_bytes(b"" if name == "z.png" else png)
    uris = [str(tmp_path / n) for n in ("done.png", "new.png", "z.png", "gone.png")]
    batch = {
        "uri": np.array(uris, dtype=object),
        "size": np.array([len(png), len(png), 0, 5]),
        "version": np.array(["1", "2", "3", "4"], dtype=object),
        "prior_sha": np.array([sha, None, None, None], dtype=object),
        "prior_done": np.array([[0], None, None, None], dtype=object),
    }
    out = Decoder(16, 10_000, secret=b"s")(batch)
    assert list(out["status"]) == ["skipped", "ok", "error", "error"] and out["pixels"].shape == (4, 3, 16, 16)
    assert out["error"][2].startswith("empty:") and out["error"][3].startswith("read:")
    assert list(out["file_version"]) == ["1", "2", "3", "4"] and list(out["file_size"]) == [len(png), len(png), 0, 5]
    assert out["content_sha256"][3] is None  # nothing was read


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
    dec = Decoder(128, 100_000, secret)  # as jobs/score.py builds it (CT_small is 128x128)
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
