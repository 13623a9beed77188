"""Storage on local paths and on a real S3 endpoint (moto server on 127.0.0.1)."""

import os

import pytest

from adcore import storage


def _settings(fs) -> dict:
    return fs.__reduce__()[1][0]  # the keyword arguments pyarrow pickles the filesystem with


def test_is_s3_and_join(tmp_path):
    assert storage.is_s3("s3://b/p") and not storage.is_s3(tmp_path)
    assert storage.join("s3://b/p/", "a", "/c.txt") == "s3://b/p/a/c.txt"
    assert storage.join("s3://b", "") == "s3://b"
    assert storage.join(str(tmp_path), "a", "b") == os.path.join(str(tmp_path), "a", "b")


def test_filesystem_from_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000/")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id-1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    fs, path = storage.filesystem_for("s3://bucket/some/prefix/")
    assert path == "bucket/some/prefix"
    assert fs.__reduce__()[1][0].settings == ("127.0.0.1:9000", "http", "eu-west-3")
    got = _settings(storage.s3_filesystem())
    assert (got["endpoint_override"], got["scheme"], got["region"]) == ("127.0.0.1:9000", "http", "eu-west-3")
    assert "very-secret-value" not in repr(fs) and "very-secret-value" not in str(fs)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://s3.example.org")
    assert _settings(storage.s3_filesystem())["scheme"] == "https"
    with pytest.raises(ValueError, match="no bucket"):
        storage.filesystem_for("s3://")


def test_local_round_trip(tmp_path):
    root = tmp_path / "data"
    storage.write_bytes(root / "a" / "x.PNG", b"png")
    storage.write_bytes(f"file://{root}/b.txt", b"text")
    storage.write_bytes(root / "a" / "deep" / "y.png", b"png2")
    assert storage.read_bytes(root / "a" / "x.PNG") == b"png"
    assert storage.list_files(root) == sorted(
        [str(root / "a" / "x.PNG"), str(root / "a" / "deep" / "y.png"), str(root / "b.txt")]
    )
    assert storage.list_files(root, suffixes=[".png"]) == [
        str(root / "a" / "deep" / "y.png"),
        str(root / "a" / "x.PNG"),
    ]
    assert storage.list_files(root, recursive=False) == [str(root / "b.txt")]
    assert storage.list_files(root / "b.txt") == [str(root / "b.txt")]
    # atomic write leaves no temporary file behind
    assert sorted(p.name for p in (root / "a").iterdir()) == ["deep", "x.PNG"]
    assert storage.exists(root / "b.txt") and not storage.exists(root / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        storage.read_bytes(root / "nope")
    with pytest.raises(FileNotFoundError, match="missing"):
        storage.list_files(tmp_path / "missing")


def test_local_copy_dirs(tmp_path):
    src = tmp_path / "src"
    storage.write_bytes(src / "k" / "v.bin", b"\x00\x01")
    storage.upload_dir(src, tmp_path / "dst")
    storage.download_dir(tmp_path / "dst", tmp_path / "back")
    assert (tmp_path / "back" / "k" / "v.bin").read_bytes() == b"\x00\x01"


def test_s3_round_trip(s3_server, tmp_path):
    bucket = s3_server.make_bucket("storage-test")
    prefix = storage.join(bucket, "run1")
    storage.write_bytes(storage.join(prefix, "img", "a.png"), b"A")
    storage.write_bytes(storage.join(prefix, "img", "sub", "b.png"), b"B")
    storage.write_bytes(storage.join(prefix, "notes.txt"), b"N")
    assert storage.read_bytes("s3://storage-test/run1/img/a.png") == b"A"
    assert storage.list_files(prefix, suffixes=[".png"]) == [
        "s3://storage-test/run1/img/a.png",
        "s3://storage-test/run1/img/sub/b.png",
    ]
    assert storage.list_files(prefix, recursive=False) == ["s3://storage-test/run1/notes.txt"]
    assert storage.exists(prefix) and storage.exists(storage.join(prefix, "notes.txt"))
    assert not storage.exists(storage.join(prefix, "none.txt"))
    storage.makedirs(storage.join(prefix, "empty"))  # no-op on S3, must not fail
    with pytest.raises(FileNotFoundError, match="s3://storage-test/run1/none.txt"):
        storage.read_bytes(storage.join(prefix, "none.txt"))

    storage.download_dir(prefix, tmp_path / "local")
    assert (tmp_path / "local" / "img" / "sub" / "b.png").read_bytes() == b"B"
    storage.upload_dir(tmp_path / "local", storage.join(bucket, "copy"))
    assert storage.read_bytes(storage.join(bucket, "copy", "img", "sub", "b.png")) == b"B"
    with pytest.raises(FileNotFoundError, match="s3://storage-test/absent"):
        storage.download_dir(storage.join(bucket, "absent"), tmp_path / "x")


def test_s3_secret_never_in_repr(s3_server):
    fs = storage.s3_filesystem()
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret not in repr(fs) and secret not in str(fs)
    _, path = storage.filesystem_for("s3://storage-test/x")
    assert secret not in repr((fs, path))
