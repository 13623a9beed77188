"""SD-MAD's pipeline head: the network's score and map, plus per-category scores from the patch embeddings."""

from __future__ import annotations

import numpy as np
import torch

from adcore.models.sdmad.model import evidence

ARRAYS = ("signs", "normals", "weights", "normal_bias", "act_mean", "act_std", "select_z")


class SDMADHead:
    """Declares the model's anomaly ``categories`` and scores them (``category_scores``).

    The image score and map are the network's (they already use the stage-2 selection); the
    per-category scores are ``softmax([b0, z_1..z_C])[1:]`` recomputed here from the exported
    ``patch_embeddings`` with the saved signs, weights and selection statistics, so they agree with
    the network on every backend (torch, ONNX, Triton). A head rebuilt without sign arrays has no
    categories and only passes the network's outputs through.
    """

    def __init__(
        self,
        categories=(),
        arrays: dict[str, np.ndarray] | None = None,
        scale: float = 10.0,
        k: int = 1,
        use_gpu: bool | None = None,
    ):
        del use_gpu  # a few small matrix products: CPU
        arrays = arrays or {}
        self.categories = tuple(categories) if all(a in arrays for a in ARRAYS) else ()
        self._arrays = {a: np.asarray(arrays[a], np.float32) for a in ARRAYS} if self.categories else {}
        self.scale, self.k = float(scale), int(k)

    @classmethod
    def from_model(cls, model) -> SDMADHead:
        with torch.no_grad():
            arrays = {
                "signs": model.signs(),
                "normals": model.normal_emb,
                "weights": model.weights(),
                "normal_bias": model.normal_bias.reshape(1),
                "act_mean": model.act_mean,
                "act_std": model.act_std,
                "select_z": model.select_z.reshape(1),
            }
            arrays = {k: v.detach().float().cpu().numpy() for k, v in arrays.items()}
        return cls(model.categories, arrays, model.cfg.logit_scale, model.topk())

    @classmethod
    def from_saved(cls, config: dict, arrays: dict[str, np.ndarray], use_gpu: bool | None = None) -> SDMADHead:
        return cls(
            config.get("categories", ()),
            arrays,
            config.get("scale", 10.0),
            config.get("k", 1),
            use_gpu,
        )

    def config(self) -> dict:
        return {"categories": list(self.categories), "scale": self.scale, "k": self.k}

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(self._arrays)

    def __call__(self, out: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(out["score"], np.float32), np.asarray(out["anomaly_map"], np.float32)

    @torch.no_grad()
    def category_logits(self, out: dict[str, np.ndarray]) -> np.ndarray:
        """[B, 1 + C] logits of {normal, categories} from the patch embeddings."""
        t = {k: torch.from_numpy(v) for k, v in self._arrays.items()}
        patches = torch.from_numpy(np.ascontiguousarray(out["patch_embeddings"], np.float32))
        select = (t["act_mean"], t["act_std"], t["select_z"][0])  # z = -inf before stage 2: every sign
        ev = evidence(patches, t["signs"], t["normals"], t["weights"], t["normal_bias"][0], self.scale, self.k, select)
        return ev["category_logits"].numpy()

    def category_scores(self, out: dict[str, np.ndarray]) -> np.ndarray:
        """[B, C] per-category scores in [0, 1] (columns in ``categories`` order)."""
        logits = self.category_logits(out)
        p = np.exp(logits - logits.max(1, keepdims=True))
        return (p / p.sum(1, keepdims=True))[:, 1:].astype(np.float32)
