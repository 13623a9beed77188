"""Errors raised by the data package.

Messages name the file (URI or path) and why it failed. They never contain
DICOM patient identifiers: decoders build them from their own text.
"""

from __future__ import annotations

from adcore.errors import UserError

# invalid_header: the file parses, but an attribute the decoder needs holds an unusable value
# (a DICOM IS/DS element holding "1A", a negative size, ...).
# too_many_frames: the header announces more frames than the caller's bound (refused before decoding).
DECODE_ERROR_KINDS = ("empty", "truncated", "unsupported", "corrupt", "too_large", "invalid_header", "too_many_frames")


class DecodeError(UserError, ValueError):
    """An image file could not be turned into frames.

    Attributes:
        uri: The file's name, path or URI as given to the decoder.
        kind: One of ``DECODE_ERROR_KINDS``, so callers can count failures by cause.
        reason: A short human-readable explanation.
    """

    def __init__(self, uri: str, kind: str, reason: str):
        if kind not in DECODE_ERROR_KINDS:
            raise ValueError(f"unknown DecodeError kind {kind!r}; expected one of {DECODE_ERROR_KINDS}")
        self.uri = str(uri)
        self.kind = kind
        self.reason = reason
        super().__init__(f"cannot decode {self.uri}: {kind}: {reason}")

    def __reduce__(self):
        # Keeps the error picklable across process boundaries (Ray workers).
        return (type(self), (self.uri, self.kind, self.reason))


class DatasetLayoutError(UserError, ValueError):
    """A dataset folder does not have the expected layout."""

    def __init__(self, path, expected: str):
        self.path = str(path)
        self.expected = expected
        super().__init__(f"bad dataset layout at {self.path}: expected {expected}")

    def __reduce__(self):
        return (type(self), (self.path, self.expected))
