"""The analyst report over a scoring job run on a two-node simulated Ray cluster, S3 in and out."""

from __future__ import annotations

import html.parser
import os
import shutil
import subprocess

import numpy as np
import pytest

from adcore import storage
from tests.integration.conftest import STUDY_SECRET, nodes_environment
from tests.integration.test_score_job import PHI, _dicom_with_phi, _png, upload

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_TMPDIR", "/tmp/ray-report")
    with nodes_environment():
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

    monkeypatch.setenv("ADCORE_STUDY_KEY_SECRET", STUDY_SECRET)
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
    figs = report(ReportConfig(scores=out, output=html_uri, top_k=3))
    text = storage.read_bytes(html_uri).decode()
    # 3 thumbnails + the same 3 on their own sections
    assert len(figs["top"]) == 3 and text.count('<img src="data:image/png;base64,') == 6
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

    # As people read it: rendered by a real browser, sections, plots and images on the page.
    page = tmp_path / "report.html"
    page.write_text(text)
    dom = _Dom()
    dom.feed(chromium(["--dump-dom", page.as_uri()], tmp_path))
    sections = ("Score histograms per modality and run", "Errors per run and kind", "Shift against the previous run")
    assert set(sections) <= set(dom.headings), dom.headings
    assert dom.svgs == 4  # CT, non-DICOM, errors by kind, shift
    assert dom.image_sections == 3 and dom.images == 7  # 3 thumbnails, 3 on their sections, the PNG histogram
    shot = tmp_path / "shot.png"
    chromium(["--hide-scrollbars", "--window-size=1300,5000", f"--screenshot={shot}", page.as_uri()], tmp_path)
    from PIL import Image

    px = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    drawn = lambda rgb: int((np.abs(px - rgb).sum(axis=1) <= 6).sum())  # noqa: E731
    assert drawn((0x46, 0x68, 0xC8)) > 500  # the first run's histogram lines, the error bars, the latest-run outline
    # the second run's histogram lines (measured 2,836 px; its two legend swatches alone are 200)
    assert drawn((0xE0, 0x7B, 0x39)) > 1000
    assert drawn((0xBB, 0xBB, 0xBB)) > 1000  # the previous run's bars in the shift plot (5,350; swatch 100)
    grey = (px[:, 0] == px[:, 1]) & (px[:, 1] == px[:, 2])
    assert len(np.unique(px[grey][:, 0])) > 100  # the images themselves: many grey levels

    # The page of one image.
    one = f"{bucket}/in/ct.dcm"
    page_uri = f"{bucket}/image.html"
    got = report(ReportConfig(scores=out, output=page_uri, image=one, frame=0))
    assert got["image"]["image_uri"] == one and got["image"]["run_id"] == m2["run_id"]
    single = tmp_path / "image.html"
    single.write_text(storage.read_bytes(page_uri).decode())
    dom = _Dom()
    dom.feed(chromium(["--dump-dom", single.as_uri()], tmp_path))
    assert dom.image_sections == 1 and dom.images == 1
    assert {"score", "label", "model version"} <= set(dom.cells) and m2["model_version"] in dom.texts
    for value in PHI.values():
        assert value not in single.read_text()


def chromium(args: list[str], tmp) -> str:
    """Headless Chromium (Debian's ``chromium``, installed by ``make setup``); returns its stdout."""
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium is missing: `make setup` installs it (apt-get install -y chromium)")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--user-data-dir={tmp}/chr"]
    done = subprocess.run(cmd + args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class _Dom(html.parser.HTMLParser):
    """What the rendered DOM holds: headings, SVG plots, image sections, decoded images, table cells."""

    def __init__(self):
        super().__init__()
        self.headings, self.cells, self.texts = [], [], []
        self.svgs = self.images = self.image_sections = 0
        self._tag = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self._tag = tag
        self.svgs += tag == "svg"
        self.images += tag == "img" and (a.get("src") or "").startswith("data:image/png;base64,")
        self.image_sections += tag == "section" and "image" in (a.get("class") or "").split()

    def handle_data(self, data):
        self.texts.append(data)
        if self._tag == "h2":
            self.headings.append(data.strip())
        if self._tag == "th":
            self.cells.append(data.strip())
