"""A small VAE over patch embeddings that yields class centroids (few-shot stage).

Paper (section 1): one VAE per class of a domain, Adam lr 1e-4, loss KLD +
reconstruction, gradient clipping, 16 centroids per class. The paper does not
say how a VAE "yields" centroids; here the embeddings are encoded to their
posterior means, k-means finds ``n_centroids`` centres in latent space, and the
decoder maps those centres back to embedding space. Decoded centres are smooth
prototypes of the class rather than single noisy patches.

All randomness (weight init, batch order, posterior samples) comes from one
``torch.Generator`` seeded by ``VAEConfig.seed``: fitting is deterministic and
leaves torch's global RNG as it found it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VAEConfig:
    latent_dim: int = 32
    hidden_dim: int = 256
    lr: float = 1e-4  # paper
    epochs: int = 30
    batch_size: int = 256
    grad_clip: float = 1.0  # paper: gradient clipping, value not given
    kld_weight: float = 1e-3  # keeps the posterior informative on small sets
    n_centroids: int = 16  # paper
    seed: int = 0


def _linear(n_in: int, n_out: int, generator: torch.Generator | None) -> nn.Linear:
    """``nn.Linear`` with its default init drawn from ``generator`` (None: torch's global RNG).

    The layer is built uninitialised (``skip_init``) so that building it draws nothing
    from the global RNG either.
    """
    layer = nn.utils.skip_init(nn.Linear, n_in, n_out)
    with torch.no_grad():
        nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)  # as nn.Linear.reset_parameters
        bound = 1 / math.sqrt(n_in)
        nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return layer


class PatchVAE(nn.Module):
    """Encoder to a diagonal Gaussian posterior, decoder back to embedding space.

    Args:
        dim: Embedding size.
        cfg: Layer sizes.
        generator: Source of the initial weights; None uses torch's global RNG.
    """

    def __init__(self, dim: int, cfg: VAEConfig, generator: torch.Generator | None = None):
        super().__init__()
        hidden, latent = cfg.hidden_dim, cfg.latent_dim
        self.encoder = nn.Sequential(_linear(dim, hidden, generator), nn.GELU(), _linear(hidden, 2 * latent, generator))
        self.decoder = nn.Sequential(_linear(latent, hidden, generator), nn.GELU(), _linear(hidden, dim, generator))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return mu, logvar.clamp(-10, 10)

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction, posterior mean and log-variance; the sample is drawn from ``generator``."""
        mu, logvar = self.encode(x)
        noise = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        z = mu + noise * torch.exp(0.5 * logvar)
        return self.decoder(z), mu, logvar


def vae_loss(x, recon, mu, logvar, kld_weight: float) -> torch.Tensor:
    rec = F.mse_loss(recon, x, reduction="none").sum(-1).mean()
    kld = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)).mean()
    return rec + kld_weight * kld


def fit_vae_centroids(embeddings: np.ndarray, cfg: VAEConfig | None = None) -> np.ndarray:
    """Train a VAE on one class's embeddings [N, E] and return centroids [K, E] (L2-normalised)."""
    import faiss

    cfg = cfg or VAEConfig()
    x = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    if len(x) == 0:
        raise ValueError("no embeddings to fit centroids on")
    gen = torch.Generator().manual_seed(cfg.seed)  # local: the caller's global RNG stream is left alone
    vae = PatchVAE(x.shape[1], cfg, generator=gen)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    with torch.enable_grad():
        for _ in range(cfg.epochs):
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), cfg.batch_size):
                batch = x[order[start : start + cfg.batch_size]]
                recon, mu, logvar = vae(batch, generator=gen)
                loss = vae_loss(batch, recon, mu, logvar, cfg.kld_weight)
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
                opt.step()
    with torch.no_grad():
        mu = vae.encode(x)[0].numpy().astype(np.float32)
        k = cfg.n_centroids
        if len(mu) < k:  # always return exactly k centroids: repeat points of a tiny class
            mu = np.resize(mu, (k, mu.shape[1]))
        km = faiss.Kmeans(mu.shape[1], k, niter=25, seed=cfg.seed, verbose=False)
        km.train(np.ascontiguousarray(mu))
        centres = vae.decoder(torch.from_numpy(km.centroids)).numpy()
    centres /= np.linalg.norm(centres, axis=1, keepdims=True) + 1e-12
    return centres.astype(np.float32)
