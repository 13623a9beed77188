"""Wall time of a night's phases (listing, planning, scoring, compaction), for the run's manifest."""

from __future__ import annotations

import contextlib
import time


class Timings:
    """``with t.phase("list_s"): ...`` adds the block's seconds to ``t.seconds["list_s"]``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.monotonic() - t0, 3)
