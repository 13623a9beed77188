"""Analyst report over the scoring job's Parquet: top anomalies, distributions, errors, run-to-run shift.

    python jobs/report.py --scores s3://results/scores --output report.html [--top-k 12]
    python jobs/report.py --scores s3://results/scores --output image.html --image s3://archive/a.dcm [--frame 3]

DuckDB queries the compacted ``latest`` table (plus any run committed after it; see
``jobs/scoring/ledger.py``), loaded through pyarrow so local folders and S3 work the same
offline (DuckDB's httpfs extension cannot be installed without network). Two relations:
``latest`` (one row per ``(image_key, frame, model_version)``, from the latest run, frames
a changed volume no longer has left out: what analysts normally want) and ``scores`` (the
rows of the newest ``REPORT_RUNS`` runs, for per-run tables and the shift between runs).
The SQL constants below are what an analyst would type; the README shows them.

The HTML is self-contained: inline CSS, images as base64 data URIs, plots as inline SVG drawn
here (score histograms per modality and run, the shift against the previous run, errors by kind
over runs; no plotting library). Top-K images are re-read from their URIs and drawn with their
mask's contour in red; each has its own section (overlay, score, label, model version), and
``--image`` writes that page alone for any scored image (its ``image_key``: the URI itself unless
the scores were written with ``--path-privacy pseudonymize``).

With pseudonymized scores the report names images by ``image_key``; it draws them only when
given the run's ``--path-map`` (otherwise masks and figures only). The report carries pixels
(burned-in annotations can be patient data): a local report is written owner-only.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from dataclasses import dataclass

import numpy as np

from adcore import storage
from adcore.cli import parse_config, required_unless, run_command
from jobs.scoring import ledger
from jobs.scoring.schema import decode_mask

log = logging.getLogger("jobs.report")

PROG = "python jobs/report.py"
THUMB = 256  # longest side of a top-K thumbnail, pixels
HIST_BINS = 20  # histogram bins over [0, 1]
HIST_SIZE = (480, 160)
CONTOUR_RGB = (255, 0, 0)

# ``score`` is strictly increasing in ``raw_score`` (adcore.calibration.ScoreMap), but Parquet keeps it
# as float32: raw_score orders the rare rows whose scores round to the same float32 (and rows of
# artifacts calibrated by earlier versions, whose scores clip at 0 and 1).
TOP_ANOMALIES_SQL = """
SELECT image_key, image_uri, frame, score, raw_score, label, category, mask_area, peak_row, peak_col, modality,
       model_version, run_id
FROM latest
WHERE status = 'ok'
ORDER BY score DESC, raw_score DESC
LIMIT $k
"""

SCORE_DISTRIBUTION_SQL = """
SELECT run_id, coalesce(nullif(modality, ''), if(modality IS NULL, 'non-DICOM', 'DICOM')) AS modality, count(*) AS n,
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

# Rows per anomaly category (models whose head tells categories apart: schema 3's ``category``;
# null for normal rows and for models without categories: counted as "normal" or "(no category)").
CATEGORY_COUNTS_SQL = """
SELECT model_version, coalesce(category, CASE WHEN label = 1 THEN '(no category)' ELSE 'normal' END) AS category,
       count(*) AS n, avg(score) AS mean_score
FROM latest
WHERE status = 'ok'
GROUP BY ALL
ORDER BY model_version, n DESC, category
"""

# Score histograms per run and modality, binned in DuckDB (no score list in Python).
HISTOGRAM_SQL = f"""
SELECT run_id, coalesce(nullif(modality, ''), if(modality IS NULL, 'non-DICOM', 'DICOM')) AS modality,
       least(CAST(floor(score * {HIST_BINS}) AS INTEGER), {HIST_BINS - 1}) AS bin, count(*) AS n
FROM scores
WHERE status = 'ok'
GROUP BY ALL
ORDER BY ALL
"""

