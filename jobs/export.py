"""Export a model artifact's network to a Triton model repository.

    python jobs/export.py --model s3://models/fusion-small/v3 --output triton-repo [--data BMAD_DIR]
    python jobs/export.py --smoke-test        # tiny random model, then a real local Triton answers

Only the network (uint8 pixels -> score, anomaly_map, patch_embeddings) goes to
Triton, in each precision variant (``--variants``: fp32 as ``<name>``, int8 as
``<name>_int8``, fp16 as ``<name>_fp16``, each with its ``_ort`` twin). The graphs come
from the artifact's engine cache (``adcore.engine``: exported once, reused by the
scoring job). With ``--data`` the variants are scored on that BMAD folder's validation
split and the image/pixel AUROC and network speed of each are recorded in the cache's manifest; a
variant within 0.005 of fp32 on both and faster than fp32 on this host's device is marked usable
(the scoring job refuses the others).

The centroid / memory-bank matching and the calibration stay in the artifact, which
stays where it is: the scoring job loads it for the FAISS stage and checks, with
``adcore.serving.artifacts.check_served_model``, that the server runs the network of that same
artifact (``model_version`` and ``fingerprint`` are recorded as ``parameters`` in each
config.pbtxt).
"""

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adcore import engine, storage
from adcore import export as onnx_export
from adcore.cli import parse_config, required_unless, run_command
from adcore.errors import FlagError
from adcore.evaluate import measure_variants
from adcore.scorer import OUTPUT_NAMES, Scorer
from adcore.serving import artifacts as triton_models

log = logging.getLogger("jobs.export")

PROG = "python jobs/export.py"
# Triton's largest batch per request; the nightly job sends batches of 8-32 images.
DEFAULT_MAX_BATCH = 32
# Torch, onnxruntime and Triton differ by float rounding only (measured: below 1e-5 on tiny models).
SMOKE_TOLERANCE = 1e-4
# Images in the smoke test's request: several, and not one of the batcher's preferred sizes.
SMOKE_BATCH = 3
SMOKE_PRESET = "fusion-small"  # tiny random-init variant: exports in seconds on CPU


@dataclass
class ExportConfig:
    model: str | None = required_unless("smoke_test")  # artifact: local folder or s3:// prefix (smoke test: a tiny one)
    output: str | None = required_unless("smoke_test")  # Triton model repository to write: a local folder
    name: str | None = None  # Triton model name; default: the artifact's model_name
    max_batch_size: int = DEFAULT_MAX_BATCH
    intra_op_threads: int = 0  # onnxruntime threads in the CPU (Python-backend) model; 0 = onnxruntime's choice
    variants: str = "fp32,int8,fp16"  # comma-separated precision variants to write and serve
    data: str | None = None  # BMAD folder: measure each variant's AUROC on its validation split (usable or not)
    limit: int | None = None  # measure on an evenly spread subset of this many validation images
    smoke_test: bool = False  # also start the local CPU Triton on the result and compare it with torch


def smoke_artifact(folder: Path) -> str:
    """A saved tiny random-init artifact of ``SMOKE_PRESET`` (real head and calibration)."""
    from adcore.testing import tiny_artifact

    return tiny_artifact(str(folder / f"{SMOKE_PRESET}-tiny"), SMOKE_PRESET)


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.abs(np.asarray(a[k]) - np.asarray(b[k])).max()) for k in OUTPUT_NAMES}


def serve_and_compare(scorer: Scorer, repository: Path, model_name: str, onnx_path: Path) -> dict[str, float]:
    """Start the local CPU Triton on ``repository`` and compare its answer with torch and onnxruntime."""
    import tritonclient.http as httpclient

    from adcore.serving import LocalTriton, TritonClient, TritonNetwork

    rng = np.random.default_rng(0)
    # uint8 frames, as the scoring job's decoder ships them: torch sees value / 255, the graph casts the same way.
    pixels = rng.integers(0, 256, (SMOKE_BATCH, 3, scorer.input_size, scorer.input_size), dtype=np.uint8)
    torch_out = scorer.forward(pixels)
    ort_out = onnx_export.OnnxNetwork(onnx_path)(pixels)
    with LocalTriton(repository, models=[model_name]) as server:
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            triton_models.check_served_model(client.get_model_config(model_name), scorer)
        finally:
            client.close()
        with TritonClient(server.http_url, model_name) as triton:
            triton_out = TritonNetwork(triton, max_batch=SMOKE_BATCH)(pixels)
    diffs = {f"onnxruntime.{k}": v for k, v in max_abs_diff(torch_out, ort_out).items()}
    diffs |= {f"triton.{k}": v for k, v in max_abs_diff(torch_out, triton_out).items()}
    raw_torch, raw_triton = scorer.head(torch_out), scorer.head(triton_out)
    diffs["head.raw_score"] = float(np.abs(raw_torch[0] - raw_triton[0]).max())
    diffs["head.raw_map"] = float(np.abs(raw_torch[1] - raw_triton[1]).max())
    bad = {k: v for k, v in diffs.items() if not v <= SMOKE_TOLERANCE}
    if bad:
        raise RuntimeError(
            f"smoke test: {repository / model_name} disagrees with torch beyond {SMOKE_TOLERANCE}: {bad}"
        )
    return diffs


