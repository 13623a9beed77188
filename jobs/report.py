"""Analyst report over the scoring job's Parquet: top anomalies, distributions, errors, run-to-run shift.

    python jobs/report.py --scores s3://results/scores --report report.html [--top-k 12]

DuckDB queries the compacted ``latest`` table (plus any run committed after it; see
``jobs/scoring/ledger.py``), loaded through pyarrow so local folders and S3 work the same
offline (DuckDB's httpfs extension cannot be installed without network). Two relations:
``latest`` (one row per ``(image_uri, frame, model_version)``, from the latest run, frames
a changed volume no longer has left out: what analysts normally want) and ``scores`` (the
rows of the newest ``REPORT_RUNS`` runs, for per-run tables and the shift between runs).
The SQL constants below are what an analyst would type; the README shows them.

The HTML is self-contained: inline CSS, images as base64 data URIs. Top-K images are
re-read from their URIs and drawn with their mask's contour in red.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from dataclasses import dataclass

import numpy as np

from adcore import storage
from adcore.cli import parse_config
from jobs.scoring import ledger
from jobs.scoring.schema import decode_mask

log = logging.getLogger("jobs.report")

THUMB = 256  # longest side of a top-K thumbnail, pixels
HIST_BINS = 20  # histogram bins over [0, 1]
HIST_SIZE = (480, 160)
CONTOUR_RGB = (255, 0, 0)

# ``score`` is strictly increasing in ``raw_score`` (adcore.calibration.ScoreMap), but Parquet keeps it
# as float32: raw_score orders the rare rows whose scores round to the same float32 (and rows of
# artifacts calibrated before issue 17, whose scores clip at 0 and 1).
TOP_ANOMALIES_SQL = """
SELECT image_uri, frame, score, raw_score, label, mask_area, peak_row, peak_col, modality, model_version, run_id
FROM latest
WHERE status = 'ok'
ORDER BY score DESC, raw_score DESC
LIMIT $k
"""

SCORE_DISTRIBUTION_SQL = """
SELECT run_id, coalesce(modality, 'non-DICOM') AS modality, count(*) AS n,
       avg(score) AS mean, quantile_cont(score, 0.05) AS p05, quantile_cont(score, 0.5) AS p50,
       quantile_cont(score, 0.95) AS p95, avg(label) AS anomalous_fraction
FROM scores
WHERE status = 'ok'
GROUP BY ALL
ORDER BY run_id, modality
"""

ERROR_COUNTS_SQL = """
SELECT run_id, split_part(error, ':', 1) AS kind, count(*) AS n
FROM scores
WHERE status = 'error'
GROUP BY ALL
ORDER BY run_id, n DESC
"""

# Scores of one run (for the shift against the previous run).
RUN_SCORES_SQL = "SELECT score FROM scores WHERE status = 'ok' AND run_id = $run_id"

RUNS_SQL = "SELECT DISTINCT run_id FROM scores ORDER BY run_id"

CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#eee}
.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:260px;font-size:12px;word-break:break-all}img{border:1px solid #999}"""


@dataclass
class ReportConfig:
    scores: str = ""  # the scoring job's --output (local or s3://)
    report: str = "report.html"  # where the HTML goes (local or s3://)
    top_k: int = 12
    smoke_test: bool = False


REPORT_RUNS = 8  # the runs whose own rows the per-run tables read (the newest ones)


def connect(scores: str):
    """A DuckDB connection with ``latest`` (visible rows), ``scores`` (the newest runs' rows) and ``runs``.

    ``latest`` comes from the compacted table (plus any run committed after it), never from
    all history; masks are left out and read per image by :func:`jobs.scoring.ledger.read_row`.
    """
    import duckdb
    import pyarrow as pa

    visible = ledger.visible_rows(scores, columns=LATEST_COLUMNS)
    if visible is None:
        raise SystemExit(f"{scores}: no completed scoring run")
    manifests = ledger.completed_runs(scores)
    recent = manifests[-REPORT_RUNS:]
    con = duckdb.connect()
    con.register("visible", visible)
    con.execute("CREATE VIEW latest AS SELECT * EXCLUDE (superseded) FROM visible WHERE NOT superseded")
    table = ledger.read_runs(scores, recent, columns=[c for c in LATEST_COLUMNS if c != "superseded"])
    con.register("scores", table if table is not None else visible.slice(0, 0).drop_columns(["superseded"]))
    con.register(
        "runs",
        pa.Table.from_pylist(
            [{k: m.get(k) for k in ("run_id", "model_version", "completed_at", "rows")} for m in manifests]
        ),
    )
    return con


# Every output column but the masks (read per image), plus ``superseded``.
LATEST_COLUMNS = [
    "image_uri", "content_sha256", "frame", "height", "width", "score", "raw_score", "label", "mask_area",
    "peak_row", "peak_col", "modality", "model_name", "model_version", "scored_at", "status", "error", "run_id",
    "superseded",
]  # fmt: skip


def query(con, sql: str, **params) -> list[dict]:
    return con.sql(sql, params=params or None).to_arrow_table().to_pylist()


