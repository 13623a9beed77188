"""A real tritonserver (CPU, from nvidia-pytriton) serving a tiny exported ONNX model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import pytriton  # noqa: F401 (the Triton binary's package: a missing one fails, never skips)
import torch
import tritonclient.grpc  # noqa: F401
import tritonclient.http  # noqa: F401

from adcore.serving.client import TritonClient, TritonUnavailableError
from adcore.serving.repository import TensorSpec, write_model_repository
from adcore.serving.triton_server import LocalTriton, TritonStartError, process_group_alive

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO_ROOT = Path(__file__).resolve().parents[2]
CHANNELS, SIDE, FEATURES, CLASSES = 3, 16, 4, 2
MAX_ABS_DIFF = 1e-5
OUTPUTS = ("score", "feature_map", "top")
# config.pbtxt parameters Triton must parse back unchanged (quotes, backslashes, a newline).
PARAMETERS = {"artifact": 'C:\\models\\"tiny"\nv3\\', 'odd "key"': "x"}
# Timeouts far longer than a refusal or a load failure takes, even on a loaded machine: a test that
# waits one out has found a hang, not a slow machine.
REQUEST_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 150.0


class TinyNet(torch.nn.Module):
    """Conv + linear with three named outputs: a score vector, a feature map and a batch-only top score."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(CHANNELS, FEATURES, 3, padding=1)
        self.head = torch.nn.Linear(FEATURES, CLASSES)

    def forward(self, image):
        fmap = self.conv(image).relu()  # [B, F, H, W]
        score = self.head(fmap.mean(dim=(2, 3)))
        return score, fmap, score.amax(dim=1)  # [B, C], [B, F, H, W], [B]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    work = tmp_path_factory.mktemp("triton")
    torch.manual_seed(0)
    model = TinyNet().eval()
    onnx_path = work / "tiny.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(
        model,
        (torch.randn(2, CHANNELS, SIDE, SIDE),),
        str(onnx_path),
        dynamo=True,
        input_names=["image"],
        output_names=list(OUTPUTS),
        dynamic_shapes={"image": {0: batch}},
        external_data=False,
    )
    dirs = write_model_repository(
        onnx_path,
        work / "repo",
        "tiny",
        version=3,
        inputs=[TensorSpec("image", "FP32", [CHANNELS, SIDE, SIDE])],
        outputs=[
            TensorSpec("score", "FP32", [CLASSES]),
            TensorSpec("feature_map", "FP32", [FEATURES, SIDE, SIDE]),
            TensorSpec("top", "FP32", [1], reshape=[]),  # Triton rejects empty dims
        ],
        intra_op_num_threads=1,
        parameters=PARAMETERS,
    )
    return onnx_path, work / "repo", dirs


def test_repository_layout(repo):
    onnx_path, repo_dir, dirs = repo
    assert set(dirs) == {"tiny", "tiny_ort"}
    python_cfg = (dirs["tiny"] / "config.pbtxt").read_text()
    ort_cfg = (dirs["tiny_ort"] / "config.pbtxt").read_text()
    assert 'backend: "python"' in python_cfg and "KIND_CPU" in python_cfg
    assert 'backend: "onnxruntime"' in ort_cfg and "KIND_GPU" in ort_cfg
    for cfg in (python_cfg, ort_cfg):
        assert "dynamic_batching" in cfg and "preferred_batch_size: [ 4, 8, 16 ]" in cfg
        assert 'name: "feature_map"' in cfg and "dims: [ 4, 16, 16 ]" in cfg
        assert "dims: [ 1 ]\n    reshape: { shape: [ ] }" in cfg
    for d in dirs.values():
        onnx_copy = d / "3" / "model.onnx"
        assert onnx_copy.is_file() and not onnx_copy.is_symlink()
        assert onnx_copy.read_bytes() == onnx_path.read_bytes()
    assert (dirs["tiny"] / "3" / "model.py").is_file()


def test_spec_mismatch_is_rejected(repo, tmp_path):
    onnx_path, _, _ = repo
    with pytest.raises(ValueError, match="no graph input named 'pixels'"):
        write_model_repository(
            onnx_path,
            tmp_path,
            "bad",
            1,
            [TensorSpec("pixels", "FP32", [3, 16, 16])],
            [TensorSpec("score", "FP32", [2])],
        )
    with pytest.raises(ValueError, match="is FP32 in the graph"):
        write_model_repository(
            onnx_path,
            tmp_path,
            "bad",
            1,
            [TensorSpec("image", "FP16", [3, 16, 16])],
            [TensorSpec("score", "FP32", [2])],
        )


