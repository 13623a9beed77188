"""EntroAD's frozen prior prompts: domain-agnostic normal / anomalous text anchors [D, 2]."""

from __future__ import annotations

import numpy as np
import torch

from adcore.models.entroad.config import PromptSpec


def prior_anchors(spec: PromptSpec, dim: int | None) -> torch.Tensor:
    """Anchors [D, 2] (normal, anomalous) from the pooled prompt banks of ``spec.domains``.

    ``dim``: the joint width the anchors must have (None: the text tower's; needed for ``random``).

    Pooling every domain's bank keeps what the banks share (healthy vs diseased wording) and
    averages out the anatomy, which is what a model used on unseen domains should carry.
    """
    if spec.kind == "random":
        if dim is None:
            raise ValueError("random prompt anchors need proj_dim")
        gen = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(dim, 2, generator=gen))
        return q
    from adcore.backbones import text as text_towers
    from adcore.prompts import list_domains, load_prompt_bank

    banks = [load_prompt_bank(d) for d in (spec.domains or list_domains())]
    normal = [p for b in banks for p in b.normal]
    anomalous = [p for b in banks for p in b.anomalous]
    if spec.kind == "clip":
        if not spec.weights:
            raise ValueError("prompt kind 'clip' needs a CLIPModel folder in text.weights")
        tower = text_towers.ClipTextTower(spec.weights)
    else:
        tower = text_towers.load_text_tower(spec.kind, spec.weights or str(text_towers.minilm_dir()))
    anchors = text_towers.text_anchors(tower, normal, anomalous)  # [D, 2]
    if spec.center:  # keep the normal/anomalous difference, drop the shared "medical image" part
        anchors = anchors - anchors.mean(axis=1, keepdims=True)
        anchors = anchors / np.linalg.norm(anchors, axis=0, keepdims=True)
    if dim is not None and anchors.shape[0] != dim:
        raise ValueError(f"prompt anchors are {anchors.shape[0]}-d but the joint space is {dim}-d")
    return torch.from_numpy(np.ascontiguousarray(anchors, dtype=np.float32))
