"""Fusion adapter: an MLP with parallel classification and segmentation heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FusionAdapter(nn.Module):
    """Two parallel bottleneck heads (cls, seg), each ``width -> text_dim -> width``.

    Paper (section 1): Linear(1024->768) then Linear(768->1024) per head; after the
    first linear layer the tokens are matched against the text anchors [768, 2],
    giving the per-layer text logits ``MLP_text_i``; the two heads' outputs are summed.
    The bottleneck width equals the text-anchor width so that product is defined.
    """

    def __init__(self, width: int, text_dim: int, negative_slope: float = 0.01):
        super().__init__()
        self.cls_in = nn.Linear(width, text_dim)
        self.cls_out = nn.Linear(text_dim, width)
        self.seg_in = nn.Linear(width, text_dim)
        self.seg_out = nn.Linear(text_dim, width)
        self.act = nn.LeakyReLU(negative_slope)

    def forward(self, tokens: torch.Tensor, anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (fused tokens [B, T, W], cls text logits [B, T, 2], seg text logits [B, T, 2])."""
        h_cls = self.act(self.cls_in(tokens))  # [B, T, text_dim]
        h_seg = self.act(self.seg_in(tokens))
        fused = self.cls_out(h_cls) + self.seg_out(h_seg)  # [B, T, W]
        cls_text = F.normalize(h_cls, dim=-1) @ anchors  # [B, T, 2]
        seg_text = F.normalize(h_seg, dim=-1) @ anchors
        return fused, cls_text, seg_text