IMAGE_SQL = """
SELECT image_key, image_uri, frame, score, raw_score, label, category, mask_area, peak_row, peak_col, modality,
       model_name, model_version, run_id, scored_at
FROM latest
WHERE status = 'ok' AND image_key = $key AND frame = $frame
ORDER BY run_id DESC
LIMIT 1
"""

CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#eee}
.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:260px;font-size:12px;word-break:break-all}img{border:1px solid #999}
.plots{display:flex;flex-wrap:wrap;gap:16px}svg{border:1px solid #ccc;background:#fff}
section.image{border-top:1px solid #ccc;margin-top:1.5em}"""
PALETTE = ("#4668c8", "#e07b39", "#3a9d5d", "#b94a9c", "#8c6d31", "#d63b3b", "#5ab4c4", "#7f7f7f")


@dataclass
class ReportConfig:
    scores: str = required_unless("smoke_test", "")  # the scoring job's --output (local or s3://)
    output: str = "report.html"  # where the HTML goes (local or s3://)
    top_k: int = 12
    image: str = ""  # an image_key (the URI unless pseudonymized): write that one image's page instead
    frame: int = 0  # with --image: the frame / slice
    path_map: str = ""  # pseudonymized scores: the scoring job's --path-map, to draw the images
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
    "image_key", "image_uri", "content_sha256", "frame", "height", "width", "score", "raw_score", "label",
    "mask_area", "peak_row", "peak_col", "modality", "model_name", "model_version", "scored_at", "status", "error",
    "run_id", "category", "superseded",
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


def overlay(uri: str, frame: int, mask_png: bytes | None, size: int = THUMB) -> str:
    """Data URI of the frame with its mask contour in red (re-read from the image's URI), at most ``size`` px."""
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
    im.thumbnail((size, size))
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


# ----------------------------------------------------------------------------- plots (inline SVG)
PLOT_W, PLOT_H, PAD = 420, 180, 30


def _svg(title: str, body: str, legend: list[tuple[str, str]], w: int = PLOT_W, h: int = PLOT_H) -> str:
    """An inline SVG with a title, the plot ``body`` and a legend of (colour, label) below it."""
    rows = "".join(
        f"<rect x='{PAD + 130 * (i % 3)}' y='{h + 8 + 14 * (i // 3)}' width='10' height='10' fill='{c}'/>"
        f"<text x='{PAD + 14 + 130 * (i % 3)}' y='{h + 17 + 14 * (i // 3)}' font-size='10'>{html.escape(t)}</text>"
        for i, (c, t) in enumerate(legend)
    )
    total_h = h + 12 + 14 * ((len(legend) + 2) // 3)
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{total_h}' role='img' "
        f"aria-label='{html.escape(title)}'><title>{html.escape(title)}</title>"
        f"<text x='{PAD}' y='14' font-size='12' font-weight='bold'>{html.escape(title)}</text>"
        f"<line x1='{PAD}' y1='{h - PAD}' x2='{w - 10}' y2='{h - PAD}' stroke='#444'/>"
        f"<line x1='{PAD}' y1='22' x2='{PAD}' y2='{h - PAD}' stroke='#444'/>{body}{rows}</svg>"
    )


def _bins(hist: list[dict], run_id: str, modality: str | None = None) -> np.ndarray:
    counts = np.zeros(HIST_BINS, np.int64)
    for r in hist:
        if r["run_id"] == run_id and (modality is None or r["modality"] == modality):
            counts[r["bin"]] += r["n"]
    return counts


def _step(counts: np.ndarray, top: float, colour: str, fill: bool = False, w: int = PLOT_W, h: int = PLOT_H) -> str:
    """Bars (``fill``) or a step outline of a histogram over [0, 1]."""
    x0, y0, bw = PAD, h - PAD, (w - 10 - PAD) / HIST_BINS
    ys = [y0 - (h - PAD - 26) * c / max(top, 1) for c in counts]
    if fill:
        return "".join(
            f"<rect x='{x0 + i * bw + 1:.1f}' y='{y:.1f}' width='{bw - 2:.1f}' height='{y0 - y:.1f}' fill='{colour}'/>"
            for i, y in enumerate(ys)
        )
    pts = [f"{x0:.1f},{y0:.1f}"]
    for i, y in enumerate(ys):
        pts += [f"{x0 + i * bw:.1f},{y:.1f}", f"{x0 + (i + 1) * bw:.1f},{y:.1f}"]
    pts.append(f"{x0 + HIST_BINS * bw:.1f},{y0:.1f}")
    return f"<polyline points='{' '.join(pts)}' fill='none' stroke='{colour}' stroke-width='2'/>"


def _axis(top: int, w: int = PLOT_W, h: int = PLOT_H) -> str:
    return (
        f"<text x='{PAD}' y='{h - PAD + 12}' font-size='10'>0</text>"
        f"<text x='{w - 16}' y='{h - PAD + 12}' font-size='10'>1</text>"
        f"<text x='{(w + PAD) / 2 - 12}' y='{h - PAD + 12}' font-size='10'>score</text>"
        f"<text x='2' y='30' font-size='10'>{top}</text>"
    )


def histograms_svg(hist: list[dict]) -> str:
    """One plot per modality: a step histogram of its scores for each recent run."""
    if not hist:
        return "<p>no scored rows</p>"
    runs = sorted({r["run_id"] for r in hist})
    plots = []
    for modality in sorted({r["modality"] for r in hist}):
        counts = {run: _bins(hist, run, modality) for run in runs}
        top = int(max(c.max() for c in counts.values()))
        body = _axis(top) + "".join(
            _step(c, top, PALETTE[i % len(PALETTE)]) for i, c in enumerate(counts.values()) if c.any()
        )
        legend = [(PALETTE[i % len(PALETTE)], run) for i, (run, c) in enumerate(counts.items()) if c.any()]
        plots.append(_svg(f"{modality}: scores per run", body, legend))
    return "".join(plots)


def shift_svg(hist: list[dict], shift: dict) -> str:
    """The latest run's histogram (outline) over the previous run's (bars), all modalities."""
    cur, prev = _bins(hist, shift["run"]), _bins(hist, shift["previous_run"])
    top = int(max(cur.max(), prev.max()))
    body = _axis(top) + _step(prev, top, "#bbbbbb", fill=True) + _step(cur, top, PALETTE[0])
    title = f"shift: mean {shift['mean_delta']:+.4f}, KS {shift['ks_statistic']:.3f}"
    return _svg(title, body, [("#bbbbbb", f"previous {shift['previous_run']}"), (PALETTE[0], f"latest {shift['run']}")])


def errors_svg(errors: list[dict]) -> str:
    """Stacked bars: error rows per run, by kind."""
    if not errors:
        return "<p>no error rows</p>"
    runs = sorted({e["run_id"] for e in errors})
    kinds = sorted({e["kind"] for e in errors})
    n = {(e["run_id"], e["kind"]): e["n"] for e in errors}
    top = max(sum(n.get((r, k), 0) for k in kinds) for r in runs)
    bw = (PLOT_W - 10 - PAD) / len(runs)
    body = f"<text x='2' y='30' font-size='10'>{top}</text>"
    for i, run in enumerate(runs):
        y = PLOT_H - PAD
        for j, kind in enumerate(kinds):
            hgt = (PLOT_H - PAD - 26) * n.get((run, kind), 0) / top
            if hgt:
                body += (
                    f"<rect x='{PAD + i * bw + 2:.1f}' y='{y - hgt:.1f}' width='{max(bw - 4, 1):.1f}' "
                    f"height='{hgt:.1f}' fill='{PALETTE[j % len(PALETTE)]}'><title>{html.escape(run)} "
                    f"{html.escape(kind)}: {n[(run, kind)]}</title></rect>"
                )
                y -= hgt
        body += f"<text x='{PAD + i * bw + 2:.1f}' y='{PLOT_H - PAD + 12}' font-size='9'>{html.escape(run[:15])}</text>"
    return _svg("error rows per run, by kind", body, [(PALETTE[j % len(PALETTE)], k) for j, k in enumerate(kinds)])


# ----------------------------------------------------------------------------- one image
IMAGE_SIZE = 512  # longest side of the overlay on an image's own page


def _mask_of(scores: str, r: dict) -> bytes | None:
    found = ledger.read_row(scores, r["image_key"], r["frame"], ["mask_png", "model_version", "run_id"])
    same_run = [m for m in found if m["run_id"] == r["run_id"]]
    return next((m["mask_png"] for m in same_run or found if m["model_version"] == r["model_version"]), None)


def read_path_map(path_map: str, keys: list[str]) -> dict[str, str]:
    """``image_key -> image_uri`` for ``keys`` from the scoring job's ``--path-map`` (all its runs)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not path_map or not keys or not storage.exists(path_map):
        return {}
    found = {}
    for f in storage.list_files(path_map, suffixes=[".parquet"]):
        fs, path = storage.filesystem_for(f)
        t = pq.read_table(path, filesystem=fs, filters=pc.field("image_key").isin(pa.array(keys, pa.string())))
        found.update(zip(t.column("image_key").to_pylist(), t.column("image_uri").to_pylist()))
    return found


def _name(r: dict) -> str:
    """How the report names an image: its URI, or its key when paths are pseudonymized."""
    return r.get("image_uri") or r["image_key"]


def _overlay_img(r: dict, mask: bytes | None, size: int, source: str | None) -> str:
    """The frame drawn from ``source`` (its URI), never naming it on the page."""
    if not source:
        return "<p>image not drawn: paths are pseudonymized (give the report --path-map to draw it)</p>"
    try:
        return f'<img src="{overlay(source, r["frame"], mask, size)}" alt="overlay">'
    except Exception as e:  # noqa: BLE001 (a moved or unreadable image must not sink the report)
        return f"<p>image unavailable: {html.escape(type(e).__name__)}</p>"


def image_section(r: dict, mask: bytes | None, anchor: str, source: str | None) -> str:
    """One image: its overlay at ``IMAGE_SIZE`` and what was scored (score, label, model version)."""
    facts = {
        "image": f"{_name(r)} [frame {r['frame']}]",
        "score": f"{r['score']:.4f} (raw {r['raw_score']:.4g})",
        "label": "anomalous" if r["label"] else "normal",
        **({"category": r["category"]} if r.get("category") else {}),
        "mask area": f"{r['mask_area']} px, peak at ({r['peak_row']}, {r['peak_col']})",
        "modality": r.get("modality") or "non-DICOM",
        "model version": r["model_version"],
        "run": r["run_id"],
    }
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
    return (
        f"<section class='image' id='{anchor}'><h3>{html.escape(_name(r))} [frame {r['frame']}]</h3>"
        f"{_overlay_img(r, mask, IMAGE_SIZE, source)}<table>{rows}</table></section>"
    )


def _sources(rows: list[dict], path_map: str) -> list[str | None]:
    """Where to read each row's pixels: its ``image_uri``, or for pseudonymized rows ``path_map``'s entry."""
    paths = read_path_map(path_map, [r["image_key"] for r in rows if not r.get("image_uri")])
    return [r.get("image_uri") or paths.get(r["image_key"]) for r in rows]


def build_image_page(scores: str, key: str, frame: int = 0, path_map: str = "") -> tuple[str, dict]:
    """The self-contained page of one scored image (its latest ok row)."""
    con = connect(scores)
    found = query(con, IMAGE_SQL, key=key, frame=frame)
    if not found:
        raise SystemExit(f"--image: no scored row for frame {frame} of that image in {scores}")
    r = found[0]
    text = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Anomaly score of one image</title>"
        f"<style>{CSS}</style></head><body><h1>Anomaly score of one image</h1>"
        f"{image_section(r, _mask_of(scores, r), 'image', _sources(found, path_map)[0])}</body></html>"
    )
    return text, r


def build_report(scores: str, top_k: int = 12, path_map: str = "") -> tuple[str, dict]:
    """HTML text and the figures it shows (for tests and notebooks)."""
    con = connect(scores)
    top = query(con, TOP_ANOMALIES_SQL, k=top_k)
    sources = _sources(top, path_map)
    dist = query(con, SCORE_DISTRIBUTION_SQL)
    errors = query(con, ERROR_COUNTS_SQL)
    categories = query(con, CATEGORY_COUNTS_SQL)
    shift = score_shift(con)
    latest_scores = [r["score"] for r in query(con, "SELECT score FROM latest WHERE status = 'ok'")]
    hist = query(con, HISTOGRAM_SQL)
    figures, pages = [], []
    for i, (r, source) in enumerate(zip(top, sources)):
        mask = _mask_of(scores, r)
        img = _overlay_img(r, mask, THUMB, source)
        figures.append(
            f"<figure><a href='#image-{i}'>{img}</a><figcaption>{html.escape(_name(r))} [frame {r['frame']}]<br>"
            f"score {r['score']:.4f} (raw {r['raw_score']:.4g}), mask {r['mask_area']} px</figcaption></figure>"
        )
        pages.append(image_section(r, mask, f"image-{i}", source))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Anomaly scores</title>"
        f"<style>{CSS}</style></head><body>",
        f"<h1>Anomaly scores: {html.escape(scores)}</h1>",
        f"<h2>Top {top_k} anomalies</h2><div class='grid'>{''.join(figures)}</div>",
        _table([{k: v for k, v in r.items()} for r in top]),
        f"<h2>Score histogram (visible rows)</h2><img src='{histogram(latest_scores)}'>",
        "<h2 id='histograms'>Score histograms per modality and run</h2>",
        f"<div class='plots'>{histograms_svg(hist)}</div>",
        "<h2>Score distribution per run and modality</h2>",
        _table(dist),
        "<h2 id='categories'>Images per category (visible rows)</h2>",
        _table(categories),
        "<h2 id='errors'>Errors per run and kind</h2>",
        f"<div class='plots'>{errors_svg(errors)}</div>",
        _table(errors),
        "<h2 id='shift'>Shift against the previous run</h2>",
        f"<div class='plots'>{shift_svg(hist, shift)}</div>" if shift else "",
        _table([shift] if shift else []),
        "<h2>Top anomalies, one by one</h2>",
        *pages,
        "</body></html>",
    ]
    figures = {"top": top, "distribution": dist, "errors": errors, "shift": shift, "histogram": hist}
    return "\n".join(parts), figures | {"categories": categories}


def main(cfg: ReportConfig) -> dict:
    if cfg.smoke_test and not cfg.scores:
        from jobs.score import ScoreConfig
        from jobs.score import main as score

        manifest = score(ScoreConfig(smoke_test=True))
        cfg = ReportConfig(**{**cfg.__dict__, "scores": manifest["output"]})
    if not cfg.scores:
        raise SystemExit("--scores is required (the scoring job's --output)")
    if cfg.image:
        text, row = build_image_page(cfg.scores, cfg.image, cfg.frame, cfg.path_map)
        storage.write_bytes(cfg.output, text.encode())
        log.info("image page written to %s", cfg.output)
        return {"image": row}
    text, figures = build_report(cfg.scores, cfg.top_k, cfg.path_map)
    storage.write_bytes(cfg.output, text.encode())
    log.info("report written to %s (%d top anomalies)", cfg.output, len(figures["top"]))
    return figures


def parse_args(argv: list[str] | None = None, prog: str = PROG) -> ReportConfig:
    return parse_config(ReportConfig, argv, __doc__.split("\n")[0], prog=prog)


def cli(argv: list[str] | None = None, prog: str = PROG) -> None:
    """The command line: parse, report, errors a user can fix in one line."""
    run_command(lambda: main(parse_args(argv, prog)), prog)


if __name__ == "__main__":
    cli()
