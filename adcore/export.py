"""Export a scorer's network to ONNX and run it in-process with onnxruntime.

Only the network crosses into ONNX (and from there into Triton): uint8 pixels
``[B, 3, S, S]`` (what the scoring job's decoder ships; the graph casts them to
``value / 255`` itself) -> ``score``, ``anomaly_map``, ``patch_embeddings``. The FAISS head,
calibration and postprocessing stay with the artifact, so the scoring job
loads the artifact for them and swaps :class:`OnnxNetwork` (or a Triton
client) in for ``scorer.forward``::

    path = export_onnx(scorer, "model.onnx")
    net = OnnxNetwork(path)
    raw_score, raw_map = scorer.head(net(pixels))

The artifact's identity (``model_version``, ``fingerprint``) is written into
the ONNX metadata so a file found on its own still names its artifact, and by
:func:`adcore.serving.artifacts.write_triton_repository` into each Triton ``config.pbtxt``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import typing
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from adcore.scorer import INPUT_NAME, OUTPUT_NAMES, as_float, as_uint8

# Example batch for tracing: not 1, which torch.export would specialise as a constant.
_TRACE_BATCH = 2
# Largest batch the exported graph promises to handle (Triton's max_batch_size is far below).
MAX_EXPORT_BATCH = 4096
# protobuf refuses single messages over 2 GiB; above this the weights go to a side file
# (fusion-large at paper size, CLIP-L + BEiT-L, is about 2.4 GB of float32).
_INLINE_WEIGHTS_LIMIT = 1_800_000_000
# Artifact fields copied into the ONNX metadata_props.
METADATA_KEYS = ("model_name", "model_version", "fingerprint", "version")
# Graph signature, in the metadata as ``adcore_onnx_format``: 2 = uint8 input (1, float input in [0, 1], had none).
ONNX_FORMAT = "2"
FORMAT_KEY = "adcore_onnx_format"


class _NetworkOutputs(nn.Module):
    """``scorer.model`` seen as uint8 pixels -> the three named outputs (a tuple, in OUTPUT_NAMES order).

    The cast is the one :func:`adcore.scorer.as_float` does (``float32(v) * float32(1/255)``), so
    the graph and the torch model see bit-identical network inputs from the same uint8 frame.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = pixel_values.to(torch.float32) * (1 / 255)  # [B, 3, S, S] in [0, 1]
        out = self.model(x)
        return tuple(getattr(out, name).float() for name in OUTPUT_NAMES)  # [B], [B, g, g], [B, g*g, E]


