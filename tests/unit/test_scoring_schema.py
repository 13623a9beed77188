"""Pure pieces of the scoring job: schema, study keys, masks, run ids, resource plan, ledger view."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac

import numpy as np
import pytest

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
    out = Decoder(16, 10_000)(batch)
    assert list(out["status"]) == ["skipped", "ok", "error", "error"] and out["pixels"].shape == (4, 1, 16, 16)
    assert out["error"][2].startswith("empty:") and out["error"][3].startswith("read:")
    assert list(out["file_version"]) == ["1", "2", "3", "4"] and list(out["file_size"]) == [len(png), len(png), 0, 5]
    assert out["content_sha256"][3] is None  # nothing was read


def test_decoder_uses_the_job_secret_but_never_shows_it(monkeypatch):
    import io

    import pydicom
    from pydicom.data import get_testdata_file

    from jobs.score import SECRET_ENV
    from jobs.scoring.stages import Decoder

    text = "decoder-secret-Zq81xv" * 2
    monkeypatch.setenv(SECRET_ENV, text)  # read by the decoder where it runs (tests/unit/test_shipped_secrets.py)
    secret = text.encode()
    dec = Decoder(128, 100_000, study_keys=True)  # as jobs/score.py builds it (CT_small is 128x128)
    # It does use the secret: a DICOM's study_key is keyed by it.
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


def test_added_columns_read_as_null_and_image_key_as_the_older_files_uri():
    import pyarrow as pa

    assert S.SCHEMA_VERSION == 4 and S.ADDED_COLUMNS[3] == ("category", "category_scores")
    assert S.ADDED_COLUMNS[4] == ("image_key",) and S.KEY_COLUMNS[0] == "image_key"
    for col in ("category", "category_scores", "file_size", "file_version", "image_key"):
        assert col in S.SCHEMA.names and col in S.__doc__
    old = pa.table({"image_uri": ["a", "b"], "frame": pa.array([0, 0], pa.int32())})  # a version 1 file
    got = S.with_added_columns(old)
    assert set(got.column_names) == {
        "image_uri", "frame", "file_size", "file_version", "category", "category_scores", "image_key"
    }  # fmt: skip
    assert (
        got.column("category").null_count == 2
        and got.schema.field("category_scores").type == S.SCHEMA.field("category_scores").type
    )
    assert got.column("image_key").to_pylist() == ["a", "b"]  # runs before keys kept paths: the key is the URI
    assert S.with_added_columns(old, ["category"]).column_names == ["image_uri", "frame", "category"]


def test_image_keys_keep_or_pseudonymize_with_a_long_enough_secret():
    uris = ["s3://pacs/DOE^JOHN/MRN1234567/1.dcm", "/archive/x.png"]
    assert S.image_keys(uris, "keep", None) == uris
    secret = b"k" * S.MIN_SECRET_BYTES
    keys = S.image_keys(uris, "pseudonymize", secret)
    assert all(len(k) == 64 and "DOE" not in k for k in keys) and len(set(keys)) == 2
    assert keys == S.image_keys(uris, "pseudonymize", secret)  # stable: incremental skipping works on keys
    assert keys != S.image_keys(uris, "pseudonymize", b"j" * S.MIN_SECRET_BYTES)  # keyed, not a plain hash
    for short in (None, b"", b"k" * (S.MIN_SECRET_BYTES - 1)):
        with pytest.raises(ValueError, match="use at least 32"):
            S.image_keys(uris, "pseudonymize", short)
    msg = "FileNotFoundError: [Errno 2] Failed to open local file 'pacs/DOE^JOHN/MRN1234567/1.dcm'; 1.dcm gone"
    scrubbed = S.scrub_paths(msg, uris[0], "<image>")
    assert "DOE" not in scrubbed and "1.dcm" not in scrubbed and scrubbed.startswith("FileNotFoundError")


def _score_rows(artifact: str, tmp_path, n: int = 4):
    """Decoder -> ScoreStage -> Postprocess on a few PNGs, as the job chains them (without Ray)."""
    import json
    from pathlib import Path

    from jobs.scoring.stages import Decoder, Postprocess, ScoreStage

    rng = np.random.default_rng(0)
    from PIL import Image

    paths = []
    for i in range(n):
        img = (rng.random((40, 48)) * 255).astype(np.uint8)
        if i % 2:
            img[10:25, 10:25] = 255
        p = tmp_path / f"{i}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    stage = ScoreStage(artifact, engine="torch")
    batch = {
        "bytes": np.array([p.read_bytes() for p in paths], dtype=object),
        "path": np.array([str(p) for p in paths]),
    }
    decoded = Decoder(stage.scorer.input_size, 10_000_000)(batch)
    config = json.loads(Path(artifact, "config.json").read_text())
    return Postprocess(config, "run-1")(stage(decoded)), stage.scorer


@pytest.fixture(scope="module")
def stages_ray():
    """The job's stages read the Ray node they run on: called here, they start a local Ray (one per module)."""
    import ray

    running = ray.is_initialized()
    yield
    if not running:
        ray.shutdown()


@pytest.mark.integration
def test_rows_of_a_model_with_categories_carry_them(tmp_path, tiny_artifacts, stages_ray):
    art = tiny_artifacts("sdmad", 4)
    table, scorer = _score_rows(art, tmp_path)
    names = scorer.categories
    assert len(names) >= 3
    rows = table.to_pylist()
    for r in rows:
        scores = dict(r["category_scores"])
        assert list(scores) == list(names) and all(0 <= v <= 1 for v in scores.values())
        if r["label"] == 1:
            assert r["category"] == max(scores, key=scores.get)
        else:
            assert r["category"] is None  # normal rows: null category
    from PIL import Image

    want = scorer.score_images([np.asarray(Image.open(tmp_path / f"{i}.png"), np.float32) / 255 for i in range(4)])
    assert [r["category"] for r in rows] == [w.category for w in want]  # the job's rows are the Scorer's


@pytest.mark.integration
def test_rows_of_a_model_without_categories_have_null_category(tmp_path, tiny_artifacts, stages_ray):
    art = tiny_artifacts("patchcore")
    table, scorer = _score_rows(art, tmp_path)
    internal = ("_node_id", "_scored_unix", "_oom_splits", "_file_frames")  # counted by the sink, not written
    expected = S.SCHEMA
    for name in internal:
        expected = expected.append(table.schema.field(name))
    assert scorer.categories == () and table.schema.equals(expected)
    assert table.column("category").null_count == table.num_rows == table.column("category_scores").null_count


def test_ledger_reads_schema_2_files_beside_schema_3_ones(tmp_path):
    import pyarrow.parquet as pq

    from jobs.scoring import ledger

    now = dt.datetime.now(dt.timezone.utc)
    cols = {"image_uri": ["a"], "frame": [0], "status": ["ok"], "label": [1], "category": ["cyst"]}
    new = S.to_table(
        {**cols, "category_scores": [[("cyst", 0.75)]]}, model_name="m", model_version="v", run_id="r2", scored_at=now
    )
    old = new.drop_columns(["category", "category_scores"])  # what a schema 2 run wrote
    pq.write_table(old, tmp_path / "old.parquet")
    pq.write_table(new, tmp_path / "new.parquet")
    both = ledger._read_tables(
        [str(tmp_path / "old.parquet"), str(tmp_path / "new.parquet")], ["image_uri", "category"]
    )
    assert both.column("category").to_pylist() == [None, "cyst"]
    whole = ledger._read_tables([str(tmp_path / "old.parquet")])
    assert set(S.SCHEMA.names) <= set(whole.column_names) and whole.column("category_scores").null_count == 1
