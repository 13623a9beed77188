"""Artifact -> jobs/export.py -> a real tritonserver; one Scorer path over every network backend.

The same images scored through torch, onnxruntime and Triton (HTTP and gRPC), in batch and
single-image calls, give the same scores, maps and masks (the Scorer is the only inference path).
The exported graphs take uint8 frames, as the scoring job's decoder ships them; torch is fed the
same frames (``value / 255``), so every backend sees bit-identical network inputs.

Three tiny artifacts (fusion-small, fusion-large = CLIP + BEiT, patchcore) are exported by the
job into one repository (one of them from S3, through the script's command line) and served by
the CPU tritonserver bundled in nvidia-pytriton on 127.0.0.1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytriton  # noqa: F401 (the Triton binary's package: a missing one fails, never skips)
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from adcore import engine
from adcore import scorer as scoring
from adcore.export import OnnxNetwork
from adcore.serving import LocalTriton, TritonClient, TritonNetwork
from adcore.serving.artifacts import ModelMismatchError, check_served_model
from jobs.export import ExportConfig, main

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TOLERANCE = 1e-4
# preset -> artifact version; SD-MAD (a head with categories) and EntroAD as the newest families.
PRESETS = {"fusion-small": 1, "fusion-large": 2, "patchcore": 3, "sdmad": 4, "entroad-small": 5}
FROM_S3 = "patchcore"  # exported through `python jobs/export.py` from an s3:// artifact
BATCHES = (1, 3)
VARIANT_PRESET = "patchcore"  # its int8 variant is served too
JOB_TIMEOUT_S = 180  # the script imports torch + transformers and exports (seconds on CPU, more under load)


def _model_name(preset: str) -> str:
    return f"{preset}-tiny"


@pytest.fixture(scope="module")
def served(tmp_path_factory, s3_server, tiny_artifacts):
    """Export every tiny artifact with the job into one repository and serve it."""
    work = tmp_path_factory.mktemp("export")
    repo = work / "repo"
    scorers, outputs = {}, {}
    for preset, version in PRESETS.items():
        local = tiny_artifacts(preset, version)
        if preset == FROM_S3:
            uri = s3_server.make_bucket("export-triton-test") + f"/{preset}"
            scoring.load(local).save(uri, model_name=_model_name(preset), version=version)
            cmd = [sys.executable, "jobs/export.py", "--model", uri, "--output", str(repo), "--max-batch-size", "8"]
            proc = subprocess.run(
                cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, env=os.environ
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            outputs[preset] = proc.stdout
            scorers[preset] = scoring.load(uri)
        else:
            summary = main(ExportConfig(model=local, output=str(repo), max_batch_size=8, intra_op_threads=1))
            outputs[preset] = summary
            scorers[preset] = scoring.load(local)
    models = [_model_name(p) for p in PRESETS] + [_model_name(VARIANT_PRESET) + "_int8"]
    with LocalTriton(repo, models=models, workdir=work / "triton") as server:
        yield {"repo": repo, "server": server, "scorers": scorers, "outputs": outputs}


def test_job_wrote_versioned_repository(served):
    repo = served["repo"]
    for preset, version in PRESETS.items():
        scorer = served["scorers"][preset]
        for suffix in ("", "_ort", "_int8", "_int8_ort", "_fp16", "_fp16_ort"):
            name = _model_name(preset) + suffix
            config = (repo / name / "config.pbtxt").read_text()
            assert (repo / name / str(version) / "model.onnx").is_file()
            assert scorer.version in config and scorer.meta["fingerprint"] in config
            assert "dynamic_batching" in config and "max_batch_size: 8" in config
            assert "data_type: TYPE_UINT8" in config  # the frames as the decoder ships them
    printed = served["outputs"][FROM_S3]
    assert f"wrote {_model_name(FROM_S3)}_ort" in printed and "--load-model=patchcore-tiny_ort" in printed


def _assert_same_results(got: list, want: list, cal, source: str) -> None:
    assert len(got) == len(want), source
    for a, b in zip(got, want):
        assert abs(a.raw_score - b.raw_score) <= TOLERANCE and abs(a.score - b.score) <= TOLERANCE, source
        np.testing.assert_allclose(a.raw_map, b.raw_map, atol=TOLERANCE, rtol=0, err_msg=source)
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=TOLERANCE, rtol=0, err_msg=source)
        # Masks agree except, at most, on pixels within the tolerance of the threshold.
        differ = a.mask != b.mask
        near = np.abs(b.anomaly_map - cal.effective_pixel_threshold) <= TOLERANCE
        assert not (differ & ~near).any(), f"{source}: masks differ away from the threshold"
        assert abs(a.score - cal.image_threshold) <= TOLERANCE or a.label == b.label, source
        assert (a.category_scores is None) == (b.category_scores is None), source
        if b.category_scores is not None:  # a head with categories (SD-MAD): the same per-category scores
            assert a.category_scores.keys() == b.category_scores.keys(), source
            for c, v in b.category_scores.items():
                assert abs(a.category_scores[c] - v) <= TOLERANCE, f"{source}: category {c}"


class _TorchOnFrames:
    """The torch network fed what the scoring job feeds it: frames rounded to uint8, then ``value / 255``."""

    input_dtype = "uint8"
    max_batch = None
    in_flight = 0

    def __init__(self, network):
        self.network = network

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        return self.network(scoring.as_float(pixels))


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_backend_and_call_shape_scores_alike(served, preset, batch):
    """torch / onnxruntime / Triton HTTP / Triton gRPC, batch and single-image calls: same results."""
    base, server = served["scorers"][preset], served["server"]
    name = _model_name(preset)
    rng = np.random.default_rng(batch)
    # Real-looking inputs: images of other sizes, prepared like the scoring job does.
    images = [rng.random((40 + 7 * i, 50), dtype=np.float32) for i in range(batch + 2)]
    onnx_path = served["repo"] / name / str(PRESETS[preset]) / "model.onnx"
    # Requests of at most 2 images with one in flight: the Scorer chunks and pipelines them.
    # gRPC also with 3 requests in flight at once (its client is shared by the Scorer's threads).
    tritons = [
        TritonNetwork(TritonClient(url, name, protocol=protocol, timeout_s=60), max_batch=2, in_flight=n)
        for protocol, url, n in (
            ("http", server.http_url, 1),
            ("grpc", server.grpc_url, 1),
            ("grpc", server.grpc_url, 3),
        )
    ]
    backends = {
        "onnxruntime": OnnxNetwork(onnx_path, threads=1),
        "triton-http": tritons[0],
        "triton-grpc": tritons[1],
        "triton-grpc-3-in-flight": tritons[2],
    }
    reference = scoring.Scorer(base.model, base.head, base.calibration, base.meta, network=_TorchOnFrames(base.network))
    want = reference.score_images(images, batch_size=batch)
    try:
        for source, network in {"torch": reference.network, **backends}.items():
            scorer = scoring.Scorer(base.model, base.head, base.calibration, base.meta, network=network)
            pixels = np.stack([scoring.prepare(im, scorer.input_size) for im in images])
            raw_want, raw_got = reference.forward(pixels), scorer.forward(pixels)
            for key in scoring.OUTPUT_NAMES:
                assert raw_got[key].shape == raw_want[key].shape, f"{source} {key}"
                np.testing.assert_allclose(
                    raw_got[key], raw_want[key], atol=TOLERANCE, rtol=0, err_msg=f"{source} {key}"
                )
            _assert_same_results(
                scorer.score_images(images, batch_size=batch), want, base.calibration, f"{source} batch"
            )
            single = [scorer.score_images([im])[0] for im in images]
            _assert_same_results(single, want, base.calibration, f"{source} single")
    finally:
        for network in tritons:
            network.close()


def test_served_model_matches_its_artifact_only(served):
    server, scorers = served["server"], served["scorers"]
    http = httpclient.InferenceServerClient(server.http_url)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        for preset, scorer in scorers.items():
            check_served_model(http.get_model_config(_model_name(preset)), scorer)
            check_served_model(grpc.get_model_config(_model_name(preset), as_json=True), scorer)
        with pytest.raises(ModelMismatchError, match="re-export"):
            check_served_model(http.get_model_config(_model_name("fusion-small")), scorers["fusion-large"])
    finally:
        http.close()
        grpc.close()


def test_smoke_test_runs(tmp_path):
    summary = main(ExportConfig(smoke_test=True, output=str(tmp_path / "repo")))
    assert max(summary["max_abs_diff"].values()) <= TOLERANCE
    assert (tmp_path / "repo" / "fusion-small-tiny" / "1" / "model.py").is_file()


def test_uint8_in_only_the_heads_outputs_back_and_batch_statistics(served):
    """Triton takes uint8 frames, returns only the outputs asked for, and reports the batches it formed."""
    server, scorer = served["server"], served["scorers"][VARIANT_PRESET]
    name = _model_name(VARIANT_PRESET)
    s = scorer.input_size
    frames = np.random.default_rng(7).integers(0, 256, (5, 3, s, s), dtype=np.uint8)
    want = scorer.forward(frames)  # torch on value / 255
    with TritonClient(server.grpc_url, name, protocol="grpc", timeout_s=60) as client:
        assert client.input_dtypes == {scoring.INPUT_NAME: "UINT8"}
        before = client.statistics()
        network = TritonNetwork(client, max_batch=2, in_flight=3, outputs=("patch_embeddings", "anomaly_map"))
        got = scoring.Scorer(scorer.model, scorer.head, scorer.calibration, scorer.meta, network=network).raw(frames)
        after = client.statistics()
    for a, b in zip(got, scorer.head(want)):
        np.testing.assert_allclose(a, b, atol=TOLERANCE, rtol=0)
    assert sorted(network(frames[:2])) == ["anomaly_map", "patch_embeddings"]
    images = after["inference_count"] - before["inference_count"]
    batches = after["execution_count"] - before["execution_count"]
    assert images == len(frames) and 1 <= batches <= 3  # requests of at most 2: 3 requests, maybe merged


def test_served_int8_variant_scores_like_its_graph(served):
    """The int8 variant is served the same way as fp32 and answers exactly as its ONNX file does in-process."""
    server, scorer = served["server"], served["scorers"][VARIANT_PRESET]
    name = _model_name(VARIANT_PRESET) + "_int8"
    version = PRESETS[VARIANT_PRESET]
    onnx_path = served["repo"] / name / str(version) / "model.onnx"
    assert engine.read_manifest(engine.cache_dir(scorer))["files"]["int8"]["file"] == "model.int8.onnx"
    s = scorer.input_size
    frames = np.random.default_rng(8).integers(0, 256, (3, 3, s, s), dtype=np.uint8)
    with TritonClient(server.http_url, name, timeout_s=60) as client:
        http = httpclient.InferenceServerClient(server.http_url)
        try:
            check_served_model(http.get_model_config(name), scorer)
        finally:
            http.close()
        got = TritonNetwork(client, max_batch=4)(frames)
    want = OnnxNetwork(onnx_path, threads=1)(frames)
    for key in scoring.OUTPUT_NAMES:
        np.testing.assert_allclose(got[key], want[key], atol=TOLERANCE, rtol=0, err_msg=key)
    fp32 = scorer.forward(frames)["patch_embeddings"]
    assert not np.array_equal(want["patch_embeddings"], fp32)  # a real int8 graph, not the fp32 one again
