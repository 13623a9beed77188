"""Artifact round trips (local and S3) and tamper detection."""

import json

import numpy as np
import pytest
import torch

from adcore import storage
from adcore.artifact import ArtifactError, load_artifact, save_artifact


def _contents(rng):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    config = {"name": "toy", "layers": [4, 3, 2], "calibration": {"score_lo": 0.1}}
    arrays = {
        "memory_bank": rng.normal(size=(10, 4)).astype(np.float32),
        "centroids": np.arange(6, dtype=np.int64).reshape(2, 3),
    }
    return config, model.state_dict(), arrays


def _assert_same(art, config, state, arrays):
    assert art.config == config
    assert set(art.state_dict) == set(state)
    for k, v in state.items():
        torch.testing.assert_close(art.state_dict[k], v)
    assert set(art.arrays) == set(arrays)
    for k, v in arrays.items():
        np.testing.assert_array_equal(art.arrays[k], v)
        assert art.arrays[k].dtype == v.dtype


def test_local_round_trip_and_overwrite(tmp_path, rng):
    config, state, arrays = _contents(rng)
    uri = str(tmp_path / "models" / "toy")
    assert save_artifact(uri, config, state, arrays, extra_files={"notes/readme.txt": b"hi"}) == uri
    art = load_artifact(uri)
    _assert_same(art, config, state, arrays)
    assert (art.path / "notes" / "readme.txt").read_bytes() == b"hi"
    files = art.manifest["files"]
    assert set(files) == {"config.json", "weights.safetensors", "arrays.safetensors", "notes/readme.txt"}
    assert art.manifest["format_version"] == 1
    assert files["notes/readme.txt"]["size"] == 2

    save_artifact(uri, {**config, "name": "toy2"}, state, arrays)
    again = load_artifact(uri)
    assert again.config["name"] == "toy2"
    assert not (again.path / "notes").exists()
    # no staging or old copies left beside the artifact
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["toy"]


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda d: (d / "weights.safetensors").write_bytes(b"x" * 10), "weights.safetensors"),
        (lambda d: (d / "arrays.safetensors").unlink(), "arrays.safetensors of .*: missing"),
        (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
        (lambda d: (d / "manifest.json").write_text("{"), "not valid JSON"),
    ],
)
def test_tamper_detection(tmp_path, rng, tamper, message):
    config, state, arrays = _contents(rng)
    save_artifact(tmp_path / "a", config, state, arrays)
    tamper(tmp_path / "a")
    with pytest.raises(ArtifactError, match=message):
        load_artifact(tmp_path / "a")


def test_same_size_edit_detected(tmp_path, rng):
    config, state, arrays = _contents(rng)
    save_artifact(tmp_path / "a", config, state, arrays)
    path = tmp_path / "a" / "config.json"
    text = path.read_text()
    path.write_text(text.replace('"toy"', '"tox"'))
    with pytest.raises(ArtifactError, match="config.json .*sha256"):
        load_artifact(tmp_path / "a")


def test_errors(tmp_path, rng):
    config, state, arrays = _contents(rng)
    with pytest.raises(ArtifactError, match="no artifact directory"):
        load_artifact(tmp_path / "nowhere")
    with pytest.raises(ArtifactError, match="reserved"):
        save_artifact(tmp_path / "b", config, state, arrays, extra_files={"manifest.json": b"{}"})
    with pytest.raises(ArtifactError, match="leaves"):
        save_artifact(tmp_path / "b", config, state, arrays, extra_files={"../x": b""})
    assert not (tmp_path / "b").exists()


def test_s3_round_trip_and_cache(s3_server, tmp_path, rng):
    bucket = s3_server.make_bucket("artifact-test")
    uri = storage.join(bucket, "models", "toy")
    config, state, arrays = _contents(rng)
    save_artifact(uri, config, state, arrays)
    art = load_artifact(uri, cache_dir=tmp_path / "cache")
    _assert_same(art, config, state, arrays)
    assert art.path == tmp_path / "cache" / "artifact-test" / "models" / "toy"

    # A corrupted cached copy is fetched again; a corrupted remote file is reported.
    (art.path / "weights.safetensors").write_bytes(b"junk")
    _assert_same(load_artifact(uri, cache_dir=tmp_path / "cache"), config, state, arrays)
    storage.write_bytes(storage.join(uri, "arrays.safetensors"), b"junk")
    with pytest.raises(ArtifactError, match="arrays.safetensors of s3://artifact-test/models/toy"):
        load_artifact(uri, cache_dir=tmp_path / "cache2")
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load_artifact(storage.join(bucket, "absent"), cache_dir=tmp_path / "cache")


def test_s3_manifest_written_last(s3_server, tmp_path, rng, monkeypatch):
    bucket = s3_server.make_bucket("artifact-order")
    uri = storage.join(bucket, "m")
    config, state, arrays = _contents(rng)
    written = []
    real_write, real_upload = storage.write_bytes, storage.upload_dir
    monkeypatch.setattr(storage, "write_bytes", lambda u, d: (written.append(str(u)), real_write(u, d)))
    monkeypatch.setattr(storage, "upload_dir", lambda s, u: (written.append("upload"), real_upload(s, u)))
    save_artifact(uri, config, state, arrays)
    assert written == ["upload", storage.join(uri, "manifest.json")]
    manifest = json.loads(storage.read_bytes(storage.join(uri, "manifest.json")))
    assert manifest["files"]["config.json"]["size"] > 0
