"""Head settings chosen on the validation split (never the test split).

A head may offer settings to choose between once its network and reference data are fixed
(``validation_choices() -> list[dict]``, ``apply_choice(dict)``): for example how much weight a
second branch gets. Training then runs the network once over the validation images, scores them
with every choice, and keeps the one with the best mean of image AUROC and (where the split has
masks) pixel AUROC. A split without both normal and anomalous images cannot rank them: the head
keeps its configured setting. Ties keep the earliest choice, which heads list as their default.

A head may also name a *prior* choice (``validation_prior() -> dict | None``), the one that is safe
without evidence (fusion: its memory branch alone). Another choice replaces it only when it beats the
prior's validation quality by more than the standard error of the prior's image AUROC (Hanley and
McNeil 1982): on 20 + 20 validation images that is about 0.05, larger than the epoch-to-epoch noise a
small split shows, so a handful of validation images cannot trade the prior for a worse setting.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from adcore import metrics
from adcore.scorer import Scorer, prepare, upsample_maps

log = logging.getLogger("adcore.train")


def _network_outputs(scorer: Scorer, images: list[np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
    outs = []
    for start in range(0, len(images), batch_size):
        chunk = np.stack([prepare(im, scorer.input_size) for im in images[start : start + batch_size]])
        outs.append(scorer.forward(chunk))
    return outs


def _quality(scorer: Scorer, outs, labels: np.ndarray, masks, shapes) -> dict[str, float]:
    scores, maps = [], []
    for out in outs:
        s, m = scorer.head(out)
        scores.append(s)
        maps.extend(m)
    q = {"image_auroc": metrics.image_auroc(labels, np.concatenate(scores))}
    if masks is not None and any(np.any(m) for m in masks):
        full = [upsample_maps(m[None], hw)[0] for m, hw in zip(maps, shapes)]
        q["pixel_auroc"] = metrics.pixel_auroc(masks, full)
    q["mean"] = float(np.mean(list(q.values())))
    return q


def auroc_standard_error(auroc: float, n_pos: int, n_neg: int) -> float:
    """Hanley and McNeil's (1982) standard error of an AUROC from ``n_pos`` anomalous and ``n_neg`` normal images."""
    a = min(max(auroc, 1e-6), 1 - 1e-6)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    return float(np.sqrt(max(var, 0.0)))


def _best(table: list[dict], prior: int | None, labels: np.ndarray) -> tuple[int, float]:
    """Index of the kept choice and the margin the prior was given (0 without one)."""
    best = max(range(len(table)), key=lambda i: (table[i]["mean"], -i))
    if prior is None:
        return best, 0.0
    n_pos = int(labels.sum())
    margin = auroc_standard_error(table[prior]["image_auroc"], n_pos, len(labels) - n_pos)
    return (best if table[best]["mean"] > table[prior]["mean"] + margin else prior), margin


def select_on_validation(scorer: Scorer, valid: dict[str, Any], batch_size: int = 8) -> dict | None:
    """Apply the head's best validation choice; returns {"chosen", "table"} or None (nothing chosen)."""
    choices = getattr(scorer.head, "validation_choices", lambda: [])()
    labels = np.asarray(valid["labels"])
    if len(choices) < 2:
        return None
    if labels.min() == labels.max():
        log.info("head choices %s: validation has one class only, keeping the configured one", choices)
        return None
    outs = _network_outputs(scorer, valid["images"], batch_size)
    shapes = [im.shape[:2] for im in valid["images"]]
    prior_choice = getattr(scorer.head, "validation_prior", lambda: None)()
    prior = choices.index(prior_choice) if prior_choice in choices else None
    table = []
    for choice in choices:
        scorer.head.apply_choice(choice)
        table.append({"choice": choice, **_quality(scorer, outs, labels, valid["masks"], shapes)})
    best, margin = _best(table, prior, labels)
    scorer.head.apply_choice(choices[best])
    if prior is not None:
        log.info("prior choice %s; others must beat it by %.4f (its AUROC's standard error)", choices[prior], margin)
    for row in table:  # the whole table with -v; the kept choice always
        log.log(
            logging.INFO if row is table[best] else logging.DEBUG,
            "validation choice %s of %d: %s%s",
            row["choice"],
            len(table),
            ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "choice"),
            "  <- kept" if row is table[best] else "",
        )
    return {"chosen": choices[best], "table": table, "prior": prior_choice, "margin": margin}
