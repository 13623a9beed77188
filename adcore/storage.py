"""Local paths and ``s3://bucket/prefix`` URIs through ``pyarrow.fs``.

The S3 endpoint and credentials come from the standard AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_REGION``/``AWS_DEFAULT_REGION``), so the same URI works
in a notebook, a Ray worker and Ray Data (pass ``s3_filesystem()`` as its
``filesystem``). An ``http://`` endpoint selects plain HTTP (a local test server).
Nothing here logs or formats credentials into messages.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pyarrow.fs as pafs

S3_PREFIX = "s3://"
_FILE_PREFIX = "file://"


def is_s3(uri: str | os.PathLike) -> bool:
    """True for ``s3://`` URIs."""
    return str(uri).startswith(S3_PREFIX)


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem configured from the AWS environment variables.

    Without ``AWS_ACCESS_KEY_ID`` the AWS SDK's default credential chain applies
    (instance profile, ``~/.aws``).
    """
    kwargs: dict = {}
    endpoint = _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    if endpoint:
        scheme, sep, host = endpoint.partition("://")
        if not sep:
            scheme, host = "https", endpoint
        if scheme not in ("http", "https"):
            raise ValueError(f"AWS_ENDPOINT_URL must start with http:// or https://, not {scheme}://")
        kwargs["endpoint_override"] = host.rstrip("/")
        kwargs["scheme"] = scheme
    region = _env("AWS_REGION", "AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    access_key = _env("AWS_ACCESS_KEY_ID")
    secret_key = _env("AWS_SECRET_ACCESS_KEY")
    if access_key and secret_key:
        kwargs["access_key"] = access_key
        kwargs["secret_key"] = secret_key
        token = _env("AWS_SESSION_TOKEN")
        if token:
            kwargs["session_token"] = token
    return pafs.S3FileSystem(**kwargs)


def local_path(uri: str | os.PathLike) -> str:
    """Absolute local path of a path or ``file://`` URI (``~`` expanded)."""
    text = str(uri)
    if is_s3(text):
        raise ValueError(f"expected a local path, got an S3 URI: {text}")
    if text.startswith(_FILE_PREFIX):
        text = text[len(_FILE_PREFIX) :]
    return os.path.abspath(os.path.expanduser(text))


def absolute(uri: str | os.PathLike) -> str:
    """``uri`` made independent of the working directory: S3 URIs as they are, local paths absolute.

    Ray workers do not run in the driver's directory, so jobs pass absolute paths on.
    """
    return str(uri) if is_s3(str(uri)) else local_path(uri)


def filesystem_for(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The filesystem for ``uri`` and the path inside it (``bucket/key`` or an absolute path)."""
    text = str(uri)
    if is_s3(text):
        path = text[len(S3_PREFIX) :].strip("/")
        if not path:
            raise ValueError(f"S3 URI has no bucket: {text!r}")
        return s3_filesystem(), path
    return pafs.LocalFileSystem(), local_path(text)


def _to_uri(uri: str, path: str) -> str:
    return S3_PREFIX + path if is_s3(uri) else path


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or S3 URI (``/`` separators on S3)."""
    text = str(uri)
    if is_s3(text):
        base = text.rstrip("/")
        rest = [p.strip("/") for p in parts if p and p.strip("/")]
        return posixpath.join(base, *rest) if rest else base
    return os.path.join(text, *parts)


def list_files(uri: str | os.PathLike, suffixes: Iterable[str] | None = None, recursive: bool = True) -> list[str]:
    """Sorted files under ``uri`` as full URIs (``s3://`` kept), optionally by suffix.

    Suffixes compare case-insensitively (``".png"`` matches ``X.PNG``). A URI naming a
    single file lists that file.

    Raises:
        FileNotFoundError: if nothing exists at ``uri``.
    """
    text = str(uri)
    fs, path = filesystem_for(text)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
        except FileNotFoundError:
            raise FileNotFoundError(f"no such directory or prefix: {text}") from None
    wanted = tuple(s.lower() for s in suffixes) if suffixes else None
    out = [
        _to_uri(text, i.path)
        for i in infos
        if i.type == pafs.FileType.File and (wanted is None or i.path.lower().endswith(wanted))
    ]
    return sorted(out)


def read_bytes(uri: str | os.PathLike) -> bytes:
    """The whole content of one file."""
    fs, path = filesystem_for(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {uri}") from None


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write a file, creating parent folders.

    Local writes go to a temporary file in the same folder, then rename over the
    target, so readers never see a partial file. An S3 PUT is atomic by itself.
    """
    if is_s3(uri):
        fs, path = filesystem_for(uri)
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    target = Path(local_path(uri))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def exists(uri: str | os.PathLike) -> bool:
    """True if a file or directory (on S3: an object or a non-empty prefix) is at ``uri``."""
    fs, path = filesystem_for(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str | os.PathLike) -> None:
    """Create a local directory with its parents; a no-op on S3, which has no directories."""
    if not is_s3(uri):
        os.makedirs(local_path(uri), exist_ok=True)


def upload_dir(local_dir: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy every file under ``local_dir`` to ``uri`` (local or S3), keeping relative paths."""
    src = local_path(local_dir)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"no such local directory: {local_dir}")
    dst_fs, dst = filesystem_for(uri)
    makedirs(uri)
    local = pafs.LocalFileSystem()
    pafs.copy_files(src, dst, source_filesystem=local, destination_filesystem=dst_fs)


def download_dir(uri: str | os.PathLike, local_dir: str | os.PathLike) -> None:
    """Copy every file under ``uri`` (local or S3) into ``local_dir``, keeping relative paths."""
    src_fs, src = filesystem_for(uri)
    if src_fs.get_file_info(src).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such directory or prefix: {uri}")
    dst = local_path(local_dir)
    os.makedirs(dst, exist_ok=True)
    local = pafs.LocalFileSystem()
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=local)
