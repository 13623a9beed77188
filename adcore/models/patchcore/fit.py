"""PatchCore's memory bank: greedy coreset of normal patch features."""

from __future__ import annotations

import logging

from adcore.layers.coreset import coreset_size, greedy_coreset
from adcore.models.patchcore.head import MemoryBankHead, MemoryBankHeadConfig

log = logging.getLogger("adcore.train")


def fit_memory_bank(model, data) -> MemoryBankHead:
    """Each rank selects its share of the coreset from its own normal patches; the bank is their union."""
    kept, _ = data.patch_reservoirs(model, anomaly_share=0.0)
    normal, cfg = kept.rows(), model.cfg
    # The bank's size follows every patch seen; the rows it is drawn from are at most --fit-max-patches.
    wanted = max(1, int(kept.seen * cfg.coreset_ratio))
    n_select, device = coreset_size(kept.seen, cfg.coreset_ratio, cfg.max_bank, cfg.cpu_max_bank)
    if n_select < wanted:
        log.info("memory bank capped at %d rows (%.2f %% of %s patches wanted %d)", n_select,
                 100 * cfg.coreset_ratio, kept.seen, wanted)  # fmt: skip
    local = greedy_coreset(normal, max(1, n_select // data.world_size), seed=data.seed, device=device)
    bank = data.gather(normal[local])
    log.info("memory bank: %d of %d patches (coreset on %s)", len(bank), kept.seen * data.world_size, device)
    # The map lives on the patch grid: the paper's sigma in input pixels, in grid cells.
    sigma = cfg.map_sigma_px * model.grid / model.input_size
    return MemoryBankHead(bank, MemoryBankHeadConfig(k=cfg.score_k, map_sigma=sigma, reweight_k=cfg.reweight_k))
