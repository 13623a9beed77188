"""Engine choice, the per-artifact ONNX cache, and quantised variants gated by their measured AUROC."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adcore import engine
from adcore.data.demo import make_demo_dataset
from adcore.export import OnnxNetwork, read_metadata
from adcore.scorer import TorchNetwork
from adcore.scorer import load as load_torch
from adcore.testing import tiny_artifact, tiny_scorer

pytestmark = pytest.mark.timeout(300)

TOLERANCE = 1e-4  # fp32 graph vs torch: float rounding only


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return tiny_artifact(tmp_path_factory.mktemp("engine") / "pc", "patchcore", version=2)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return str(make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=4, n_valid=12, n_test=2, size=64, seed=5))


def test_choose_engine():
    assert engine.choose_engine("auto", "cpu") == "onnx"
    assert engine.choose_engine("auto", "cuda:0") == "torch"
    assert engine.choose_engine("torch", "cpu") == "torch"  # --engine overrides
    assert engine.choose_engine("onnx", "cuda") == "onnx"
    assert engine.choose_engine("auto", "cuda", variant="fp16") == "onnx"  # a variant is an ONNX graph
    with pytest.raises(ValueError, match="engine must be one of"):
        engine.choose_engine("tensorrt", "cpu")
    with pytest.raises(ValueError, match="variant must be one of"):
        engine.choose_engine("auto", "cpu", variant="int4")
    with pytest.raises(ValueError, match="use engine 'onnx'"):
        engine.choose_engine("torch", "cpu", variant="int8")


def test_choice_is_logged(caplog):
    with caplog.at_level("INFO", logger="adcore.engine"):
        engine.choose_engine("auto", "cpu")
    assert "network engine: onnx" in caplog.text


@pytest.mark.slow
def test_cpu_picks_onnx_and_the_export_is_cached_once(artifact):
    first = engine.load_scorer(artifact, use_gpu=False, threads=1)
    assert isinstance(first.network, OnnxNetwork) and first.network.input_dtype == "uint8"
    path = first.network.path
    assert path.parent.parent == first.artifact_path / engine.CACHE_FOLDER  # inside the artifact
    assert read_metadata(path)["fingerprint"] == first.meta["fingerprint"]
    written = path.stat().st_mtime_ns
    # Another replica (a fresh load of the same artifact) reuses the file instead of exporting again.
    second = engine.load_scorer(artifact, use_gpu=False, threads=1)
    assert second.network.path == path and path.stat().st_mtime_ns == written
    manifest = engine.read_manifest(path.parent)
    assert manifest["files"]["fp32"]["file"] == "model.onnx" and manifest["fingerprint"] == first.meta["fingerprint"]
    # Same outputs as torch on the decoder's uint8 frames.
    torch_scorer = load_torch(artifact, use_gpu=False)
    assert isinstance(torch_scorer.network, TorchNetwork)
    s = torch_scorer.input_size
    pixels = np.random.default_rng(0).integers(0, 256, (3, 3, s, s), dtype=np.uint8)
    want, got = torch_scorer.raw(pixels), second.raw(pixels)
    for a, b in zip(want, got):
        np.testing.assert_allclose(a, b, atol=TOLERANCE, rtol=0)


@pytest.mark.slow
def test_a_stale_cached_graph_is_exported_again(artifact, tmp_path):
    scorer = engine.load_scorer(artifact, use_gpu=False, threads=1)
    path = scorer.network.path
    other = tiny_scorer("patchcore", seed=1).save(str(tmp_path / "other"), model_name="pc-other")  # other weights
    other_path = engine.load_scorer(other, use_gpu=False, threads=1).network.path
    assert other_path.parent.name != path.parent.name  # keyed by fingerprint
    # A foreign graph under this artifact's name (a copied folder, a half-finished copy) is not used.
    path.write_bytes(other_path.read_bytes())
    again = engine.load_scorer(artifact, use_gpu=False, threads=1)
    assert read_metadata(again.network.path)["fingerprint"] == scorer.meta["fingerprint"]


def test_torch_engine_and_unmeasured_variant(artifact):
    assert isinstance(engine.load_scorer(artifact, engine="torch", use_gpu=False).network, TorchNetwork)
    scorer = load_torch(artifact, use_gpu=False)
    with pytest.raises(engine.VariantNotUsableError, match="never measured"):
        engine.load_network(scorer, "auto", "int8", device="cpu")


@pytest.mark.slow
def test_int8_variant_measured_recorded_and_gated(artifact, demo):
    scorer = engine.load_scorer(artifact, use_gpu=False, threads=1)
    int8 = engine.load_network(scorer, "onnx", "int8", threads=1, device="cpu", require_usable=False)
    assert int8.path.name == "model.int8.onnx" and int8.path.parent == scorer.network.path.parent
    assert int8.path.stat().st_size < scorer.network.path.stat().st_size  # int8 weights
    s = scorer.input_size
    pixels = np.random.default_rng(1).integers(0, 256, (4, 3, s, s), dtype=np.uint8)
    fp32_scores = scorer.raw(pixels)[0]
    int8_scores = type(scorer)(scorer.model, scorer.head, scorer.calibration, scorer.meta, network=int8).raw(pixels)[0]
    np.testing.assert_allclose(int8_scores, fp32_scores, rtol=0.05)  # close, not equal: weights are int8

    record = engine.measure_variants(scorer, demo, ("int8",))
    manifest = engine.read_manifest(scorer.network.path.parent)
    assert manifest["measured"] == record
    assert record["split"] == "valid" and record["n_images"] == 12 and record["tolerance"] == 0.005
    fp32, measured = record["variants"]["fp32"], record["variants"]["int8"]
    assert fp32["usable"] and fp32["max_auroc_delta"] == 0
    delta = max(abs(measured[k] - fp32[k]) for k in ("image_auroc", "pixel_auroc"))
    assert measured["max_auroc_delta"] == pytest.approx(delta, abs=1e-6)
    assert measured["usable"] == (delta <= engine.VARIANT_TOLERANCE + 1e-6)

    # The scoring job's load obeys the record: usable -> loads; a failed measurement -> refused.
    folder = scorer.network.path.parent
    for usable in (True, False):
        manifest["measured"]["variants"]["int8"]["usable"] = usable
        (folder / engine.CACHE_MANIFEST).write_text(json.dumps(manifest))
        if usable:
            assert engine.load_scorer(artifact, variant="int8", use_gpu=False, threads=1).network.path == int8.path
        else:
            with pytest.raises(engine.VariantNotUsableError, match="lost accuracy"):
                engine.load_scorer(artifact, variant="int8", use_gpu=False, threads=1)
