"""Training images that cannot be read or decoded: skipped, counted, named; a run refused above a share.

A training set of a hospital's archive holds a few files that are truncated, not images, or gone;
one of them must not end a run of hours. A read is retried (:func:`read_with_retries`, a store's
transient errors); a file still unreadable, or one that does not decode, is skipped and named in the
training summary by its path under ``--data``. When more than ``--max-bad-share`` of the training
images are skipped the run stops with one line that says so: the set, not a file, is then at fault.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from adcore.errors import UserError
from adcore.training import dist

log = logging.getLogger("adcore.train")

MAX_BAD_SHARE = 0.01  # default --max-bad-share: at most 1 % of the training images skipped
READ_ATTEMPTS = 3  # reads of one file before it counts as unreadable (decode errors are not retried)
RETRY_WAIT_S = 0.5  # first wait between read attempts; doubles each retry
NAMED_AT_MOST = 100  # skipped files named in the summary (all are counted)


class BadImageShareError(UserError):
    """More training images could not be read or decoded than ``--max-bad-share`` allows."""


def read_with_retries(read: Callable[[str], bytes], uri: str, attempts: int = READ_ATTEMPTS) -> bytes:
    """``read(uri)``, retried on ``OSError`` (a store's transient failure) with a doubling wait."""
    for attempt in range(attempts):
        try:
            return read(uri)
        except OSError:
            if attempt + 1 == attempts:
                raise
            time.sleep(RETRY_WAIT_S * 2**attempt)
    raise AssertionError("unreachable")


def reason_of(exc: BaseException) -> str:
    """A short reason for a skipped file, without its path: a decode error's kind, else the error's type."""
    return getattr(exc, "kind", None) or type(exc).__name__


class SkippedImages:
    """This rank's skipped images of one split, named relative to the data root.

    Args:
        root: The ``--data`` folder or prefix; names are paths below it.
        max_share: Share of ``total`` that may be skipped before the run is refused.
        total: Images of the split over all ranks (0: not known yet, :meth:`expect` sets it).
        split: The split's name, for messages.
    """

    def __init__(self, root: str = "", max_share: float = MAX_BAD_SHARE, total: int = 0, split: str = "train"):
        self.root, self.max_share, self.total, self.split = str(root).rstrip("/"), max_share, total, split
        self.files: dict[str, str] = {}  # name -> reason

    def __len__(self) -> int:
        return len(self.files)

    def expect(self, total: int) -> None:
        """Set the split's image count over all ranks, unless given already."""
        self.total = self.total or total

    def name(self, uri: str) -> str:
        uri = str(uri)
        return uri[len(self.root) + 1 :] if self.root and uri.startswith(self.root + "/") else uri

    def add(self, uri: str, reason: str) -> None:
        """Record a skipped image; refuse the run as soon as this rank alone exceeds the share."""
        name = self.name(uri)
        if name in self.files:
            return
        self.files[name] = reason
        log.warning("skipped a %s image that cannot be read or decoded (%s): %s", self.split, reason, name)
        if self.total and len(self.files) > self.max_share * self.total:
            self._refuse(self.files)

    def check(self, world_size: int) -> None:
        """Refuse the run when the ranks together skipped more than the share (every rank must call it)."""
        files = self._union(world_size)
        if self.total and len(files) > self.max_share * self.total:
            self._refuse(files)

    def summary(self, world_size: int | None) -> dict[str, Any]:
        """What the training summary says of the skipped images: over the ranks (every rank must call
        it), or this rank's alone with ``world_size`` None (a split every rank reads whole)."""
        files = self._union(world_size)
        named = dict(sorted(files.items())[:NAMED_AT_MOST])
        return {"count": len(files), "of": self.total, "files": named}

    def _union(self, world_size: int | None) -> dict[str, str]:
        files: dict[str, str] = {}
        for part in [self.files] if world_size is None else dist.gather_objects(self.files, world_size):
            files |= part
        return files

    def _refuse(self, files: dict[str, str]) -> None:
        name, reason = next(iter(sorted(files.items())))
        raise BadImageShareError(
            f"{len(files)} of {self.total} {self.split} images cannot be read or decoded, more than "
            f"--max-bad-share {self.max_share:g} allows (e.g. {name}: {reason}); repair or remove them, "
            "or raise --max-bad-share"
        )
