"""A device out-of-memory error splits the model call instead of failing its rows.

A CUDA OOM cannot be caused on a CPU: the torch network's fault hook (``FAULT_OOM_ABOVE_ENV``)
raises ``torch.OutOfMemoryError`` for batches above a size; everything else is the real scorer.
"""

from __future__ import annotations

import numpy as np
import pytest

from adcore.scorer import FAULT_OOM_ABOVE_ENV
from jobs.scoring import schema as S

pytestmark = pytest.mark.integration  # the replica stage runs under a local Ray


def _batch(n: int, size: int, rng) -> dict[str, np.ndarray]:
    text = np.array([f"img{i}" for i in range(n)], dtype=object)
    return {
        "image_uri": text,
        "image_key": text,
        "content_sha256": text,
        "frame": np.zeros(n, np.int64),
        "height": np.full(n, size, np.int64),
        "width": np.full(n, size, np.int64),
        "modality": np.array([None] * n, dtype=object),
        "study_key": np.array([None] * n, dtype=object),
        "file_size": np.full(n, 100, np.int64),
        "file_version": text,
        "status": np.array([S.STATUS_OK] * n, dtype=object),
        "error": np.array([None] * n, dtype=object),
        "pixels": (rng.random((n, 3, size, size)) * 255).astype(np.uint8),
    }


def test_oom_batch_is_split_and_every_row_scored(tiny_artifact, monkeypatch, rng):
    from jobs.scoring.stages import SPLITS_COLUMN, ScoreStage

    reference = ScoreStage(tiny_artifact, engine="torch")
    batch = _batch(8, reference.scorer.input_size, rng)
    expected = reference(batch)

    monkeypatch.setenv(FAULT_OOM_ABOVE_ENV, "2")
    stage = ScoreStage(tiny_artifact, engine="torch")
    out = stage(batch)
    assert list(out["status"]) == [S.STATUS_OK] * 8, out["error"]
    np.testing.assert_allclose(out["raw_score"], expected["raw_score"], rtol=1e-4, atol=1e-5)
    assert out[SPLITS_COLUMN].sum() == 3  # 8 -> 4+4, each 4 -> 2+2
    assert stage.scorer.fitting_batch == 2
    again = stage(batch)  # later calls stay within the size that fitted: no new splits
    assert again[SPLITS_COLUMN].sum() == 0 and list(again["status"]) == [S.STATUS_OK] * 8


def test_other_errors_are_not_split(tiny_artifact, monkeypatch, rng):
    from jobs.scoring.stages import SPLITS_COLUMN, ScoreStage

    stage = ScoreStage(tiny_artifact, engine="torch")
    batch = _batch(4, stage.scorer.input_size, rng)

    def broken(pixels):
        raise RuntimeError("driver gone")

    monkeypatch.setattr(stage.scorer, "forward", broken)
    out = stage(batch)
    assert {str(s) for s in out["status"]} == {S.STATUS_ERROR}
    assert out["error"][0].startswith(S.INFERENCE_ERROR + ":")
    assert out[SPLITS_COLUMN].sum() == 0
