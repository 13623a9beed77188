"""The hostile corpus (``tests/hostile_corpus.py``) through ``jobs/score.py``, with its memory watched.

Over 300 entries made from the real corpus at test time (damaged copies, header fields at
extremes, decompression bombs, a file over ``--max-file-bytes``, a sparse 64 GiB file, a FIFO,
a socket, links to ``/dev/zero``, out of the folder and to nothing) in one folder, scored by one
run of the job from its command line (its own local Ray) with the tiny artifact. Every entry
has its rows: one per frame for files that decode (as :func:`adcore.data.decode_image` makes
them in this process), one error row of the right kind for the rest; the run lists every entry
once; and the job's process tree (driver, Ray's processes and workers) stays under the memory
bounds below all along.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from jobs.scoring import ledger
from jobs.scoring import schema as S
from tests import hostile_corpus as hc
from tests.integration.test_score_job import visible

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
MAX_FILE_BYTES = 8 * 2**20  # every damaged copy is smaller; the "big" entry is larger
RUN_TIMEOUT_S = 420
# Memory bounds of the job's process tree. Measured on 2 CPUs: about 4.0 GiB in all over 20
# processes (the driver and Ray's own processes, and the workers with torch loaded), the largest
# process (the model replica) 0.8-0.9 GiB, a decode task under 0.5 GiB. Each CPU adds a worker.
# Without the frame bound and the decoder's chunks, one decode task holding the prepared frames
# of the 1x1 DICOM of 262,144 frames passes 2 GiB within seconds (at the tiny model's 56 px).
MAX_PROCESS_RSS = int(1.5 * 2**30)
MAX_TREE_RSS = 4 * 2**30 + (os.cpu_count() or 1) * 2**29
POLL_S = 0.05


class TreeMemory:
    """Peak resident memory of a process and its descendants, polled from ``/proc`` in a thread.

    ``peak_total``: the largest sum of VmRSS over the tree at one poll. ``peaks``: each process's
    largest VmHWM seen (the kernel's own peak RSS of the process), by pid, with its name. A tree
    that passes a bound is killed at once (the test then fails on the peaks), so a regression
    cannot take the machine's memory.
    """

    def __init__(self, pid: int, max_process: int, max_total: int):
        self.pid, self.max_process, self.max_total = pid, max_process, max_total
        self.peak_total = 0
        self.peaks: dict[int, tuple[int, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    @property
    def peak_process(self) -> tuple[int, str]:
        return max(self.peaks.values(), default=(0, ""))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            total, tree = 0, self._tree()
            for pid in tree:
                status = _status(pid)
                if status:
                    total += status.get("VmRSS", 0)
                    self.peaks[pid] = max(self.peaks.get(pid, (0, "")), (status.get("VmHWM", 0), status["Name"]))
            self.peak_total = max(self.peak_total, total)
            if self.peak_total >= self.max_total or self.peak_process[0] >= self.max_process:
                for pid in tree:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)

    def summary(self) -> str:
        top = sorted(self.peaks.values(), reverse=True)[:6]
        return (
            f"peak tree RSS {self.peak_total / 2**30:.2f} GiB over {len(self.peaks)} processes; largest: "
            + ", ".join(f"{name} {hwm / 2**30:.2f}" for hwm, name in top)
        )

    def _tree(self) -> list[int]:
        children = collections.defaultdict(list)
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children[ppid].append(int(entry))
        tree, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo += children.get(pid, [])
        return tree


def _status(pid: int) -> dict:
    """Name, VmRSS and VmHWM (bytes) of a process; empty once it is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "Name":
                    out[key] = value.strip()
                elif key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        return {}
    return out


def _expected(folder: Path, entries: list[hc.Expect], max_frames: int) -> dict[str, tuple]:
    """name -> ("error", kind) for a file refused or failing whole, or ("frames", n, n_failed)."""
    from adcore.data import DecodeError, decode_image
    from jobs.score import DEFAULT_MAX_PIXELS

    out = {}
    for e in entries:
        if e.kind is not None:
            out[e.name] = ("error", e.kind)
            continue
        try:
            data = (folder / e.name).read_bytes()
            frames = decode_image(data, e.name, max_pixels=DEFAULT_MAX_PIXELS, max_frames=max_frames, frame_errors=True)
        except DecodeError as err:
            out[e.name] = ("error", err.kind)
        else:
            out[e.name] = ("frames", len(frames), sum(f.error is not None for f in frames))
    return out


def test_hostile_corpus_gets_its_rows_within_memory_bounds(tiny_artifact, tmp_path):
    from jobs.score import DEFAULT_MAX_FRAMES

    folder, outside, out = tmp_path / "archive", tmp_path / "outside", tmp_path / "scores"
    entries = hc.write_corpus(folder, outside, max_file_bytes=MAX_FILE_BYTES, max_frames=DEFAULT_MAX_FRAMES)
    expected = _expected(folder, entries, DEFAULT_MAX_FRAMES)
    refused = collections.Counter(e.kind for e in entries if e.kind)
    print(f"hostile corpus: tried {len(entries)} files ({len(entries) - sum(refused.values())} damaged or extreme "
          f"copies of {len(hc.SEEDS)} real files and the seeds, refusals expected: {dict(refused)})")  # fmt: skip
    assert len(entries) >= 200

    env = {**os.environ, "RAY_TMPDIR": "/tmp/ray-hostile", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(REPO / "jobs/score.py"), "--input", str(folder), "--model", tiny_artifact]
    cmd += ["--output", str(out), "--max-file-bytes", str(MAX_FILE_BYTES), "--batch-size", "32", "--progress", "log"]
    log = tmp_path / "job.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        with TreeMemory(proc.pid, MAX_PROCESS_RSS, MAX_TREE_RSS) as mem:
            try:
                rc = proc.wait(RUN_TIMEOUT_S)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
    print(f"job memory: {mem.summary()}")
    assert mem.peak_process[0] < MAX_PROCESS_RSS, mem.summary()
    assert mem.peak_total < MAX_TREE_RSS, mem.summary()
    assert rc == 0, log.read_text(errors="replace")[-4000:]

    (manifest,) = ledger.completed_runs(str(out))
    assert manifest["input_files"] == len(entries)  # the listing holds every entry once
    rows, raw = visible(str(out))
    assert raw.num_rows == len(rows)  # one run: nothing twice
    by_file: dict[str, list[dict]] = collections.defaultdict(list)
    for r in rows:
        by_file[os.path.basename(r["image_uri"])].append(r)
    assert set(by_file) == set(expected)
    wrong = {}
    for name, want in expected.items():
        recs = sorted(by_file[name], key=lambda r: r["frame"])
        if want[0] == "error":
            got = [(r["frame"], r["status"], S.error_kind(r["error"])) for r in recs]
            if got != [(0, "error", want[1])]:
                wrong[name] = (want, got)
        else:
            _, n, n_failed = want
            frames = [r["frame"] for r in recs]
            failed = sum(r["status"] == "error" for r in recs)
            if frames != list(range(n)) or failed != n_failed:
                wrong[name] = (want, frames[:5], failed)
    assert not wrong, wrong
    kinds = collections.Counter(S.error_kind(r["error"]) for r in rows if r["status"] == "error")
    assert {"too_large", "too_many_frames", "not_a_file", "truncated", "corrupt"} <= set(kinds), kinds
    assert manifest["rows"] == len(rows) == sum(w[1] if w[0] == "frames" else 1 for w in expected.values())
