"""Exact nearest-neighbour search over patch embeddings with FAISS (CPU or GPU).

The GPU is used only when FAISS sees one (``faiss.get_num_gpus() > 0``): faiss-gpu
imports on machines without a GPU, and moving an index to a GPU there raises.
"""

from __future__ import annotations

import faiss
import numpy as np

METRICS = ("cosine", "l2")
# Queries per FAISS call: bounds the temporary distance tiles (GPU memory above all)
# while staying large enough to keep the BLAS/GPU kernels busy.
QUERY_BATCH = 16_384
# Rows with a norm below this are left unscaled by normalize_rows (zero vectors stay zero).
_NORM_EPS = 1e-12


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as contiguous float32; all-zero rows stay zero."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, _NORM_EPS)


class PatchIndex:
    """Flat (exact) FAISS index over ``vectors [N, E]``.

    ``metric="cosine"`` indexes L2-normalised vectors in ``IndexFlatIP`` and search
    returns cosine similarities (higher = closer); ``metric="l2"`` uses
    ``IndexFlatL2`` and returns squared Euclidean distances (lower = closer).

    Args:
        vectors: the embeddings to index.
        metric: "cosine" or "l2".
        use_gpu: True forces the GPU (error if none), False forces the CPU, None
            picks the GPU when FAISS sees one.
        gpu_id: which GPU to use.
    """

    def __init__(
        self,
        vectors: np.ndarray,
        metric: str = "cosine",
        use_gpu: bool | None = None,
        gpu_id: int = 0,
    ):
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
        vectors = np.asarray(vectors)
        if vectors.ndim != 2:
            raise ValueError(f"vectors must be 2-D [N, E], got shape {vectors.shape}")
        if vectors.shape[0] == 0:
            raise ValueError("cannot build a PatchIndex from 0 vectors (empty memory bank)")
        if not np.isfinite(vectors).all():
            raise ValueError("vectors contain NaN or infinite values")
        self.metric = metric
        self.dim = int(vectors.shape[1])
        if metric == "cosine":
            self._vectors = normalize_rows(vectors)
        else:
            self._vectors = np.ascontiguousarray(vectors, dtype=np.float32)

        n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if use_gpu is None:
            use_gpu = n_gpus > 0
        if use_gpu and n_gpus == 0:
            raise RuntimeError("use_gpu=True but FAISS sees no GPU (faiss-cpu, or no device)")

        flat = faiss.IndexFlatIP if metric == "cosine" else faiss.IndexFlatL2
        cpu_index = flat(self.dim)
        cpu_index.add(self._vectors)
        self._gpu_resources = None
        if use_gpu:
            # The resources must outlive the GPU index that uses them.
            self._gpu_resources = faiss.StandardGpuResources()
            self._index = faiss.index_cpu_to_gpu(self._gpu_resources, gpu_id, cpu_index)
        else:
            self._index = cpu_index

    @property
    def device(self) -> str:
        """ "cuda" when the index lives on a GPU, else "cpu"."""
        return "cuda" if self._gpu_resources is not None else "cpu"

    @property
    def vectors(self) -> np.ndarray:
        """The indexed vectors, float32 [N, E] (L2-normalised for cosine)."""
        return self._vectors

    def __len__(self) -> int:
        return int(self._vectors.shape[0])

    def __repr__(self) -> str:
        return f"PatchIndex(n={len(self)}, dim={self.dim}, metric={self.metric!r}, device={self.device!r})"

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest indexed vectors of each query.

        Returns:
            ``(scores [M, k], ids [M, k])``: cosine similarities (descending) or squared
            L2 distances (ascending), and row numbers into ``vectors`` (int64).
        """
        if _is_tensor(queries):  # a tensor on the index's GPU is searched there; any other goes to NumPy
            if self.device == "cuda" and queries.is_cuda:
                return self._search_tensor(queries, k)
            queries = queries.detach().float().cpu().numpy()
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2:
            raise ValueError(f"queries must be 2-D [M, E], got shape {q.shape}")
        if q.shape[1] != self.dim:
            raise ValueError(f"query dimension {q.shape[1]} does not match index dimension {self.dim}")
        if not 1 <= k <= len(self):
            raise ValueError(f"k must be in [1, {len(self)}] (index size), got {k}")
        scores = np.empty((q.shape[0], k), dtype=np.float32)
        ids = np.empty((q.shape[0], k), dtype=np.int64)
        for start in range(0, q.shape[0], QUERY_BATCH):
            chunk = q[start : start + QUERY_BATCH]
            if self.metric == "cosine":
                chunk = normalize_rows(chunk)
            else:
                chunk = np.ascontiguousarray(chunk, dtype=np.float32)
            d, i = self._index.search(chunk, k)
            scores[start : start + len(chunk)] = d
            ids[start : start + len(chunk)] = i
        return scores, ids

    def _search_tensor(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` of a CUDA tensor on the GPU index (``faiss.contrib.torch_utils`` passes its
        device pointer to FAISS: no copy to the host and back); the small results come back as NumPy."""
        import faiss.contrib.torch_utils  # noqa: F401 (lets the GPU index search torch tensors in place)
        import torch

        q = queries.detach().float()
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [M, {self.dim}], got shape {tuple(q.shape)}")
        if not 1 <= k <= len(self):
            raise ValueError(f"k must be in [1, {len(self)}] (index size), got {k}")
        scores, ids = [], []
        for start in range(0, q.shape[0], QUERY_BATCH):
            chunk = q[start : start + QUERY_BATCH]
            if self.metric == "cosine":  # normalize_rows' rule, on the device
                chunk = chunk / chunk.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)
            d, i = self._index.search(chunk.contiguous(), k)
            scores.append(d)
            ids.append(i)
        return torch.cat(scores).cpu().numpy(), torch.cat(ids).cpu().numpy().astype(np.int64)


def _is_tensor(x) -> bool:
    """A torch tensor (checked without importing torch)."""
    return type(x).__module__.startswith("torch") and hasattr(x, "is_cuda")
