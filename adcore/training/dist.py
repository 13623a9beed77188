"""Collectives of the training loop, safe on every backend (gloo on CPU, NCCL on CUDA).

NCCL only moves CUDA tensors, and a rank that makes one collective call more than the
others waits for its peers until the process group's timeout (30 minutes by default).
So every tensor here lives on the process group's device, and every decision that ends
a loop early (time budget, end of a shard, early stopping) goes through :func:`agree_stop`,
which all ranks call the same number of times. Without an initialised process group (one
process) every function is the identity; with one (Ray Train starts one even for a single
worker) the collectives run, so a one-GPU run exercises NCCL too.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

# Attribute a module (or any of its submodules) sets to True when some of its trainable
# parameters get no gradient in a step: DDP then searches the graph for them every step.
FIND_UNUSED_ATTR = "find_unused_parameters"


def active(world_size: int) -> bool:
    """Whether collectives run: a process group is initialised (``world_size`` must be its size)."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    if dist.get_world_size() != world_size:
        raise ValueError(f"world_size {world_size} given, the process group has {dist.get_world_size()} ranks")
    return True


def collective_device() -> torch.device:
    """The device collectives of the default process group run on: the current CUDA device for NCCL."""
    if dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``: CUDA when torch sees it, else the CPU. A CUDA device becomes the current one."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"training device {device} asked for, but torch sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)  # all_gather_object and NCCL use the current device
    return device


def all_reduce(values: list[float], world_size: int, op: str = "sum") -> list[float]:
    """Element-wise ``sum``/``max``/``min`` of ``values`` over the ranks (float64)."""
    if not active(world_size):
        return list(values)
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=ops[op])
    return t.cpu().tolist()


def mean(value: float | None, world_size: int) -> float | None:
    """Mean of ``value`` over the ranks; NaN or None on a rank (nothing measured) leaves it out."""
    if not active(world_size):
        return value
    ok = value is not None and np.isfinite(value)
    total, count = all_reduce([float(value) if ok else 0.0, 1.0 if ok else 0.0], world_size)
    if count == 0:
        return None if value is None else float("nan")
    return total / count


def agree_stop(stop: bool, world_size: int) -> bool:
    """True on every rank when any rank wants to stop. Every rank must call it at the same point."""
    if not active(world_size):
        return bool(stop)
    return all_reduce([1.0 if stop else 0.0], world_size, "max")[0] > 0


def agree_flags(flags: list[bool], world_size: int) -> list[bool]:
    """Each flag True on every rank when any rank sets it: :func:`agree_stop` for several in one collective."""
    if not active(world_size):
        return [bool(f) for f in flags]
    return [v > 0 for v in all_reduce([1.0 if f else 0.0 for f in flags], world_size, "max")]


def min_int(value: int, world_size: int) -> int:
    """The smallest ``value`` over the ranks (e.g. steps per epoch, so every rank runs as many)."""
    return int(all_reduce([float(value)], world_size, "min")[0])


def gather_arrays(array: np.ndarray, world_size: int) -> np.ndarray:
    """Concatenate ``array`` (same trailing shape and dtype on every rank) along axis 0 over the ranks.

    Tensor collectives on the process group's device: the row counts first, then the rows
    padded to the largest count (all_gather needs equal sizes), trimmed after.
    """
    if not active(world_size):
        return array
    device = collective_device()
    array = np.ascontiguousarray(array)
    counts = torch.tensor([array.shape[0]], dtype=torch.int64, device=device)
    all_counts = [torch.zeros_like(counts) for _ in range(world_size)]
    dist.all_gather(all_counts, counts)
    sizes = [int(c.item()) for c in all_counts]
    padded = np.zeros((max(sizes), *array.shape[1:]), array.dtype)
    padded[: array.shape[0]] = array
    local = torch.from_numpy(padded).to(device)
    parts = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(parts, local)
    return np.concatenate([p[:n].cpu().numpy() for p, n in zip(parts, sizes)])


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """Every rank's ``obj`` (small, picklable), in rank order; on NCCL through the current CUDA device."""
    if not active(world_size):
        return [obj]
    parts: list = [None] * world_size
    dist.all_gather_object(parts, obj)
    return parts


def needs_unused_parameter_search(module: nn.Module) -> bool:
    """Whether DDP must look for trainable parameters without a gradient (a module says so)."""
    return any(bool(getattr(m, FIND_UNUSED_ATTR, False)) for m in module.modules())


# ---- RNG state, per rank, in a form ``torch.load(weights_only=True)`` reads back ----


def rng_state() -> dict:
    """This process's torch (CPU and current CUDA device), NumPy global and Python ``random`` states."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
