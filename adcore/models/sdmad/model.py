"""SD-MAD: few-shot multi-anomaly detection driven by radiological signs (arXiv 2505.16659; papers.md section 2).

The paper's public text is an abstract; what is built here is adcore's reading of it, each choice named.

* **Signs.** A sign bank (``adcore/signs/<domain>.json``) lists, per anomaly category, short sign
  descriptions; a sign may be shared by several categories. The text tower (CLIP's in the large
  preset; the offline MiniLM sentence encoder on CPU) embeds them once at build time: ``sign_emb``
  [S, D] and the normal-appearance signs ``normal_emb`` [Nn, D], saved with the weights.
* **Patches.** The frozen vision tower's hidden states at ``layers`` (3x3 locally averaged, as
  PatchCore) are standardised and reduced by a PCA fitted on normal training patches (``feature_dim``; keeps stage 1
  cheap on CPU), projected to the text width and moved by a residual *shift adapter*
  (x + MLP(x), zero-initialised), then L2-normalised: ``patch_embeddings`` [B, g*g, D].
* **Evidence.** Per patch and sign, ``rel = scale * (cos(patch, sign + delta_s) - max_j cos(patch, normal_j))``
  (``delta`` [S, D] is a learnt shift of each sign embedding). The map logit is the logsumexp over
  signs; an image's activation of sign s is the mean of its top-k patches (``topk_ratio``).
* **Categories.** ``z_c = sum_s W_sc * act_s`` with ``W`` a softmax of learnt weights over the signs
  the bank lists for c (a shared sign enters every category that lists it). The normal class has a
  learnt logit ``b0``; image logit = logsumexp_c z_c - b0; per-category scores = softmax([b0, z]).
  ``score`` and ``anomaly_map`` are the image and map logits (``sigmoid_outputs``: their sigmoids,
  which float32 ties at 1.0; artifacts saved before the field).
* **Stage 1 (alignment, ``train.py``).** Cross-entropy over {normal, categories} plus the
  *discrepancy amplification* hinge ``max(0, margin - (z_y - max_{c != y} z_c))`` on the labelled
  shots, a sign-alignment BCE (a shot's own signs on, signs only other categories list off) and
  a patch BCE on synthetic anomalies: it moves signs, weights and adapter so categories separate.
* **Stage 2 (selection at inference).** A sign is *aligned* when, on the training shots, it is
  more active on its categories' shots than on normals and on other categories' shots (a category
  keeps at least its best sign). Per image, a sign counts as present when its activation is at
  least ``mean + z * std`` of that sign over the validation split's normal images; each category
  then averages only its aligned, present signs (all its aligned signs when none is present: an uncertain image
  keeps soft evidence). ``z`` is fitted on the validation split's categorised anomalies (never the
  test split); without them it stays ``select_z``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adcore.errors import FlagError
from adcore.models.base import AnomalyModel, ModelOutput
from adcore.models.sdmad.config import SDMADConfig, SignTextSpec
from adcore.models.towers import Tower
from adcore.signs import SignBank, load_sign_bank, read_sign_bank

AGGREGATION_KERNEL = 3  # locally aware patch features (PatchCore's 3x3 neighbourhood average)


def bank_of(text: SignTextSpec) -> SignBank:
    """The sign bank a config means: its frozen copy, else the bundled file (restricted to its categories)."""
    if text.bank is not None:
        bank = SignBank(
            text.domain, list(text.bank["normal"]), {k: list(v) for k, v in text.bank["categories"].items()}
        )
    else:
        bank = load_sign_bank(text.domain)
    return bank.subset(text.categories) if text.categories else bank


def sign_overrides(path: str) -> dict:
    """``--signs FILE``: the sign bank in that file (YAML or JSON) as model config overrides; it is
    frozen into the artifact like a bundled bank."""
    bank = read_sign_bank(path)
    frozen = {"normal": list(bank.normal), "categories": {k: list(v) for k, v in bank.categories.items()}}
    return {"text": {"domain": bank.domain, "bank": frozen, "categories": None}}


def encode_signs(text: SignTextSpec, bank: SignBank, clip_weights: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Unit sign embeddings [S, D] and normal-sign embeddings [Nn, D] from the text tower."""
    texts = bank.signs + bank.normal
    if text.kind == "random":
        g = torch.Generator().manual_seed(0)
        emb = F.normalize(torch.randn(len(texts), text.dim, generator=g), dim=-1).numpy()
    else:
        from adcore.backbones import text as towers

        if text.kind == "clip":
            if not clip_weights:
                raise ValueError("text kind 'clip' needs the vision tower's CLIPModel weights folder")
            tower = towers.ClipTextTower(clip_weights)
        else:
            tower = towers.load_text_tower(text.kind, text.weights or str(towers.minilm_dir()))
        emb = tower.encode(texts)
        if text.kind == "sentence":  # every sign describes the same anatomy: keep what tells them apart
            emb = emb - emb.mean(0, keepdims=True)
            emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    return emb[: len(bank.signs)], emb[len(bank.signs) :]


