"""Patch-relation graph from ViT self-attention and its patch-level structural entropy.

The graph: nodes are the patch tokens, the directed edge ``i -> j`` weighs how much patch ``i``
attends to patch ``j`` (attention probabilities averaged over heads; CLS and register tokens
dropped, rows renormalised). Its row-stochastic matrix ``P`` is a random walk on the patches.

The estimator: the structural entropy of a graph under the one-level encoding tree is the
entropy of where a random step lands; for a random walk with stationary law ``pi`` it splits into
``sum_i pi_i H(P_i)``, one term per node. The patch-level estimate is that node term,

    h_i = -sum_j P_ij log P_ij / log N,

the relational uncertainty of patch ``i``: 1 when ``i`` relates to every patch alike (uniform
attention), 0 when it relates to one patch only (one-hot attention). Why this one: it needs no
partition of the graph (the two-level structural entropy needs communities, which a fixed ONNX
graph cannot search for), it is exact on the graph the attention defines, differentiable,
bounded, and comparable across image sizes thanks to the ``log N`` normalisation.
"""

from __future__ import annotations

import math

import torch

_EPS = 1e-12  # 0 log 0 = 0


def patch_graph(attentions: torch.Tensor, n_patches: int) -> torch.Tensor:
    """[B, H, T, T] attention probabilities -> [B, N, N] row-stochastic patch-to-patch graph.

    The patch tokens are the last ``n_patches`` of the sequence (CLS and registers come first).
    """
    a = attentions.mean(1)[:, -n_patches:, -n_patches:]  # [B, N, N] head-averaged patch block
    return a / a.sum(-1, keepdim=True).clamp_min(_EPS)


def node_entropy(graph: torch.Tensor) -> torch.Tensor:
    """[B, N, N] row-stochastic graph -> [B, N] normalised entropy of each node's out-edges, in [0, 1]."""
    n = graph.shape[-1]
    h = -(graph * torch.log(graph.clamp_min(_EPS))).sum(-1)  # [B, N]
    return h / math.log(n) if n > 1 else torch.zeros_like(h)


def graph_smooth(graph: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """One random-walk step of token features on the graph: [B, N, N] x [B, N, D] -> [B, N, D]."""
    return graph @ tokens
