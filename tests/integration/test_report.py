"""The analyst report over a scoring job run on a two-node simulated Ray cluster, S3 in and out."""

from __future__ import annotations

import os

import numpy as np
import pytest

from adcore import storage
from tests.integration.test_score_job import PHI, _dicom_with_phi, _png, upload

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_TMPDIR", "/tmp/ray-report")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_two_runs_on_two_nodes_then_report(s3_server, two_nodes, tiny_artifact, tmp_path, monkeypatch):
    from jobs.report import ERROR_COUNTS_SQL, ReportConfig, connect, query
    from jobs.report import main as report
    from jobs.score import ScoreConfig
    from jobs.score import main as score

    monkeypatch.setenv("ADCORE_STUDY_KEY_SECRET", "s")
    bucket = s3_server.make_bucket("score-report")
    rng = np.random.default_rng(3)
    files = {f"img{i}.png": _png((rng.random((48, 40)) * 255).astype(np.uint8)) for i in range(6)}
    files |= {"ct.dcm": _dicom_with_phi(), "empty.png": b""}
    upload(f"{bucket}/in", files)
    out = f"{bucket}/scores"
    cfg = ScoreConfig(input=f"{bucket}/in", model=tiny_artifact, output=out, batch_size=4)
    m1 = score(cfg)
    assert m1["counts"] == {"ok": 7, "error": 1}
    m2 = score(ScoreConfig(**{**cfg.__dict__, "rescore_all": True}))

    html_uri = f"{bucket}/report.html"
    figs = report(ReportConfig(scores=out, report=html_uri, top_k=3))
    text = storage.read_bytes(html_uri).decode()
    assert len(figs["top"]) == 3 and text.count('<img src="data:image/png;base64,') == 3
    assert figs["top"][0]["score"] >= figs["top"][1]["score"] >= figs["top"][2]["score"]
    assert {r["run_id"] for r in figs["top"]} == {m2["run_id"]}
    assert "http://" not in text.replace("http://www.w3", "")  # self-contained: no external resources
    shift = figs["shift"]
    assert shift["run"] == m2["run_id"] and shift["previous_run"] == m1["run_id"]
    assert shift["ks_statistic"] == pytest.approx(0.0) and shift["mean_delta"] == pytest.approx(0.0, abs=1e-6)
    assert {(d["modality"], d["n"]) for d in figs["distribution"]} == {("CT", 1), ("non-DICOM", 6)}
    assert [(e["kind"], e["n"]) for e in figs["errors"]] == [("empty", 1), ("empty", 1)]
    for value in PHI.values():
        assert value not in text and value.replace("^", " ") not in text
    con = connect(out)
    assert query(con, "SELECT count(*) AS n FROM latest")[0]["n"] == 8
    assert query(con, ERROR_COUNTS_SQL)[0]["kind"] == "empty"
