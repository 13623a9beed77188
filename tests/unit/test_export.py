"""ONNX export of every registered preset (tiny variants): the graph runs in onnxruntime like torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from adcore import engine  # noqa: E402
from adcore import export as onnx_export  # noqa: E402
from adcore.artifact import ArtifactError  # noqa: E402
from adcore.export import OnnxNetwork, export_onnx, read_metadata  # noqa: E402
from adcore.models import list_models  # noqa: E402
from adcore.scorer import INPUT_NAME, OUTPUT_NAMES, to_uint8  # noqa: E402
from adcore.serving import LocalTriton, RepositoryError, TensorSpec, verify_repository, write_model_repository  # noqa: E402
from adcore.serving.artifacts import (  # noqa: E402
    ModelMismatchError,
    check_served_model,
    tensor_specs,
    write_triton_repository,
)
from adcore.serving.network import from_triton  # noqa: E402
from adcore.serving.repository import PYTHON_MODEL_SOURCE  # noqa: E402
from adcore.testing import tiny_scorer  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]  # every test exports a graph

TOLERANCE = 1e-4  # float rounding between torch and onnxruntime; measured below 1e-5
ARTIFACT_VERSION = 4
# A parameter value that needs escaping in text format: quotes, backslashes, a newline.
TRICKY_VALUE = 'C:\\models\\"v2"\nend\\'


def _read_config(model_dir: Path) -> model_config_pb2.ModelConfig:
    """config.pbtxt parsed the way Triton parses it: protobuf text format into ModelConfig."""
    return text_format.Parse((model_dir / "config.pbtxt").read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


def _parameters(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Lazily export each tiny preset once per module: name -> (scorer, onnx path)."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            work = tmp_path_factory.mktemp(name)
            scorer = tiny_scorer(name)
            scorer.save(str(work / "artifact"), model_name=f"{name}-tiny", version=ARTIFACT_VERSION)
            cache[name] = (scorer, export_onnx(scorer, work / "model.onnx"))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list_models())
def test_export_matches_torch_at_any_batch(exported, name):
    scorer, path = exported(name)
    net = OnnxNetwork(path, threads=1)
    assert "CPUExecutionProvider" in net.providers
    rng = np.random.default_rng(1)
    g, e, s = scorer.model.grid, scorer.model.embedding_dim, scorer.input_size
    assert net.input_dtype == "uint8"
    for batch in (1, 3, 5):  # the example batch at export was 2: none of these was traced
        # uint8 frames as the decoder ships them: torch sees value / 255, the graph casts them the same way.
        pixels = rng.integers(0, 256, (batch, 3, s, s), dtype=np.uint8)
        want, got = scorer.forward(pixels), net(pixels)
        assert list(got) == list(OUTPUT_NAMES)
        shapes = {"score": (batch,), "anomaly_map": (batch, g, g), "patch_embeddings": (batch, g * g, e)}
        for key in OUTPUT_NAMES:
            assert got[key].shape == shapes[key] and got[key].dtype == np.float32
            np.testing.assert_allclose(got[key], want[key], atol=TOLERANCE, rtol=0, err_msg=f"{name} {key} b={batch}")
    # The FAISS head sees the same thing whichever network produced it.
    pixels = rng.integers(0, 256, (2, 3, s, s), dtype=np.uint8)
    for a, b in zip(scorer.head(scorer.forward(pixels)), scorer.head(net(pixels))):
        np.testing.assert_allclose(a, b, atol=TOLERANCE, rtol=0)
    # Float pixels are rounded to uint8 first (to_uint8), exactly as the decoder does.
    floats = rng.random((2, 3, s, s), dtype=np.float32)
    for key, value in net(floats).items():
        np.testing.assert_array_equal(value, net(to_uint8(floats))[key], err_msg=key)


def test_graph_takes_uint8_and_returns_only_what_is_asked(exported):
    scorer, path = exported("patchcore")
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert tensor_specs(scorer)[0][0].dtype == "UINT8"
    net = OnnxNetwork(path, threads=1, outputs=("patch_embeddings", "anomaly_map"))
    s = scorer.input_size
    got = net(np.zeros((2, 3, s, s), np.uint8))
    assert sorted(got) == ["anomaly_map", "patch_embeddings"]
    with pytest.raises(ValueError, match="choose among"):
        OnnxNetwork(path, outputs=("logits",))


@pytest.mark.parametrize("name", list_models())
def test_graph_io_and_metadata(exported, name):
    scorer, path = exported(name)
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == [INPUT_NAME]
    assert [o.name for o in proto.graph.output] == list(OUTPUT_NAMES)
    for value in [*proto.graph.input, *proto.graph.output]:
        batch_dim = value.type.tensor_type.shape.dim[0]
        assert batch_dim.dim_param and not batch_dim.HasField("dim_value"), f"{value.name}: batch dim is fixed"
    meta = read_metadata(path)
    assert meta["model_version"] == scorer.version and meta["fingerprint"] == scorer.meta["fingerprint"]
    assert meta["version"] == str(ARTIFACT_VERSION)
    assert OnnxNetwork(path).metadata["model_version"] == scorer.version


def test_triton_repository_files(exported, tmp_path):
    scorer, path = exported("fusion-small")
    dirs = write_triton_repository(scorer, path, tmp_path / "repo", max_batch_size=8)
    name = "fusion-small-tiny"
    assert sorted(dirs) == [name, name + "_ort"]
    identity = {
        "artifact_model_name": name,
        "artifact_version": str(ARTIFACT_VERSION),
        "model_version": scorer.version,
        "fingerprint": scorer.meta["fingerprint"],
    }
    for model_dir in dirs.values():
        config = _read_config(model_dir)
        assert (model_dir / str(ARTIFACT_VERSION) / "model.onnx").is_file()
        assert _parameters(config).items() >= identity.items()
        outputs = {o.name: o for o in config.output}
        assert list(outputs["score"].dims) == [1] and outputs["score"].HasField("reshape")
        assert list(outputs["score"].reshape.shape) == []
        assert not outputs["anomaly_map"].HasField("reshape")
        assert config.max_batch_size == 8 and list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert "reshape: { shape: [ ] }" in (dirs[name] / "config.pbtxt").read_text()
    assert _read_config(dirs[name + "_ort"]).backend == "onnxruntime"
    assert set(_parameters(_read_config(dirs[name + "_ort"]))) == set(identity) | {"variant"}
    assert _parameters(_read_config(dirs[name]))["variant"] == "fp32"
    assert _parameters(_read_config(dirs[name]))["onnx_filename"] == "model.onnx"  # the Python model keeps its own


def test_repository_parameters_survive_escaping(exported, tmp_path):
    """Quotes, backslashes and newlines in keys and values read back unchanged."""
    scorer, path = exported("fusion-small")
    inputs, outputs = tensor_specs(scorer)
    params = {"note": TRICKY_VALUE, 'odd "key" \\': "x"}
    dirs = write_model_repository(path, tmp_path / "repo", "m", 1, inputs, outputs, parameters=params)
    for model_dir in dirs.values():
        assert _parameters(_read_config(model_dir)).items() >= params.items()
    with pytest.raises(ValueError, match="onnx_filename"):
        write_model_repository(path, tmp_path / "repo", "m", 1, inputs, outputs, parameters={"onnx_filename": "x"})


def test_tensor_spec_shapes():
    assert "reshape: { shape: [ ] }" in TensorSpec("s", "FP32", [1], reshape=[]).to_pbtxt()
    assert "reshape" not in TensorSpec("m", "FP32", [2, 2]).to_pbtxt()
    with pytest.raises(ValueError, match="empty dims"):
        TensorSpec("s", "FP32", [])
    with pytest.raises(ValueError, match="size of dims"):
        TensorSpec("m", "FP32", [4], reshape=[3])
    assert TensorSpec("m", "FP32", [4], reshape=[2, 2]).model_dims == [2, 2]


def test_triton_repository_needs_a_saved_artifact(exported, tmp_path):
    scorer, path = exported("fusion-small")
    unsaved = type(scorer)(scorer.model, scorer.head, scorer.calibration)
    with pytest.raises(ValueError, match="save it as an artifact"):
        write_triton_repository(unsaved, path, tmp_path / "repo")


def test_check_served_model(exported):
    scorer, _ = exported("fusion-small")
    params = {"model_version": scorer.version, "fingerprint": scorer.meta["fingerprint"]}
    config = {"name": "m", "parameters": {k: {"string_value": v} for k, v in params.items()}}
    check_served_model(config, scorer)
    check_served_model({"config": config}, scorer)  # gRPC's as_json wraps it
    config["parameters"]["fingerprint"] = {"string_value": "0" * 64}
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        check_served_model(config, scorer)
    with pytest.raises(ModelMismatchError, match="model_version"):
        check_served_model({"name": "m"}, scorer)


def test_from_triton_restores_score_shape():
    out = from_triton({"score": np.zeros((3, 1), np.float32), "anomaly_map": np.zeros((3, 2, 2), np.float32)})
    assert out["score"].shape == (3,) and out["anomaly_map"].shape == (3, 2, 2)


def test_onnx_network_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.onnx"):
        OnnxNetwork(tmp_path / "nowhere.onnx")
    x = onnx.helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT, ["b", 3])
    y = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["b", 3])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", [INPUT_NAME], ["logits"])], "g", [x], [y])
    path = tmp_path / "other.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ValueError, match="outputs \\['logits'\\]"):
        OnnxNetwork(path)


def test_external_weights_travel_with_the_repository(tmp_path):
    """Paper-size fusion-large (~2.4 GB) exceeds protobuf's limit: its weights go to a side file."""
    scorer = tiny_scorer("patchcore")
    scorer.save(str(tmp_path / "artifact"), model_name="pc", version=2)
    path = export_onnx(scorer, tmp_path / "onnx" / "model.onnx", external_data=True)
    side_files = sorted(p.name for p in path.parent.iterdir() if p != path)
    assert side_files and path.stat().st_size < sum(p.stat().st_size for p in path.parent.iterdir() if p != path)
    dirs = write_triton_repository(scorer, path, tmp_path / "repo")
    for model_dir in dirs.values():
        assert sorted(p.name for p in (model_dir / "2").iterdir() if p.suffix != ".py") == sorted(
            ["model.onnx", *side_files]
        )
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, scorer.input_size, scorer.input_size), dtype=np.uint8)
    got = OnnxNetwork(dirs["pc"] / "2" / "model.onnx")(pixels)
    want = scorer.forward(pixels)
    np.testing.assert_allclose(got["patch_embeddings"], want["patch_embeddings"], atol=TOLERANCE, rtol=0)


