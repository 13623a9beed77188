"""Head settings chosen on the validation split (never the test split).

A head may offer settings to choose between once its network and reference data are fixed
(``validation_choices() -> list[dict]``, ``apply_choice(dict)``): for example how much weight a
second branch gets. Training then runs the network once over the validation images, scores them
with every choice, and keeps the one with the best mean of image AUROC and (where the split has
masks) pixel AUROC. A split without both normal and anomalous images cannot rank them: the head
keeps its configured setting. Ties keep the earliest choice, which heads list as their default.
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
    table = []
    for choice in choices:
        scorer.head.apply_choice(choice)
        table.append({"choice": choice, **_quality(scorer, outs, labels, valid["masks"], shapes)})
    best = max(range(len(table)), key=lambda i: (table[i]["mean"], -i))
    scorer.head.apply_choice(choices[best])
    for row in table:  # the whole table with -v; the kept choice always
        log.log(
            logging.INFO if row is table[best] else logging.DEBUG,
            "validation choice %s of %d: %s%s",
            row["choice"],
            len(table),
            ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "choice"),
            "  <- kept" if row is table[best] else "",
        )
    return {"chosen": choices[best], "table": table}