def _weight_bytes(model: nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def export_onnx(scorer, path: str | os.PathLike, opset: int | None = None, external_data: bool | None = None) -> Path:
    """Write ``scorer.model`` as ONNX with a dynamic batch dimension and check it.

    The exporter's loggers are left as they are; jobs quiet them once with
    :func:`adcore.logs.quiet_third_party_loggers`.

    Args:
        scorer: A :class:`adcore.scorer.Scorer`; its network is exported in eval mode on its current device.
        path: Output ``.onnx`` file; its folder is created.
        opset: ONNX opset; None takes torch's default.
        external_data: Weights in a side file ``<file>.data`` (``write_model_repository``
            carries both); None: only when they exceed protobuf's 2 GiB limit.

    Returns:
        ``path``.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = scorer.model.eval()
    device = next(model.parameters()).device
    wrapper = _NetworkOutputs(model).eval()
    size = int(scorer.input_size)
    example = torch.randint(0, 256, (_TRACE_BATCH, 3, size, size), dtype=torch.uint8, device=device)
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    external = _weight_bytes(model) > _INLINE_WEIGHTS_LIMIT if external_data is None else bool(external_data)
    try:
        with torch.inference_mode(False), torch.no_grad():
            program = torch.onnx.export(
                wrapper,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes={"pixel_values": {0: batch}},
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:
        raise RuntimeError(f"ONNX export of {scorer.name!r} ({type(model).__name__}) to {path} failed: {exc}") from exc
    meta = {k: str(scorer.meta[k]) for k in METADATA_KEYS if k in scorer.meta}
    program.model.metadata_props.update({**meta, FORMAT_KEY: ONNX_FORMAT})
    program.save(str(path), external_data=external)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise RuntimeError(f"exported ONNX {path} fails onnx.checker: {exc}") from exc
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (artifact identity written by :func:`export_onnx`)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


class OnnxNetwork:
    """An exported network run in-process by onnxruntime: a :class:`adcore.scorer.Network` backend.

    Takes the pixels as its graph does: uint8 for graphs of :func:`export_onnx` (float pixels are
    rounded to uint8 first, as the scoring job's decoder does), float32 for older float-input graphs.

    Args:
        path: The ``.onnx`` file from :func:`export_onnx` (or a variant from :func:`write_variant`).
        threads: onnxruntime intra-op threads; None lets onnxruntime choose.
        providers: Execution providers in order; default CUDA first when onnxruntime has it, then CPU.
        outputs: The outputs to compute and return (a subset of ``OUTPUT_NAMES``); None: all.
    """

    max_batch = None  # the graph's batch dimension is dynamic
    in_flight = 0  # in-process: nothing to overlap with the head

    def __init__(
        self,
        path: str | os.PathLike,
        threads: int | None = None,
        providers: list[str] | None = None,
        outputs: tuple[str, ...] | None = None,
    ):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.path}")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        # Spinning worker threads burn shared cores between calls (ENVIRONMENT.md: median 75 ms -> 30 ms).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:
            raise RuntimeError(f"onnxruntime cannot load {self.path}: {exc}") from exc
        names = [o.name for o in self.session.get_outputs()]
        if sorted(names) != sorted(OUTPUT_NAMES):
            raise ValueError(f"{self.path}: outputs {names}, expected {list(OUTPUT_NAMES)}")
        self.outputs = tuple(OUTPUT_NAMES if outputs is None else outputs)
        unknown = sorted(set(self.outputs) - set(OUTPUT_NAMES))
        if unknown or not self.outputs:
            raise ValueError(f"outputs {list(self.outputs)}: choose among {list(OUTPUT_NAMES)}")
        graph_input = self.session.get_inputs()[0].type
        self.input_dtype = "uint8" if graph_input == "tensor(uint8)" else "float32"
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """[B, 3, S, S] uint8 (or float in [0, 1]) -> the same dict as ``Scorer.forward``."""
        x = as_uint8(pixels) if self.input_dtype == "uint8" else as_float(pixels)
        values = self.session.run(list(self.outputs), {INPUT_NAME: x})
        return dict(zip(self.outputs, values))


# --- Quantised variants --------------------------------------------------------
# Precision variants of one exported graph. fp32 is the graph itself; int8 is onnxruntime's
# dynamic quantisation (int8 weights, activations quantised per call: MatMul/Gemm/Conv, for CPU);
# fp16 halves every weight and activation but keeps the uint8 input and float32 outputs (GPU hosts).
VariantName = Literal["fp32", "int8", "fp16"]  # the --variant flag of the entry points
VARIANTS = typing.get_args(VariantName)


def variant_filename(variant: str) -> str:
    """``model.onnx`` for fp32, ``model.<variant>.onnx`` for the others."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    return "model.onnx" if variant == "fp32" else f"model.{variant}.onnx"


class _DropQuantizerRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname or record.levelno >= logging.WARNING


@contextlib.contextmanager
def _quiet_quantizer():
    """onnxruntime's quantizer logs a line per tensor on the root logger: drop those below WARNING meanwhile."""
    drop = _DropQuantizerRecords()
    logging.getLogger().addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(drop)


def write_variant(fp32_path: str | os.PathLike, variant: str, path: str | os.PathLike) -> Path:
    """Write ``variant`` (int8 or fp16) of the fp32 graph at ``fp32_path`` to ``path``; metadata kept.

    A graph whose weights sit in a side file (over protobuf's 2 GiB) keeps them in one
    (``<file>.data``) for fp16; int8 weights are a quarter of fp32's and stay inline.
    """
    import onnx

    fp32_path, path = Path(fp32_path), Path(path)
    meta = read_metadata(fp32_path)
    if variant == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # QInt8 weights: onnxruntime's CPU kernels (MatMulInteger) are fastest with signed weights on x86.
        with _quiet_quantizer():
            quantize_dynamic(fp32_path, path, weight_type=QuantType.QInt8, use_external_data_format=False)
        proto = onnx.load(str(path))
    elif variant == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        # keep_io_types: the uint8 input and float32 outputs stay as the fp32 graph has them.
        proto = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    else:
        raise ValueError(f"write_variant makes int8 or fp16 from the fp32 graph, got {variant!r}")
    del proto.metadata_props[:]
    proto.metadata_props.extend(
        onnx.StringStringEntryProto(key=k, value=v) for k, v in {**meta, "variant": variant}.items()
    )
    external = proto.ByteSize() > _INLINE_WEIGHTS_LIMIT
    onnx.save(proto, str(path), save_as_external_data=external, location=path.name + ".data" if external else None)
    return path