def _flip_byte(path: Path) -> None:
    data = path.read_bytes()
    i = len(data) // 2
    path.write_bytes(data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :])


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-weights"])
def test_triton_repository_files_are_checked(tmp_path, monkeypatch, external):
    """Built from the engine cache's checked graph; every file of each model is then checked before serving."""
    if external:
        monkeypatch.setattr(onnx_export, "_INLINE_WEIGHTS_LIMIT", 0)
    uri = tiny_scorer("patchcore").save(str(tmp_path / "artifact"), model_name="pc", version=2)
    scorer = engine.load_scorer(uri, engine="torch", use_gpu=False)
    graph = engine.ensure_onnx(scorer)
    repo = tmp_path / "repo"
    # A cached graph altered before the build: refused, nothing written.
    original = graph.read_bytes()
    _flip_byte(graph)
    with pytest.raises(ArtifactError, match="model.onnx: sha256 differs .*refused"):
        write_triton_repository(scorer, graph, repo)
    assert not repo.exists()
    graph.write_bytes(original)

    dirs = write_triton_repository(scorer, graph, repo)
    verify_repository(repo)
    for model_dir in dirs.values():
        files = json.loads((model_dir / "manifest.json").read_text())["files"]
        assert {"config.pbtxt", "2/model.onnx"} <= set(files)
        assert any(name.endswith(".data") for name in files) == external
        for name in files:
            kept = (model_dir / name).read_bytes()
            _flip_byte(model_dir / name)
            with pytest.raises(RepositoryError, match=f"{model_dir.name}/{name}: sha256 differs .*refused") as err:
                verify_repository(repo, [model_dir.name])
            assert "\n" not in str(err.value)
            with pytest.raises(RepositoryError, match="sha256 differs"):  # checked before a server starts
                LocalTriton(repo, models=[model_dir.name]).start()
            (model_dir / name).write_bytes(kept)  # in place: the graph is hard-linked to the cache's
        verify_repository(repo, [model_dir.name])
    # A file nobody listed (code beside model.py) is refused too.
    (dirs["pc"] / "2" / "extra.py").write_text("import os\n")
    with pytest.raises(RepositoryError, match="extra.py.*not in its manifest.json"):
        verify_repository(repo)
    # The Python-backend model checks its graph itself when Triton loads it (NVIDIA's container too).
    check_files = _python_model_function("check_files")
    (dirs["pc"] / "2" / "extra.py").unlink()
    check_files(str(dirs["pc"]), "2", "model.onnx")
    (dirs["pc"] / "2" / "model.onnx").unlink()
    (dirs["pc"] / "2" / "model.onnx").write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(ValueError, match="model.onnx: sha256 differs"):
        check_files(str(dirs["pc"]), "2", "model.onnx")


def _python_model_function(name: str):
    """A function of the Python-backend model.py, run here (the module itself needs Triton's stub)."""
    import ast
    import hashlib

    tree = ast.parse(PYTHON_MODEL_SOURCE)
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    scope = {"hashlib": hashlib, "json": json, "Path": Path}
    exec(compile(ast.Module(body=[node], type_ignores=[]), "model.py", "exec"), scope)  # noqa: S102
    return scope[name]