def test_serve_infer_and_unavailable(repo):
    onnx_path, repo_dir, dirs = repo
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    server = LocalTriton(repo_dir, ready_timeout_s=READY_TIMEOUT_S)
    assert server.models == ["tiny"]  # the _ort twin is never loaded on the CPU binary
    with server:
        pgid = server.pid
        for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
            with TritonClient(url, "tiny", protocol=protocol) as client:
                assert client.is_ready()
                for batch in (1, 5):
                    image = rng.standard_normal((batch, CHANNELS, SIDE, SIDE), dtype=np.float32)
                    got = client.infer({"image": image})
                    want = dict(zip(OUTPUTS, session.run(list(OUTPUTS), {"image": image})))
                    want["top"] = want["top"].reshape(batch, 1)  # served as dims [1]
                    assert set(got) == set(OUTPUTS)
                    for name in want:
                        assert got[name].shape == want[name].shape, (protocol, batch, name)
                        assert np.abs(got[name] - want[name]).max() < MAX_ABS_DIFF, (protocol, batch, name)
                with pytest.raises(ValueError, match="missing"):
                    client.infer({})
        assert dirs["tiny_ort"].is_dir()
        assert not TritonClient(server.http_url, "tiny_ort").is_ready()
        _check_served_config(server)

        # A long request timeout: a refused port must fail at once, not by waiting the timeouts out.
        http = TritonClient(server.http_url, "tiny", retries=2, backoff_s=0.1, timeout_s=REQUEST_TIMEOUT_S)
        grpc = TritonClient(
            server.grpc_url, "tiny", protocol="grpc", retries=2, backoff_s=0.1, timeout_s=REQUEST_TIMEOUT_S
        )
        image = rng.standard_normal((2, CHANNELS, SIDE, SIDE), dtype=np.float32)
        http.infer({"image": image})
        grpc.infer({"image": image})
        server.stop()  # mid-way: clients already hold metadata and connections

        assert not process_group_alive(pgid), "tritonserver or its stub outlived stop()"
        for client in (http, grpc):
            start = time.monotonic()
            with pytest.raises(TritonUnavailableError, match="127.0.0.1") as info:
                client.infer({"image": image})
            # 3 attempts with backoff 0.1 + 0.2 s on a refused port: less than one request's timeout.
            assert time.monotonic() - start < REQUEST_TIMEOUT_S
            assert "3 times" in str(info.value)
            assert not client.is_ready()
            client.close()


def _check_served_config(server: LocalTriton) -> None:
    """Triton parsed the written config.pbtxt: escaped parameters and the reshape read back as written."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    http = httpclient.InferenceServerClient(server.http_url)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        for config in (http.get_model_config("tiny"), grpc.get_model_config("tiny", as_json=True)["config"]):
            params = {k: v["string_value"] for k, v in config["parameters"].items()}
            assert params.items() >= PARAMETERS.items() and params["onnx_filename"] == "model.onnx"
            top = next(o for o in config["output"] if o["name"] == "top")
            assert [int(d) for d in top["dims"]] == [1] and "reshape" in top
    finally:
        http.close()
        grpc.close()


def test_unloadable_model_fails_fast(repo):
    """The onnxruntime twin cannot load on the CPU binary: start must say so, not hang, and leave nothing."""
    _, repo_dir, _ = repo
    server = LocalTriton(repo_dir, models=["tiny_ort"], ready_timeout_s=READY_TIMEOUT_S)
    start = time.monotonic()
    with pytest.raises(TritonStartError, match="tiny_ort: UNAVAILABLE.*onnxruntime"):
        server.start()
    assert time.monotonic() - start < READY_TIMEOUT_S, "the start waited its timeout out: the model state was not read"
    assert server.pid is None


def test_cli_start_stop(repo, tmp_path):
    _, repo_dir, _ = repo
    state = tmp_path / "state.json"
    cli = [sys.executable, str(REPO_ROOT / "cluster" / "triton_local.py")]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(
        [*cli, "start", "--repository", str(repo_dir), "--models", "tiny", "--state", str(state)],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(state.read_text())
    try:
        assert info["http_url"] in out.stdout
        client = TritonClient(info["http_url"], "tiny")
        assert client.is_ready()
        client.close()
    finally:
        stop = subprocess.run(
            [*cli, "stop", "--state", str(state)], capture_output=True, text=True, timeout=60, env=env
        )
    assert stop.returncode == 0, stop.stderr
    assert not state.exists()
    assert not process_group_alive(info["pid"])