def how_to_serve(repository: Path, model_name: str, artifact: str) -> str:
    ort_name = model_name + "_ort"
    return "\n".join(
        [
            f"Triton repository {repository}: {model_name} (Python backend, CPU) and {ort_name} (onnxruntime, GPU).",
            "Serve on CPU (tritonserver bundled in nvidia-pytriton):",
            f"  python cluster/triton_local.py start --repository {repository} --models {model_name}",
            "Serve on a GPU host (NVIDIA's container; load only the _ort model), after checking its files:",
            f"  python cluster/triton_local.py verify --repository {repository}",
            f'  docker run --rm --gpus all --shm-size=1g -p 8000:8000 -p 8001:8001 -v "{repository}:/models:ro" \\',
            "    nvcr.io/nvidia/tritonserver:24.10-py3 tritonserver --model-repository=/models \\",
            f"    --model-control-mode=explicit --load-model={ort_name}",
            f"The FAISS head and calibration stay in the artifact {artifact}: the scoring job loads it and checks",
            "the served model with adcore.serving.artifacts.check_served_model(client.get_model_config(name), scorer).",
        ]
    )


def parse_variants(text: str) -> list[str]:
    variants = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in variants if v not in onnx_export.VARIANTS]
    if bad or not variants:
        raise SystemExit(f"--variants {text!r}: choose among {','.join(onnx_export.VARIANTS)}")
    return list(dict.fromkeys(["fp32", *variants]))  # fp32: the reference every variant is measured against


def format_measured(record: dict) -> str:
    """The variants' validation AUROC and speed side by side."""
    head = ["variant".ljust(8), *(h.rjust(12) for h in ("image AUROC", "pixel AUROC")), "max delta".rjust(10)]
    lines = [" ".join([*head, "x fp32 speed".rjust(13)]) + "  usable"]
    for variant, row in record["variants"].items():
        cells = [row.get("image_auroc"), row.get("pixel_auroc"), row.get("max_auroc_delta")]
        text = ["-" if v is None else f"{v:.4f}" for v in cells]
        speed = "-" if row.get("speed_vs_fp32") is None else f"{row['speed_vs_fp32']:.2f}"
        usable = "yes" if row["usable"] else "NO"
        lines.append(f"{variant:8s} {text[0]:>12s} {text[1]:>12s} {text[2]:>10s} {speed:>13s}  {usable}")
    return "\n".join(lines)


def main(cfg: ExportConfig) -> dict:
    """Export, write the repository, optionally measure and smoke-test it; returns what was written."""
    variants = parse_variants(cfg.variants)
    with tempfile.TemporaryDirectory(prefix="adcore-export-") as tmp:
        tmp = Path(tmp)
        artifact = cfg.model
        if artifact is None:
            if not cfg.smoke_test:
                raise FlagError("--model ARTIFACT is required (a local folder or s3:// prefix)")
            artifact = smoke_artifact(tmp)
        if cfg.output is None and not cfg.smoke_test:
            raise FlagError("--output DIR is required (a local folder)")
        if cfg.output is not None and storage.is_s3(cfg.output):
            raise FlagError(f"--output {cfg.output}: write to a local folder, then copy it where Triton reads")
        repository = Path(storage.local_path(cfg.output)) if cfg.output else tmp / "repository"

        scorer = engine.load_scorer(artifact, engine="torch")
        log.info("exporting %s (version %s) from %s", scorer.version, scorer.meta.get("version"), artifact)
        paths = {v: engine.ensure_onnx(scorer, v) for v in variants}
        measured = measure_variants(scorer, cfg.data, tuple(variants), limit=cfg.limit) if cfg.data else None
        if storage.is_s3(artifact):
            engine.upload_cache(scorer, artifact)  # every node's scoring job downloads these instead of exporting
        dirs: dict[str, Path] = {}
        for variant in variants:
            suffix = "" if variant == "fp32" else f"_{variant}"
            dirs |= triton_models.write_triton_repository(
                scorer,
                paths[variant],
                repository,
                model_name=cfg.name + suffix if cfg.name else None,
                max_batch_size=cfg.max_batch_size,
                intra_op_num_threads=cfg.intra_op_threads,
                variant=variant,
            )
        model_name = next(iter(dirs))
        summary = {
            "artifact": artifact,
            "model_version": scorer.version,
            "version": int(scorer.meta["version"]),
            "repository": str(repository.resolve()),
            "models": {name: str(path) for name, path in dirs.items()},
            "onnx": {v: str(p) for v, p in paths.items()},
            "onnx_bytes": {v: p.stat().st_size for v, p in paths.items()},
            "measured": measured,
        }
        for name, path in dirs.items():
            files = sorted(str(p.relative_to(repository)) for p in path.rglob("*") if p.is_file())
            print(f"wrote {name}: {', '.join(files)}")
        if measured:
            print(f"validation split of {cfg.data} ({measured['n_images']} images), tolerance {measured['tolerance']}:")
            print(format_measured(measured))
        else:
            print("variants not measured (no --data): the scoring job uses fp32 only until they are")
        if cfg.smoke_test:
            summary["max_abs_diff"] = serve_and_compare(scorer, repository, model_name, paths["fp32"])
            print("smoke test: torch, onnxruntime and Triton agree:", summary["max_abs_diff"])
        if cfg.output:
            print(how_to_serve(repository.resolve(), model_name, artifact))
    return summary


def parse_args(argv: list[str] | None = None, prog: str = PROG) -> ExportConfig:
    return parse_config(ExportConfig, argv, __doc__.split("\n\n")[0], prog=prog)


def cli(argv: list[str] | None = None, prog: str = PROG) -> None:
    """The command line: parse, export, errors a user can fix in one line."""
    run_command(lambda: main(parse_args(argv, prog)), prog)


if __name__ == "__main__":
    cli()
