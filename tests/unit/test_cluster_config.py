"""The Ray cluster launcher configs pass Ray's own schema and declare what the jobs need."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = [REPO_ROOT / "ray_cluster.yaml", *sorted((REPO_ROOT / "cluster").glob("*.yaml"))]


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _ray_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_configs_found():
    names = {p.name for p in CONFIGS}
    assert "ray_cluster.yaml" in names and "gpu-4x8-aws.yaml" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_raw_config_matches_ray_schema(path):
    # The raw file too: the schema forbids unknown keys, which would otherwise hide behind defaults.
    jsonschema.validate(_load(path), _ray_schema())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_prepared_config_validates_like_ray_up(path):
    # `ray up` merges the provider defaults, then validates: do the same.
    validate_config(prepare_config(_load(path)))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_node_types(path):
    config = _load(path)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head should not hold GPUs"
    gpu = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
    cpu = {n: t for n, t in types.items() if n != config["head_node_type"] and not t["resources"].get("GPU")}
    assert gpu, f"{path.name}: no worker type declares GPUs"
    assert cpu, f"{path.name}: no CPU worker type for decoding"
    for name, node in gpu.items():
        assert node["node_config"]["InstanceType"].split(".")[0] in {"g5", "g6", "g6e", "p3", "p4d", "p5"}, name
        assert node.get("max_workers", 0) > 0, name
        install = " ".join(node["worker_setup_commands"])
        assert '"torch==2.13.0"' in install and ".[gpu]" in install, name
        assert "whl/cpu" not in install, f"{name} would install the CPU torch wheel"
    for name, node in cpu.items():
        assert "whl/cpu" in " ".join(node["worker_setup_commands"]), name
    assert config["idle_timeout_minutes"] > 0
    assert any(local == "." for local in config["file_mounts"].values()), "the repository is not synced"
    assert sum(t.get("min_workers", 0) for t in types.values()) <= config["max_workers"]


def test_schema_rejects_a_broken_config():
    """Guards the test itself: a typo'd key or a fractional GPU count must fail validation."""
    config = _load(CONFIGS[0])
    typo = copy.deepcopy(config)
    typo["idle_timeout_minute"] = 5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, _ray_schema())
    fractional = copy.deepcopy(config)
    gpu_type = next(n for n, t in fractional["available_node_types"].items() if t["resources"].get("GPU"))
    fractional["available_node_types"][gpu_type]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(fractional))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_dashboard_listens_on_loopback_only(path):
    """The dashboard's job API runs code on the cluster: only a tunnel to the head may reach it."""
    config = _load(path)
    starts = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert starts, f"{path.name}: no `ray start` on the head"
    for command in starts:
        hosts = [arg.split("=", 1)[1] for arg in command.split() if arg.startswith("--dashboard-host")]
        assert hosts == ["127.0.0.1"], f"{path.name}: dashboard host {hosts or 'default'}; bind it to 127.0.0.1"


KUBERAY = sorted((REPO_ROOT / "cluster" / "kuberay").glob("*.yaml"))


def _ray_clusters(doc: dict) -> list[dict]:
    """The RayCluster specs of a KubeRay document (a RayCluster, or the cluster a RayJob starts)."""
    if doc["kind"] == "RayCluster":
        return [doc["spec"]]
    if doc["kind"] == "RayJob":
        return [doc["spec"]["rayClusterSpec"]]
    return []


def test_kuberay_manifests_found():
    assert {p.name for p in KUBERAY} >= {"raycluster.yaml", "rayjob-nightly.yaml", "cronjob-nightly.yaml"}


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_clusters_require_a_token(path):
    """KubeRay's operator and job submitter reach the dashboard over the head service, so it cannot be
    bound to loopback there: token authentication guards it, and the service stays inside the cluster."""
    ray_pin = next(d for d in (REPO_ROOT / "pyproject.toml").read_text().split('"') if d.startswith("ray["))
    for doc in yaml.safe_load_all(path.read_text()):
        for spec in _ray_clusters(doc):
            assert spec.get("authOptions", {}).get("mode") == "token", f"{path.name}: token authentication is off"
            assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", path.name
            assert ray_pin.endswith("==" + spec["rayVersion"]), f"{path.name}: rayVersion differs from {ray_pin}"
            assert "0.0.0.0" not in json.dumps(spec["headGroupSpec"].get("rayStartParams", {})), path.name


def test_nightly_cronjob_creates_the_rayjob():
    cronjob = (REPO_ROOT / "cluster" / "kuberay" / "cronjob-nightly.yaml").read_text()
    docs = {d["kind"]: d for d in yaml.safe_load_all(cronjob)}
    pod = docs["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["command"][:3] == ["kubectl", "create", "-f"]
    assert docs["CronJob"]["spec"]["concurrencyPolicy"] == "Forbid"
    job = yaml.safe_load((REPO_ROOT / "cluster" / "kuberay" / "rayjob-nightly.yaml").read_text())
    assert "generateName" in job["metadata"], "a nightly RayJob needs a fresh name every night"
    assert "jobs/score.py --config" in job["spec"]["entrypoint"]
    config = yaml.safe_load(docs["ConfigMap"]["data"]["nightly.yaml"])
    assert {"input", "model", "output"} <= set(config)
