"""Model replicas sized from the cluster's nodes, refused at once when nothing can hold them."""

from __future__ import annotations

import pytest

from jobs.scoring.resources import NodeShape, ReplicaPlan, parse_replicas, plan_replicas


def test_one_replica_per_gpu_with_one_cpu_the_rest_decoding():
    # ray_cluster.yaml's shape: g5.xlarge (4 CPU, 1 GPU) workers and a 16-CPU node.
    plan = plan_replicas([NodeShape(4, 1), NodeShape(4, 1), NodeShape(16, 0)])
    assert (plan.min_replicas, plan.max_replicas, plan.cpus, plan.gpus) == (2, 2, 1.0, 1.0)
    p4d = plan_replicas([NodeShape(96, 8), NodeShape(96, 8)])
    assert (p4d.max_replicas, p4d.cpus, p4d.gpus) == (16, 1.0, 1.0)
    fake = plan_replicas([NodeShape(1, 1), NodeShape(1, 1)])
    assert (fake.max_replicas, fake.cpus, fake.decode_cpus) == (2, 0.5, 0.5), "decode tasks fit beside them"


def test_cpu_clusters_leave_a_cpu_per_node_for_decoding():
    plan = plan_replicas([NodeShape(2)])
    assert (plan.max_replicas, plan.cpus, plan.threads, plan.decode_cpus) == (1, 1.0, 2, 1.0)
    many = plan_replicas([NodeShape(8), NodeShape(8)], device="cpu")
    assert (many.max_replicas, many.cpus) == (2, 7.0)
    assert plan_replicas([NodeShape(4, 1)], device="cpu").gpus == 0


def test_flags_override_and_are_checked():
    assert parse_replicas("3") == (3, 3) and parse_replicas("2:8") == (2, 8) and parse_replicas("") is None
    with pytest.raises(SystemExit, match="MIN:MAX"):
        parse_replicas("two")
    plan = plan_replicas([NodeShape(4, 1)], replicas="1:4", cpus_per_replica=2)
    assert (plan.min_replicas, plan.max_replicas, plan.cpus) == (1, 4, 2.0)
    with pytest.raises(ValueError):
        ReplicaPlan(3, 2, 1.0, 0.0, 1)


def test_a_request_no_node_can_hold_fails_with_the_node_shapes():
    nodes = [NodeShape(4, 1, "g5"), NodeShape(16, 0, "m5")]
    with pytest.raises(SystemExit, match=r"no node can hold.*15 CPU \+ 1 GPU.*g5 \(4 CPU, 1 GPU\)"):
        plan_replicas(nodes, cpus_per_replica=15).check(nodes)
    with pytest.raises(SystemExit, match="holds 1"):
        plan_replicas(nodes, replicas="3").check(nodes)
    plan_replicas(nodes, replicas="3").check(nodes, autoscaling=True)  # an autoscaler may add nodes


def test_device_gpu_without_gpus_is_refused_not_run_on_cpu():
    with pytest.raises(SystemExit, match="no GPU node"):
        plan_replicas([NodeShape(8)], device="gpu")
    assert plan_replicas([NodeShape(8)], device="gpu", autoscaling=True).gpus == 1.0
    with pytest.raises(SystemExit, match="--device"):
        plan_replicas([NodeShape(8)], device="tpu")
