"""Model replicas sized from the cluster, declared as data and checked before anything starts.

A :class:`ReplicaPlan` says what one replica asks for (CPUs, GPUs) and how many replicas
the actor pool may hold. :func:`plan_replicas` derives it from the job's flags and the
nodes the cluster has; :meth:`ReplicaPlan.check` refuses, at once and with the node shapes
in the message, a request that no node could ever hold (Ray would otherwise wait forever).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# CPU a node keeps for reading and decoding when it also holds model replicas.
DECODE_CPUS_PER_NODE = 1.0
# CPUs a GPU replica reserves by default: it feeds its GPU (copies, FAISS calls); the node's other CPUs
# decode, which is what a GPU replica waits on (``--cpus-per-replica`` asks for more).
GPU_REPLICA_CPUS = 1.0
# Smallest CPU share of a replica on a node whose CPUs are all taken by GPUs' replicas
# (fake-GPU test nodes declare 1 CPU per GPU): the rest of that CPU decodes.
MIN_REPLICA_CPUS = 0.5
MIN_DECODE_CPUS = 0.25  # smallest CPU share of a decode task


@dataclass(frozen=True)
class NodeShape:
    """What one node offers Ray (alive nodes, or node types an autoscaler can start)."""

    cpus: float
    gpus: float = 0.0
    name: str = ""
    count: int = 1  # nodes of this shape (an autoscaler's max_workers for a node type)

    def describe(self) -> str:
        return f"{self.name or 'node'} ({self.cpus:g} CPU, {self.gpus:g} GPU)"


@dataclass(frozen=True)
class ReplicaPlan:
    min_replicas: int
    max_replicas: int
    cpus: float  # per replica
    gpus: float  # per replica
    threads: int  # torch / onnxruntime / FAISS threads per replica
    decode_cpus: float = 1.0  # per decode / postprocess task: what the replicas leave on a node, at most 1

    def __post_init__(self):
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"replicas must satisfy 1 <= MIN <= MAX, got {self.min_replicas}:{self.max_replicas}")
        if self.cpus <= 0 or self.gpus < 0 or self.threads < 1:
            raise ValueError(f"a replica needs CPUs > 0, GPUs >= 0 and threads >= 1, got {self}")

    def fits(self, node: NodeShape) -> bool:
        return node.cpus >= self.cpus and node.gpus >= self.gpus

    def capacity(self, node: NodeShape) -> int:
        """Replicas one node of this shape holds."""
        if not self.fits(node):
            return 0
        by_cpu = math.floor(node.cpus / self.cpus + 1e-9)
        return min(by_cpu, math.floor(node.gpus / self.gpus + 1e-9)) if self.gpus else by_cpu

    def check(self, nodes: list[NodeShape], autoscaling: bool = False) -> None:
        """Raise ``SystemExit`` with the node shapes when no node can hold one replica.

        Without an autoscaler, the cluster must also hold ``min_replicas`` of them at once.
        """
        shapes = "; ".join(sorted({n.describe() for n in nodes})) or "no nodes"
        want = f"{self.cpus:g} CPU + {self.gpus:g} GPU per replica"
        if not any(self.fits(n) for n in nodes):
            raise SystemExit(
                f"no node can hold a model replica ({want}); the cluster has: {shapes}. "
                "Lower --cpus-per-replica / --gpus-per-replica or add a node type that fits."
            )
        if not autoscaling:
            room = sum(self.capacity(n) * n.count for n in nodes)
            if room < self.min_replicas:
                raise SystemExit(
                    f"--replicas asks for at least {self.min_replicas} replicas ({want}) but the "
                    f"cluster holds {room}: {shapes}. Lower MIN, or pass --autoscaling on a "
                    "cluster whose autoscaler starts nodes."
                )


def parse_replicas(text: str) -> tuple[int, int] | None:
    """``"4"`` -> (4, 4), ``"2:8"`` -> (2, 8), ``""`` -> None (the default)."""
    if not text:
        return None
    lo, _, hi = text.partition(":")
    try:
        lo_n, hi_n = int(lo), int(hi or lo)
    except ValueError:
        raise SystemExit(f"--replicas expects MIN or MIN:MAX (e.g. 4 or 2:8), got {text!r}") from None
    return lo_n, hi_n


def plan_replicas(
    nodes: list[NodeShape],
    device: str = "auto",
    replicas: str = "",
    cpus_per_replica: float = 0.0,
    gpus_per_replica: float = 1.0,
    threads: int = 0,
    autoscaling: bool = False,
) -> ReplicaPlan:
    """The replica plan for this cluster; see the job's flags for the meaning of each argument.

    ``device="gpu"`` demands GPUs (an autoscaler then starts GPU nodes); ``"auto"`` uses GPUs
    when a node has them. GPU replicas default to one per GPU with one CPU each (``GPU_REPLICA_CPUS``:
    the node's other CPUs decode); CPU replicas default to one per node with all but one of its CPUs.
    """
    if device not in ("auto", "gpu", "cpu"):
        raise SystemExit(f"--device must be auto, gpu or cpu, got {device!r}")
    gpu_nodes = [n for n in nodes if n.gpus > 0]
    use_gpu = device == "gpu" or (device == "auto" and bool(gpu_nodes))
    if device == "gpu" and not gpu_nodes and not autoscaling:
        raise SystemExit(
            "--device gpu: the cluster has no GPU node and no autoscaler (--autoscaling) to start one; "
            "use --device auto or cpu to score on CPUs"
        )
    asked = parse_replicas(replicas)
    if use_gpu:
        gpus = gpus_per_replica if gpus_per_replica > 0 else 1.0
        # Per GPU node: its CPUs less what decoding keeps, shared by the replicas its GPUs hold; a replica
        # takes GPU_REPLICA_CPUS of that at most, the rest decodes.
        shares = [(n.cpus - DECODE_CPUS_PER_NODE) / max(1.0, n.gpus / gpus) for n in gpu_nodes]
        share = min(shares, default=GPU_REPLICA_CPUS)
        cpus = cpus_per_replica or max(MIN_REPLICA_CPUS, min(GPU_REPLICA_CPUS, math.floor(share) or share))
        default = max(1, int(sum(n.gpus * n.count for n in gpu_nodes) // gpus))
    else:
        gpus = 0.0
        workers = [n for n in nodes if n.cpus > 0]
        smallest = min((n.cpus for n in workers), default=1.0)
        cpus = cpus_per_replica or max(MIN_REPLICA_CPUS, smallest - DECODE_CPUS_PER_NODE)
        default = max(1, sum(math.floor((n.cpus - DECODE_CPUS_PER_NODE) / cpus + 1e-9) * n.count for n in workers))
    # With an autoscaler, start with one replica and let the pool grow to what it can start.
    lo, hi = asked or ((1, default) if autoscaling else (default, default))
    # Threads: the replica's CPUs, plus the CPU decoding leaves idle between batches on small nodes.
    n_threads = threads or max(1, int(math.ceil(cpus)) + (0 if use_gpu else int(DECODE_CPUS_PER_NODE)))
    plan = ReplicaPlan(lo, hi, float(cpus), float(gpus), n_threads)
    # Decode tasks must fit beside the replicas (1-CPU fake-GPU nodes leave half a CPU).
    left = [n.cpus - min(plan.capacity(n), hi) * plan.cpus for n in nodes if n.cpus > 0]
    decode = min(1.0, max(MIN_DECODE_CPUS, min([x for x in left if x > 0], default=1.0)))
    return ReplicaPlan(lo, hi, float(cpus), float(gpus), n_threads, decode)


def cluster_nodes() -> list[NodeShape]:
    """Alive nodes of the connected Ray cluster (a head that runs no tasks declares 0 CPUs)."""
    import ray

    return [
        NodeShape(n["Resources"].get("CPU", 0.0), n["Resources"].get("GPU", 0.0), n["NodeManagerAddress"])
        for n in ray.nodes()
        if n["Alive"] and (n["Resources"].get("CPU", 0.0) > 0 or n["Resources"].get("GPU", 0.0) > 0)
    ]


def node_types(cluster_yaml: str) -> list[NodeShape]:
    """Worker node types of a Ray cluster launcher file (``available_node_types``), at their max count."""
    import yaml

    with open(cluster_yaml) as f:
        spec = yaml.safe_load(f)
    shapes = []
    for name, t in (spec.get("available_node_types") or {}).items():
        res = t.get("resources") or {}
        if res.get("CPU", 0) > 0 or res.get("GPU", 0) > 0:
            shapes.append(
                NodeShape(float(res.get("CPU", 0)), float(res.get("GPU", 0)), name, int(t.get("max_workers", 1)))
            )
    if not shapes:
        raise SystemExit(f"--cluster-config {cluster_yaml}: no node type declares CPU or GPU resources")
    return shapes