def score_shift(con) -> dict | None:
    """Mean/quantile deltas and the two-sample KS statistic, latest run vs the one before."""
    from scipy.stats import ks_2samp

    runs = [r["run_id"] for r in query(con, RUNS_SQL)]
    samples = []
    for run_id in runs[::-1]:
        s = np.array([r["score"] for r in query(con, RUN_SCORES_SQL, run_id=run_id)], dtype=np.float64)
        if len(s):
            samples.append((run_id, s))
        if len(samples) == 2:
            break
    if len(samples) < 2:
        return None
    (cur_id, cur), (prev_id, prev) = samples
    ks = ks_2samp(cur, prev)
    out = {
        "run": cur_id,
        "previous_run": prev_id,
        "n": len(cur),
        "n_previous": len(prev),
        "mean_delta": float(cur.mean() - prev.mean()),
        "ks_statistic": float(ks.statistic),
        "ks_pvalue": float(ks.pvalue),
    }
    for q in (0.05, 0.5, 0.95):
        out[f"p{int(q * 100):02d}_delta"] = float(np.quantile(cur, q) - np.quantile(prev, q))
    return out


def overlay(uri: str, frame: int, mask_png: bytes | None) -> str:
    """Data URI of the frame with its mask contour in red (re-read from the image's URI)."""
    from PIL import Image

    from adcore.data.decode import decode_image

    frames = decode_image(storage.read_bytes(uri), uri)
    px = next(f.pixels for f in frames if f.index == frame)
    rgb = np.repeat(px[..., None], 3, axis=2) if px.ndim == 2 else px[..., :3]
    img = (rgb * 255).astype(np.uint8)
    if mask_png:
        m = decode_mask(mask_png)
        inner = m.copy()
        inner[1:-1, 1:-1] &= m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
        img[m & ~inner] = CONTOUR_RGB
    im = Image.fromarray(img)
    im.thumbnail((THUMB, THUMB))
    return _data_uri(im)


def histogram(scores: list[float]) -> str:
    """Data URI of a bar histogram of scores in [0, 1] (PIL, no plotting library needed)."""
    from PIL import Image, ImageDraw

    counts, _ = np.histogram(np.asarray(scores, dtype=np.float64), bins=HIST_BINS, range=(0, 1))
    w, h = HIST_SIZE
    im = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(im)
    bar = w / HIST_BINS
    top = max(int(counts.max()), 1)
    for i, c in enumerate(counts):
        draw.rectangle([i * bar + 1, h - 15 - (h - 25) * c / top, (i + 1) * bar - 1, h - 15], fill=(70, 110, 200))
    draw.text((2, h - 13), "0", fill="black")
    draw.text((w - 10, h - 13), "1", fill="black")
    draw.text((2, 2), f"max {top}", fill="black")
    return _data_uri(im)


def _data_uri(im) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _table(rows: list[dict]) -> str:
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def build_report(scores: str, top_k: int = 12) -> tuple[str, dict]:
    """HTML text and the figures it shows (for tests and notebooks)."""
    con = connect(scores)
    top = query(con, TOP_ANOMALIES_SQL, k=top_k)
    dist = query(con, SCORE_DISTRIBUTION_SQL)
    errors = query(con, ERROR_COUNTS_SQL)
    shift = score_shift(con)
    latest_scores = [r["score"] for r in query(con, "SELECT score FROM latest WHERE status = 'ok'")]
    figures = []
    for r in top:
        found = ledger.read_row(scores, r["image_uri"], r["frame"], ["mask_png", "model_version"])
        mask = next(m["mask_png"] for m in found if m["model_version"] == r["model_version"])
        try:
            src = overlay(r["image_uri"], r["frame"], mask)
            img = f'<img src="{src}">'
        except Exception as e:  # noqa: BLE001 (a moved or unreadable image must not sink the report)
            img = f"<p>image unavailable: {html.escape(type(e).__name__)}</p>"
        figures.append(
            f"<figure>{img}<figcaption>{html.escape(r['image_uri'])} [frame {r['frame']}]<br>"
            f"score {r['score']:.4f} (raw {r['raw_score']:.4g}), mask {r['mask_area']} px</figcaption></figure>"
        )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Anomaly scores</title>"
        f"<style>{CSS}</style></head><body>",
        f"<h1>Anomaly scores: {html.escape(scores)}</h1>",
        f"<h2>Top {top_k} anomalies</h2><div class='grid'>{''.join(figures)}</div>",
        _table([{k: v for k, v in r.items()} for r in top]),
        f"<h2>Score histogram (visible rows)</h2><img src='{histogram(latest_scores)}'>",
        "<h2>Score distribution per run and modality</h2>",
        _table(dist),
        "<h2>Errors per run and kind</h2>",
        _table(errors),
        "<h2>Shift against the previous run</h2>",
        _table([shift] if shift else []),
        "</body></html>",
    ]
    return "\n".join(parts), {"top": top, "distribution": dist, "errors": errors, "shift": shift}


def main(cfg: ReportConfig) -> dict:
    if cfg.smoke_test and not cfg.scores:
        from jobs.score import ScoreConfig
        from jobs.score import main as score

        manifest = score(ScoreConfig(smoke_test=True))
        cfg = ReportConfig(**{**cfg.__dict__, "scores": manifest["output"]})
    if not cfg.scores:
        raise SystemExit("--scores is required (the scoring job's --output)")
    text, figures = build_report(cfg.scores, cfg.top_k)
    storage.write_bytes(cfg.report, text.encode())
    log.info("report written to %s (%d top anomalies)", cfg.report, len(figures["top"]))
    return figures


def parse_args(argv: list[str] | None = None) -> ReportConfig:
    return parse_config(ReportConfig, argv, __doc__.split("\n")[0])


if __name__ == "__main__":
    main(parse_args())
