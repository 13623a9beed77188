"""A dead run's part files: only files whole in them are committed, the rest is scored again."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.scoring import ledger


def _part(folder, name: str, rows: list[tuple[str, int]], frames: dict[str, int]) -> None:
    table = pa.table(
        {
            "image_key": [k for k, _ in rows],
            "frame": [f for _, f in rows],
            "status": ["ok"] * len(rows),
            "error": pa.nulls(len(rows), pa.string()),
        }
    )
    (folder / (name + ledger.PARTS_FRAMES_SUFFIX)).write_text(json.dumps(frames))
    pq.write_table(table, folder / name)


def _dead_run(tmp_path, run_id: str):
    folder = tmp_path / "out" / "run_date=2000-01-01" / f"run_id={run_id}"
    folder.mkdir(parents=True)
    ledger.write_run_stub(str(folder), {"run_id": run_id, "run_date": "2000-01-01", "model_version": "m"})
    return folder


def test_parts_are_kept_only_with_whole_files(tmp_path):
    out = str(tmp_path / "out")
    a = _dead_run(tmp_path, "r1")
    _part(a, "part-00000.parquet", [("vol", 0), ("vol", 1), ("png1", 0)], {"vol": 3, "png1": 1})
    _part(a, "part-00001.parquet", [("png2", 0)], {"png2": 1})
    (a / "part-00002.parquet").write_bytes(b"PAR1 half")  # torn: not a part
    (manifest,) = ledger.salvage_incomplete(out, set(), lease=7)
    # vol's third frame never arrived: its part (with png1) goes, png2's part is committed.
    assert manifest["files"] == ["run_date=2000-01-01/run_id=r1/part-00001.parquet"]
    assert manifest["salvaged"] and manifest["lease"] == 7 and manifest["counts"] == {"ok": 1, "error": 0}
    assert sorted(p.name for p in a.iterdir()) == ["_run.json", "part-00001.parquet"]
    assert [m["run_id"] for m in ledger.completed_runs(out)] == ["r1"]


def test_a_file_split_over_parts_is_whole_when_every_part_is_there(tmp_path):
    out = str(tmp_path / "out")
    a = _dead_run(tmp_path, "r2")
    _part(a, "part-00000.parquet", [("vol", 0), ("vol", 1)], {"vol": 3})
    _part(a, "part-00001.parquet", [("vol", 2), ("png", 0)], {"vol": 3, "png": 1})
    (manifest,) = ledger.salvage_incomplete(out, set(), lease=1)
    assert manifest["rows"] == 4 and len(manifest["files"]) == 2


def test_a_run_folder_without_its_stub_is_left_to_cleanup(tmp_path):
    out = str(tmp_path / "out")
    folder = tmp_path / "out" / "run_date=2000-01-01" / "run_id=r3"
    folder.mkdir(parents=True)
    _part(folder, "part-00000.parquet", [("png", 0)], {"png": 1})
    assert ledger.salvage_incomplete(out, set(), lease=1) == []
    assert ledger.cleanup_incomplete(out, ledger.completed_ids(out)) == [str(folder)]
