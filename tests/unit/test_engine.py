"""Engine choice, the per-artifact ONNX cache, and quantised variants gated by their measured AUROC."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from adcore import engine, storage
from adcore import export as onnx_export
from adcore.artifact import ArtifactError
from adcore.data.demo import make_demo_dataset
from adcore.evaluate import measure_variants
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


def test_choice_is_logged():
    """A record of adcore.engine itself (a handler on that logger: whatever other tests did to the root)."""
    import logging

    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("adcore.engine")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        engine.choose_engine("auto", "cpu")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert any("network engine: onnx" in r.getMessage() for r in records)


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
    # A foreign graph under this artifact's name that the manifest does not list (a half-finished
    # copy) is not used: exported again.
    manifest = engine.read_manifest(path.parent)
    (path.parent / engine.CACHE_MANIFEST).unlink()
    path.write_bytes(other_path.read_bytes())
    again = engine.load_scorer(artifact, use_gpu=False, threads=1)
    assert read_metadata(again.network.path)["fingerprint"] == scorer.meta["fingerprint"]
    assert engine.read_manifest(path.parent)["files"]["fp32"]["sha256"] == manifest["files"]["fp32"]["sha256"]
    # The same file swapped in behind the manifest's back is refused.
    path.write_bytes(other_path.read_bytes())
    with pytest.raises(ArtifactError, match="model.onnx: size .* refused"):
        engine.load_scorer(artifact, use_gpu=False, threads=1)
    (path.parent / engine.CACHE_MANIFEST).unlink()
    engine.ensure_onnx(scorer)


def _flip_byte(path: Path) -> bytes:
    """Flip one bit in the middle of ``path`` (same size); returns the original bytes."""
    data = path.read_bytes()
    i = len(data) // 2
    path.write_bytes(data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :])
    return data


def _graph_files(manifest: dict) -> dict[str, str]:
    """file name -> variant, for every graph and external-weight file the manifest lists."""
    files = {}
    for variant, entry in manifest["files"].items():
        files[entry["file"]] = variant
        files |= dict.fromkeys(entry.get("external", {}), variant)
    return files


@pytest.mark.slow
@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-weights"])
def test_every_cached_graph_file_is_checked(tmp_path, monkeypatch, external):
    """fp32, int8, fp16 and their external weights: a byte changed in any of them is refused."""
    if external:  # weights in side files, as for paper-size models over protobuf's 2 GiB
        monkeypatch.setattr(onnx_export, "_INLINE_WEIGHTS_LIMIT", 0)
    uri = tiny_artifact(tmp_path / "pc", "patchcore", version=1)
    scorer = engine.load_scorer(uri, engine="torch", use_gpu=False)
    paths = {v: engine.ensure_onnx(scorer, v) for v in onnx_export.VARIANTS}
    folder = paths["fp32"].parent
    files = _graph_files(engine.read_manifest(folder))
    assert set(files.values()) == set(onnx_export.VARIANTS)
    assert any(name.endswith(".data") for name in files) == external
    for name, variant in files.items():
        original = _flip_byte(folder / name)
        with pytest.raises(ArtifactError, match=f"{name}: sha256 differs .*refused") as err:
            engine.ensure_onnx(scorer, variant)
        assert "\n" not in str(err.value)
        (folder / name).write_bytes(original)
        assert engine.ensure_onnx(scorer, variant) == paths[variant]
    # The scoring path (load_scorer on CPU: onnxruntime) refuses it the same way.
    _flip_byte(folder / "model.onnx")
    with pytest.raises(ArtifactError, match="sha256 differs"):
        engine.load_scorer(uri, use_gpu=False, threads=1)


@pytest.mark.parametrize("tampered", ["model.onnx", "model.onnx.data"])
def test_graphs_from_s3_are_checked(s3_server, tmp_path, monkeypatch, tampered):
    """The graphs jobs/export.py uploads beside an S3 artifact arrive whole (external weights too) and unaltered."""
    monkeypatch.setattr(onnx_export, "_INLINE_WEIGHTS_LIMIT", 0)
    monkeypatch.setenv("ADCORE_CACHE", str(tmp_path / "node1"))
    bucket = s3_server.make_bucket("engine-cache")
    uri = tiny_scorer("patchcore").save(storage.join(bucket, f"pc-{tampered}"), model_name="pc", version=1)
    exporter = engine.load_scorer(uri, engine="torch", use_gpu=False)
    engine.ensure_onnx(exporter)
    engine.upload_cache(exporter, uri)
    remote = storage.join(uri, engine.CACHE_FOLDER, engine.cache_key(exporter))
    assert set(_graph_files(json.loads(storage.read_bytes(storage.join(remote, engine.CACHE_MANIFEST))))) == {
        "model.onnx",
        "model.onnx.data",
    }

    def fresh_node(name: str):
        monkeypatch.setenv("ADCORE_CACHE", str(tmp_path / name))
        return engine.load_scorer(uri, engine="torch", use_gpu=False)

    node = fresh_node("node2")  # downloads, never exports
    monkeypatch.setattr(engine, "export_onnx", lambda *a: pytest.fail("exported instead of downloaded"))
    path = engine.ensure_onnx(node)
    assert path.parent.is_relative_to(tmp_path / "node2") and (path.parent / "model.onnx.data").is_file()
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, node.input_size, node.input_size), dtype=np.uint8)
    want = OnnxNetwork(engine.ensure_onnx(exporter))(pixels)
    for key, value in OnnxNetwork(path)(pixels).items():
        np.testing.assert_array_equal(value, want[key])

    data = storage.read_bytes(storage.join(remote, tampered))
    i = len(data) // 2
    storage.write_bytes(storage.join(remote, tampered), data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :])
    node = fresh_node("node3")
    with pytest.raises(ArtifactError, match=f"ONNX graph s3://.*/{tampered}: sha256 differs .*refused"):
        engine.ensure_onnx(node)
    assert not list(engine.cache_dir(node).glob("model.onnx*"))  # nothing altered reached the cache


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

    record = measure_variants(scorer, demo, ("int8",))
    manifest = engine.read_manifest(scorer.network.path.parent)
    assert manifest["measured"] == record
    assert record["split"] == "valid" and record["n_images"] == 12 and record["tolerance"] == 0.005
    fp32, measured = record["variants"]["fp32"], record["variants"]["int8"]
    assert fp32["usable"] and fp32["max_auroc_delta"] == 0
    delta = max(abs(measured[k] - fp32[k]) for k in ("image_auroc", "pixel_auroc"))
    assert measured["max_auroc_delta"] == pytest.approx(delta, abs=1e-6)
    # Offered only when accurate and measured faster than fp32 on the device it was timed on.
    assert record["device"] == "cpu" and fp32["images_per_s"] > 0 and measured["images_per_s"] > 0
    ratio = measured["images_per_s"] / fp32["images_per_s"]
    assert measured["speed_vs_fp32"] == pytest.approx(ratio, abs=2e-3)
    assert measured["accurate"] == (delta <= engine.VARIANT_TOLERANCE + 1e-6)
    assert measured["usable"] == (measured["accurate"] and ratio > 1)

    # The scoring job's load obeys the record: usable -> loads; lost accuracy or slower -> refused.
    folder = scorer.network.path.parent
    verdicts = {
        "usable": {"accurate": True, "faster": True, "usable": True},
        "lost accuracy": {"accurate": False, "faster": True, "usable": False},
        "the speed of fp32": {"accurate": True, "faster": False, "usable": False},
    }
    for why, verdict in verdicts.items():
        manifest["measured"]["variants"]["int8"].update(verdict)
        (folder / engine.CACHE_MANIFEST).write_text(json.dumps(manifest))
        if verdict["usable"]:
            assert engine.load_scorer(artifact, variant="int8", use_gpu=False, threads=1).network.path == int8.path
        else:
            with pytest.raises(engine.VariantNotUsableError, match=why):
                engine.load_scorer(artifact, variant="int8", use_gpu=False, threads=1)
    # Timed on another device: its speed says nothing here, accuracy alone decides.
    manifest["measured"]["device"] = "cuda"
    (folder / engine.CACHE_MANIFEST).write_text(json.dumps(manifest))
    assert engine.load_scorer(artifact, variant="int8", use_gpu=False, threads=1).network.path == int8.path


@pytest.mark.slow
def test_engines_agree_on_a_real_artifact(demo, tmp_path):
    """The real ``patchcore`` preset (MobileNetV2 weights) trained on demo images: torch and onnxruntime
    give the same scores and the same image AUROC from the same float images (both round them to
    uint8 first, as the scoring job ships frames)."""
    from adcore import metrics
    from adcore.training import TrainConfig, train
    from adcore.training.loop import load_split

    train(demo, TrainConfig(preset="patchcore", seed=0), output=str(tmp_path / "real"))
    test = load_split(demo, "valid", None)
    torch_scorer = load_torch(str(tmp_path / "real"), use_gpu=False)
    onnx_scorer = engine.load_scorer(str(tmp_path / "real"), engine="onnx", use_gpu=False, threads=1)
    assert isinstance(onnx_scorer.network, OnnxNetwork) and onnx_scorer.model.grid > 8  # not a tiny model
    want = np.array([r.raw_score for r in torch_scorer.score_images(test["images"])])
    got = np.array([r.raw_score for r in onnx_scorer.score_images(test["images"])])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    labels = np.asarray(test["labels"])
    assert metrics.image_auroc(labels, got) == pytest.approx(metrics.image_auroc(labels, want), abs=1e-9)
