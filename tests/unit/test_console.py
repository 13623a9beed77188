"""What a job's console shows of Ray: its own lines; Ray's chatter is left out and counted."""

from __future__ import annotations

import logging

from jobs.console import DROPPED, RayLogFilter, keep_worker_lines


def test_ray_chatter_is_left_out_and_the_jobs_lines_kept():
    lines = [
        "[train] fusion epoch 1/2 loss 0.5 val_image_auroc 0.9 val_pixel_auroc 0.9 (3.0 s)",
        "Checkpoint successfully created at: Checkpoint(filesystem=local, path=/tmp/c)",
        "Reporting training result 1: TrainingReport(checkpoint=...)",
        "/usr/lib/python3.11/copyreg.py:105: FutureWarning: `isinstance(treespec, LeafSpec)` is deprecated, use x",
        "  return cls.__new__(cls, *args)",
        "resuming from checkpoint: stage fusion, epoch 1",
        "Found 1 issues. To disable issue detection, run DataContext.get_current().issue_detectors_config...",
        "Traceback (most recent call last):",
        "  File 'x.py', line 1, in f",
    ]
    assert keep_worker_lines("RayTrainWorker", lines) == [lines[0], lines[5], lines[7], lines[8]], (
        "a real traceback stays; a warning's source line goes with it"
    )


def test_the_placement_group_cleaner_is_silent():
    lines = ["Failed to query Ray Train Controller actor state. State API may be temporarily unavailable."] * 3
    assert keep_worker_lines("PlacementGroupCleaner", lines + ["Traceback (most recent call last):"]) == []
    assert keep_worker_lines("TrainController", lines) == []


def test_ray_logger_filter_keeps_warnings_and_counts_what_it_drops():
    keep = RayLogFilter()

    def record(name, level, msg):
        return logging.LogRecord(name, level, __file__, 1, msg, None, None)

    before = DROPPED.count
    assert not keep.filter(record("ray.data._internal.execution", logging.INFO, "Starting execution of Dataset x"))
    assert not keep.filter(record("ray.data._internal.issue_detection.manager", logging.WARNING, "Operator uses 3 GiB"))
    assert not keep.filter(record("ray", logging.WARNING, "Token authentication is enabled for this Ray cluster."))
    assert keep.filter(record("ray.data", logging.WARNING, "A task failed: OutOfMemoryError"))
    assert keep.filter(record("ray.train", logging.ERROR, "Training failed"))
    assert DROPPED.count == before + 3