class ShiftAdapter(nn.Module):
    """x + MLP(x), the MLP's output layer zero-initialised (identity at the start)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(x)))


def evidence(
    patches: torch.Tensor,
    signs: torch.Tensor,
    normals: torch.Tensor,
    weights: torch.Tensor,
    normal_bias: torch.Tensor,
    scale: float,
    k: int,
    select: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """SD-MAD's scoring from unit patch embeddings [B, N, D] (shared by the network and the head).

    Args:
        signs: Unit sign embeddings [S, D] (shift applied); normals: [Nn, D].
        weights: [S, C] per-category sign weights (each column sums to 1 over its signs).
        select: Stage 2: (per-sign normal mean [S], std [S], z) or None (stage 1: every sign).

    Returns:
        ``act`` [B, S], ``map_logit`` [B, N], ``category_logits`` [B, 1 + C] (column 0 normal),
        ``image_logit`` [B].
    """
    sim = patches @ signs.T  # [B, N, S]
    normal_sim = (patches @ normals.T).amax(-1, keepdim=True)  # [B, N, 1]
    rel = scale * (sim - normal_sim)  # [B, N, S]
    map_logit = torch.logsumexp(rel, -1)  # [B, N]
    act = rel.topk(k, dim=1).values.mean(1)  # [B, S]
    w = weights.unsqueeze(0).expand(act.shape[0], -1, -1)  # [B, S, C]
    if select is not None:
        mu, sd, z = select
        present = (act >= mu + z * sd).to(w.dtype).unsqueeze(-1)  # [B, S, 1]
        chosen = w * present
        mass = chosen.sum(1, keepdim=True)  # [B, 1, C]
        w = torch.where(mass > 0, chosen / mass.clamp_min(1e-12), w)  # no sign present: all of them
    z_c = (w * act.unsqueeze(-1)).sum(1)  # [B, C]
    b0 = normal_bias.reshape(1, 1).expand(act.shape[0], 1)
    return {
        "act": act,
        "map_logit": map_logit,
        "category_logits": torch.cat([b0, z_c], 1),
        "image_logit": torch.logsumexp(z_c, 1) - b0[:, 0],
    }


class SDMADModel(AnomalyModel):
    def __init__(self, cfg: SDMADConfig, encoded: tuple[np.ndarray, np.ndarray] | None = None):
        super().__init__()
        self.cfg = cfg
        self.bank = bank_of(cfg.text)
        self.tower = Tower(cfg.vision)
        clip_weights = cfg.vision.weights if cfg.vision.kind == "clip" else None
        self.tower.drop_clip()
        bad = [i for i in cfg.layers if not 0 < i <= self.tower.depth]
        if bad:
            raise ValueError(f"layers {bad} outside the vision tower's 1..{self.tower.depth}")
        self.tower.requires_grad_(False)
        self.input_size, self.grid = self.tower.image_size, self.tower.grid
        signs, normals = encoded if encoded is not None else encode_signs(cfg.text, self.bank, clip_weights)
        dim = signs.shape[1]
        self.embedding_dim = dim
        n_signs, n_cat = len(self.bank.signs), len(self.bank.categories)
        width = self.tower.width * len(cfg.layers)
        r = min(cfg.feature_dim, width)
        self.register_buffer("feat_mean", torch.zeros(width))  # PCA of normal training patches (stage 1)
        self.register_buffer("feat_basis", torch.eye(width, r))  # [F, r]; the first r features until fitted
        self.proj = nn.Sequential(nn.LayerNorm(r), nn.Linear(r, dim))
        self.adapter = ShiftAdapter(dim, cfg.adapter_hidden)
        self.sign_shift = nn.Parameter(torch.zeros(n_signs, dim))  # delta: learnt shift of each sign embedding
        self.sign_weight = nn.Parameter(torch.zeros(n_signs, n_cat))  # W's logits (uniform at the start)
        self.normal_bias = nn.Parameter(torch.zeros(()))  # b0, the normal class's logit
        self.register_buffer("sign_emb", torch.from_numpy(signs))  # [S, D] from the text tower
        self.register_buffer("normal_emb", torch.from_numpy(normals))  # [Nn, D]
        self.register_buffer("association", torch.from_numpy(self.bank.association()))  # [S, C] 0/1
        self.register_buffer("aligned", torch.ones(n_signs))  # stage 2: 1 = aligned with its categories
        self.register_buffer("act_mean", torch.zeros(n_signs))  # sign activation over the validation normals
        self.register_buffer("act_std", torch.ones(n_signs))
        # Stage 2's z; -inf until fitted (every sign present: the same as no selection).
        self.register_buffer("select_z", torch.tensor(float("-inf")))

    @property
    def categories(self) -> list[str]:
        return self.bank.category_names

    # --- artifact ----------------------------------------------------------
    def config_dict(self) -> dict:
        bank = {"normal": self.bank.normal, "categories": self.bank.categories}
        text = replace(self.cfg.text, bank=bank, categories=None, dim=self.embedding_dim)
        cfg = replace(self.cfg, vision=self.tower.frozen_spec(), text=text)
        return {"family": "sdmad", **cfg.to_dict()}

    @classmethod
    def from_config_dict(cls, data: dict) -> SDMADModel:
        data = {k: v for k, v in data.items() if k != "family"}
        data.setdefault("sigmoid_outputs", True)  # saved before the field existed: sigmoid outputs
        cfg = SDMADConfig.from_dict(data)
        bank = bank_of(cfg.text)
        # The embeddings come with the artifact's weights: placeholders of the recorded width.
        d = cfg.text.dim
        return cls(
            cfg, encoded=(np.zeros((len(bank.signs), d), np.float32), np.zeros((len(bank.normal), d), np.float32))
        )

    # --- pieces ------------------------------------------------------------
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen vision features [B, N, L*W]: hidden states at ``layers``, 3x3 locally averaged."""
        states, _ = self.tower.hidden_states(images)
        g, maps = self.grid, []
        for i in self.cfg.layers:
            p = states[i][:, -g * g :]  # [B, g*g, W] patch tokens (CLS dropped)
            m = p.transpose(1, 2).reshape(p.shape[0], -1, g, g)
            m = F.avg_pool2d(m, AGGREGATION_KERNEL, stride=1, padding=AGGREGATION_KERNEL // 2, count_include_pad=False)
            maps.append(m.flatten(2).transpose(1, 2))
        return torch.cat(maps, -1)  # [B, g*g, L*W]

    def reduce(self, feats: torch.Tensor) -> torch.Tensor:
        """Frozen features [B, N, F] -> their PCA coordinates [B, N, r]."""
        return (feats - self.feat_mean) @ self.feat_basis

    def embed(self, reduced: torch.Tensor) -> torch.Tensor:
        """PCA coordinates -> unit patch embeddings in the sign space [B, N, D]."""
        return F.normalize(self.adapter(self.proj(reduced)), dim=-1)

    @torch.no_grad()
    def fit_reduction(self, feats: torch.Tensor, max_rows: int = 20_000, seed: int = 0) -> float:
        """PCA of standardised frozen patch features [n, F] (normal images; a ViT's few huge channels
        would otherwise take every component); returns the share of the standardised variance kept."""
        g = torch.Generator().manual_seed(seed)
        rows = feats[torch.randperm(len(feats), generator=g)[:max_rows]].double()
        mean, std = rows.mean(0), rows.std(0).clamp_min(1e-6)
        z = (rows - mean) / std
        vals, vecs = torch.linalg.eigh(z.T @ z / max(len(rows) - 1, 1))  # ascending
        r = self.feat_basis.shape[1]
        self.feat_mean.copy_(mean.to(self.feat_mean))
        self.feat_basis.copy_((vecs[:, -r:].flip(1) / std[:, None]).to(self.feat_basis))  # standardise, project
        return float(vals[-r:].sum() / vals.sum().clamp_min(1e-12))

    def signs(self) -> torch.Tensor:
        return F.normalize(self.sign_emb + self.sign_shift, dim=-1)  # [S, D]

    def weights(self) -> torch.Tensor:
        """[S, C]: softmax of the learnt weights over each category's aligned signs."""
        keep = self.association * self.aligned[:, None]
        keep = torch.where(keep.sum(0, keepdim=True) > 0, keep, self.association)  # never an empty category
        logits = self.sign_weight.masked_fill(keep == 0, float("-inf"))
        return torch.softmax(logits, 0)

    def topk(self) -> int:
        return max(1, int(round(self.grid * self.grid * self.cfg.topk_ratio)))

    def evidence(self, patches: torch.Tensor, select: bool = True) -> dict[str, torch.Tensor]:
        sel = (self.act_mean, self.act_std, self.select_z) if select else None
        return evidence(
            patches,
            self.signs(),
            self.normal_emb,
            self.weights(),
            self.normal_bias,
            self.cfg.logit_scale,
            self.topk(),
            sel,
        )

    @torch.no_grad()
    def set_categories(self, names: list[str]) -> None:
        """Tell only ``names`` apart (a dataset's categories): drops the other categories and the
        signs only they list. Before training only (the learnt weights are reset)."""
        if list(names) == self.categories:
            return
        keep_cat = [self.categories.index(n) for n in names] if set(names) <= set(self.categories) else None
        if keep_cat is None:
            missing = sorted(set(names) - set(self.categories))
            raise FlagError(
                f"sign bank {self.bank.domain!r} has categories {self.categories}, not {missing} of the dataset's "
                f"{list(names)}: write a sign bank naming every category (YAML or JSON, docs/models/sdmad.md) "
                "and pass it with --signs FILE"
            )
        sub = self.bank.subset(list(names))
        rows = [self.bank.signs.index(s) for s in sub.signs]
        dim = self.sign_emb.shape[1]
        self.bank, self.cfg = sub, replace(self.cfg, text=replace(self.cfg.text, categories=list(names)))
        device = self.sign_emb.device
        self.sign_emb = self.sign_emb[rows].clone()
        self.association = torch.from_numpy(sub.association()).to(device)
        for name in ("aligned", "act_std"):
            setattr(self, name, torch.ones(len(rows), device=device))
        self.act_mean = torch.zeros(len(rows), device=device)
        self.sign_shift = nn.Parameter(torch.zeros(len(rows), dim, device=device))
        self.sign_weight = nn.Parameter(torch.zeros(len(rows), len(names), device=device))

    # --- forward -----------------------------------------------------------
    def forward(self, images: torch.Tensor) -> ModelOutput:
        patches = self.embed(self.reduce(self.features(images)))  # [B, g*g, D]
        ev = self.evidence(patches)
        b, g = images.shape[0], self.grid
        map_logit = ev["map_logit"].reshape(b, g, g)
        out = torch.sigmoid if self.cfg.sigmoid_outputs else torch.clone  # raw logits: no ties at 1.0
        return ModelOutput(
            score=out(ev["image_logit"]),
            anomaly_map=out(map_logit),
            patch_embeddings=patches,
            image_logit=ev["image_logit"],
            map_logit=map_logit,
        )
