"""What the jobs ship to Ray (task callables, actor arguments, Train's RunConfig) carries no credential.

Each object is built the way the job builds it, with credentials in the environment, then pickled
with Ray's own cloudpickle; the pickle is searched for every secret's bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import io

import numpy as np
import pyarrow.fs as pafs
import pytest
from ray import cloudpickle

from adcore import storage
from jobs.scoring import schema as S

KEY_ID = "AKIAEXAMPLEKEYID0042"
SECRET_KEY = "s3-secret-Xq9rT2vW8yZ1bC4dE6fG"
SESSION_TOKEN = "session-token-Hj5kL7mN9pQ2"
STUDY_SECRET = "study-key-secret-" + "Zq81xv" * 6  # 53 bytes
SECRETS = (KEY_ID, SECRET_KEY, SESSION_TOKEN, STUDY_SECRET)


def _clean_pickle(obj) -> bytes:
    """``obj`` pickled as Ray ships it; fails if any secret (or its key id) is inside."""
    data = cloudpickle.dumps(obj)
    found = [s for s in SECRETS if s.encode() in data]
    assert not found, f"{type(obj).__name__} carries {found} in its pickle"
    return data


@pytest.fixture
def credentials(s3_server, monkeypatch):
    """The S3 server's environment with this test's credentials (moto accepts any) and study secret."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)
    monkeypatch.setenv(S.SECRET_ENV, STUDY_SECRET)
    return s3_server


def test_the_search_finds_a_shipped_secret():
    """The check can fail: an S3 filesystem given its keys explicitly, or a decoder holding the key, is caught."""
    with pytest.raises(AssertionError, match="carries"):
        _clean_pickle(
            pafs.S3FileSystem(
                access_key=KEY_ID,
                secret_key=SECRET_KEY,
                region="us-east-1",
                endpoint_override="127.0.0.1:9",
                scheme="http",
            )
        )
    with pytest.raises(AssertionError, match="carries"):
        _clean_pickle({"secret": STUDY_SECRET.encode()})


def test_storage_filesystems_carry_no_key(credentials):
    bucket = credentials.make_bucket("shipped")
    storage.write_bytes(f"{bucket}/a.bin", b"abc")  # the credential chain signs requests
    fs = storage.s3_filesystem()
    assert fs is storage.s3_filesystem()  # one per process
    _clean_pickle(fs)
    reader = storage.Reader()
    assert reader.read(f"{bucket}/a.bin") == b"abc"
    _clean_pickle(reader)
    restored = cloudpickle.loads(cloudpickle.dumps(fs))  # a worker's copy reads with its own chain
    with restored.open_input_stream("shipped/a.bin") as f:
        assert f.read() == b"abc"


def test_decoder_reads_the_study_secret_in_the_worker(credentials, monkeypatch):
    import pydicom
    from pydicom.data import get_testdata_file

    from jobs.scoring.stages import Decoder

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    buf = io.BytesIO()
    ds.save_as(buf)
    batch = {"bytes": np.array([buf.getvalue()], dtype=object), "path": np.array(["ct.dcm"])}
    want = hmac.new(STUDY_SECRET.encode(), ds.StudyInstanceUID.encode(), hashlib.sha256).hexdigest()

    decoder = Decoder(128, 100_000, study_keys=True)  # as jobs/score.py builds it (CT_small is 128x128)
    _clean_pickle(decoder)
    assert list(decoder(batch)["study_key"]) == [want]  # used once, the key is cached in the object...
    shipped = _clean_pickle(decoder)  # ...and still not pickled with it
    worker = cloudpickle.loads(shipped)
    assert list(worker(batch)["study_key"]) == [want]  # the worker reads its own environment
    monkeypatch.delenv(S.SECRET_ENV)  # a node without it: refused, never a null key in silence
    with pytest.raises(RuntimeError, match=f"{S.SECRET_ENV} is not set on this node"):
        cloudpickle.loads(shipped)(batch)
    assert list(Decoder(128, 100_000)(batch)["study_key"]) == [None]  # a driver without it asks for none


def test_study_secret_needs_32_bytes(monkeypatch):
    monkeypatch.setenv(S.SECRET_ENV, "x" * (S.MIN_SECRET_BYTES - 1))
    with pytest.raises(ValueError, match=f"{S.SECRET_ENV} is 31 bytes; use at least 32") as err:
        S.study_key_secret()
    assert "xxx" not in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setenv(S.SECRET_ENV, "x" * S.MIN_SECRET_BYTES)
    assert S.study_key_secret() == b"x" * 32
    monkeypatch.delenv(S.SECRET_ENV)
    assert S.study_key_secret() is None


def test_scoring_stages_carry_no_secret(credentials, tiny_artifact, tmp_path):
    from adcore.artifact import load_artifact
    from jobs.scoring import dicom_out
    from jobs.scoring.sink import RunSink
    from jobs.scoring.stages import Postprocess

    art = load_artifact(tiny_artifact).config
    output = credentials.make_bucket("shipped-out") + "/scores"
    # ScoreStage is an actor class: Ray ships its constructor's arguments (jobs/score.py's stage_kwargs).
    stage_kwargs = {"artifact": tiny_artifact, "engine": "auto", "variant": "fp32", "triton_url": None}
    for obj in (
        stage_kwargs,
        Postprocess(art, "run-1"),
        dicom_out.DicomWriter(str(tmp_path / "dicom"), "run-1", "m", "v", "0"),
        RunSink(output, f"{output}/run-1", {"run_id": "run-1"}, rows_per_write=10, progress=None),
    ):
        _clean_pickle(obj)


def test_train_run_config_carries_no_key(credentials, tmp_path):
    """Ray Train pickles the trainer (RunConfig with its storage filesystem) to its controller and workers."""
    from adcore.training import TrainConfig
    from jobs.train import JobConfig, build_trainer

    bucket = credentials.make_bucket("shipped-train")
    job = JobConfig(data=str(tmp_path), output=f"{bucket}/model", stream=False)
    trainer = build_trainer(job, TrainConfig(preset="patchcore", tiny=True))
    assert isinstance(trainer.run_config.storage_filesystem, pafs.S3FileSystem)
    _clean_pickle(trainer.run_config)
    _clean_pickle(trainer)


def test_driver_runtime_env_forwards_no_credential(credentials):
    from jobs.common import driver_runtime_env

    env = driver_runtime_env()["env_vars"]
    assert "AWS_ENDPOINT_URL" in env  # settings travel...
    assert not set(env.values()) & set(SECRETS)  # ...credentials never
