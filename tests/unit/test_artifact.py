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


HOSTILE_NAMES = ["../x", "/etc/x", "a/../../x", "a//b", "./a", "a\\..\\x", "C:x", "", "a/\x00b"]


def _with_manifest_entry(manifest: dict, name: str, data: bytes) -> bytes:
    import hashlib

    files = {**manifest["files"], name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}}
    return json.dumps({**manifest, "files": files}).encode()


def _all_files(root):
    return sorted(str(p) for p in root.rglob("*"))


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_local_manifest_names_must_stay_inside(tmp_path, rng, name):
    config, state, arrays = _contents(rng)
    folder = tmp_path / "a"
    save_artifact(folder, config, state, arrays)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_bytes(_with_manifest_entry(manifest, name, b"x"))
    with pytest.raises(ArtifactError, match="manifest.json of .* lists .*refused") as err:
        load_artifact(folder)
    assert "\n" not in str(err.value)


def test_local_symlinks_leaving_the_folder_are_refused(tmp_path, rng):
    config, state, arrays = _contents(rng)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "notes.txt").write_bytes(b"hi")
    folder = tmp_path / "a"
    save_artifact(folder, config, state, arrays, extra_files={"notes/notes.txt": b"hi"})
    # The same bytes behind a link out of the folder: the digest matches, the place does not.
    (folder / "notes" / "notes.txt").unlink()
    (folder / "notes" / "notes.txt").symlink_to(outside / "notes.txt")
    with pytest.raises(ArtifactError, match="notes/notes.txt of .*symbolic link leaving"):
        load_artifact(folder)
    # A linked sub-folder is the same escape.
    (folder / "notes" / "notes.txt").unlink()
    (folder / "notes").rmdir()
    (folder / "notes").symlink_to(outside)
    with pytest.raises(ArtifactError, match="symbolic link leaving"):
        load_artifact(folder)
    # A link that stays inside is fine.
    (folder / "notes").unlink()
    (folder / "notes").mkdir()
    (folder / "copy.txt").write_bytes(b"hi")
    (folder / "notes" / "notes.txt").symlink_to(folder / "copy.txt")
    load_artifact(folder)


@pytest.mark.parametrize("name", ["../x", "/etc/x", "ABSOLUTE", "../../outside/x"])
def test_s3_manifest_names_refused_before_any_write(s3_server, tmp_path, rng, name):
    bucket = s3_server.make_bucket("artifact-hostile")
    uri = storage.join(bucket, "models", "toy")
    config, state, arrays = _contents(rng)
    save_artifact(uri, config, state, arrays)
    if name == "ABSOLUTE":  # an absolute path this test can look at afterwards
        name = str(tmp_path / "outside" / "x")
    manifest = json.loads(storage.read_bytes(storage.join(uri, "manifest.json")))
    storage.write_bytes(storage.join(uri, "manifest.json"), _with_manifest_entry(manifest, name, b"payload"))
    # The object the hostile name points at exists on the store (S3 keys may hold "..").
    storage.write_bytes(f"{uri}/{name.lstrip('/')}", b"payload")
    before = _all_files(tmp_path)
    with pytest.raises(ArtifactError, match="lists .*refused"):
        load_artifact(uri, cache_dir=tmp_path / "cache")
    assert _all_files(tmp_path) == before  # nothing written: not the cache, not outside it
    assert not (tmp_path / "outside").exists()
