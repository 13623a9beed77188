"""anomalib's PatchCore on prepared images: runs inside the anomalib venv (``bench/anomalib_peer.py`` makes it).

    .venv-anomalib/bin/python bench/anomalib_peer_run.py --inputs IN.npz --weights MNV2.pth --out OUT.npz

``IN.npz`` holds ``train`` and ``test``: [N, 3, S, S] float32 in [0, 1], the exact network inputs adcore's
scorer builds (``adcore.scorer.prepare``). The backbone is timm's ``mobilenetv2_100`` without pretrained
download (``pre_trained=False``) with torchvision's ImageNet checkpoint (the one adcore loads) copied in
by renamed keys; its stride-8/16 stage outputs are checked against adcore's own MobileNetV2
(``--adcore-mnv2``, the file, loaded standalone: adcore is not installed here). Writes ``OUT.npz``
(raw ``scores`` [M], ``maps`` [M, S, S]) and ``OUT.json`` (timings, bank size, feature check).
anomalib's torch model is used as its Lightning module does: train-mode forwards fill the embedding
store, ``subsample_embedding`` runs the k-center-greedy coreset, eval-mode forwards score.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYERS = ("blocks.2", "blocks.4")  # timm stages ending at stride 8 (32 ch) and 16 (96 ch)
ADCORE_STAGES = (6, 13)  # the same two outputs in torchvision's ``features`` numbering
REPEATS = (1, 2, 3, 4, 3, 3, 1)  # MobileNetV2 blocks per stage (Sandler et al. 2018, Table 2)


def import_torchvision() -> None:
    """PyPI's torchvision is CUDA-built; beside CPU torch its ``_C.so`` may not load, and then its
    fake-kernel registrations for ``nms``/``qnms`` fail on import. Declare those two schemas first,
    only in that case (anomalib's PatchCore never calls them)."""
    spec = importlib.util.find_spec("torchvision")
    lib_path = next(Path(next(iter(spec.submodule_search_locations))).glob("_C*.so"), None)
    try:
        if lib_path is None:
            raise OSError("no _C.so")
        torch.ops.load_library(str(lib_path))
    except (OSError, RuntimeError):
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import_torchvision.lib = lib  # keep the definitions alive
    import torchvision  # noqa: F401


def timm_key(key: str) -> str:
    """torchvision ``mobilenet_v2`` parameter name -> timm ``mobilenetv2_100`` name."""
    parts = key.split(".")
    if parts[0] == "classifier":
        return "classifier." + ".".join(parts[2:])
    block, rest = int(parts[1]), parts[2:]
    if block == 0:
        return {"0": "conv_stem", "1": "bn1"}[rest[0]] + "." + ".".join(rest[1:])
    if block == sum(REPEATS) + 1:
        return {"0": "conv_head", "1": "bn2"}[rest[0]] + "." + ".".join(rest[1:])
    i, stage = block - 1, 0
    while i >= REPEATS[stage]:
        i, stage = i - REPEATS[stage], stage + 1
    sub = ".".join(rest[1:])  # rest[0] == "conv"
    names = (
        {"0.0": "conv_dw", "0.1": "bn1", "1": "conv_pw", "2": "bn2"}
        if stage == 0
        else {"0.0": "conv_pw", "0.1": "bn1", "1.0": "conv_dw", "1.1": "bn2", "2": "conv_pwl", "3": "bn3"}
    )
    for prefix, name in names.items():
        if sub.startswith(prefix + "."):
            return f"blocks.{stage}.{i}.{name}.{sub[len(prefix) + 1 :]}"
    raise KeyError(key)


def load_torchvision_weights(extractor: torch.nn.Module, path: str) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    renamed = {timm_key(k): v for k, v in state.items()}
    missing, _ = extractor.load_state_dict(renamed, strict=False)  # the head past blocks.4 is unused
    if missing:
        raise RuntimeError(f"timm keys without a torchvision weight: {missing[:5]}")


def feature_check(model, adcore_file: str, weights: str, x: torch.Tensor) -> float:
    """Largest |difference| between anomalib's extractor and adcore's MobileNetV2 at the two stages."""
    spec = importlib.util.spec_from_file_location("adcore_mnv2", adcore_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ref = mod.MobileNetV2()
    ref.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    with torch.no_grad():
        ours = model.feature_extractor(x)
        theirs = mod.features_at(ref.eval(), x, ADCORE_STAGES)
    return max(float((ours[name] - t).abs().max()) for name, t in zip(LAYERS, theirs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", required=True)
    p.add_argument("--weights", required=True, help="torchvision mobilenet_v2-b0353104.pth")
    p.add_argument("--adcore-mnv2", default=None, help="adcore/backbones/mobilenet_v2.py, for the feature check")
    p.add_argument("--out", required=True)
    p.add_argument("--ratio", type=float, default=0.01)
    p.add_argument("--neighbors", type=int, default=9)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="coreset start and random projection (torch and numpy)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # the sparse projection draws its columns through scikit-learn's global RNG
    import_torchvision()
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    data = np.load(args.inputs)
    train, test = torch.from_numpy(data["train"]), torch.from_numpy(data["test"])
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    model = PatchcoreModel(layers=list(LAYERS), backbone="mobilenetv2_100", pre_trained=False,
                           num_neighbors=args.neighbors)  # fmt: skip
    load_torchvision_weights(model.feature_extractor.feature_extractor, args.weights)
    report: dict = {"layers": list(LAYERS), "ratio": args.ratio, "neighbors": args.neighbors}
    if args.adcore_mnv2:
        report["feature_max_abs_diff"] = feature_check(model, args.adcore_mnv2, args.weights, (train[:2] - mean) / std)

    t0 = time.monotonic()
    model.train()
    model.feature_extractor.eval()  # as anomalib's Lightning module keeps it (BatchNorm frozen)
    with torch.no_grad():
        for i in range(0, len(train), args.batch_size):
            model((train[i : i + args.batch_size] - mean) / std)
    report["n_patches"] = int(sum(len(e) for e in model.embedding_store))
    model.subsample_embedding(args.ratio)
    report["fit_s"] = round(time.monotonic() - t0, 2)
    report["bank"] = int(model.memory_bank.shape[0])

    model.eval()
    scores, maps = [], []
    t0 = time.monotonic()
    with torch.no_grad():
        for i in range(0, len(test), args.batch_size):
            out = model((test[i : i + args.batch_size] - mean) / std)
            scores.append(out.pred_score.reshape(-1))
            maps.append(out.anomaly_map[:, 0])
    report["predict_s"] = round(time.monotonic() - t0, 2)
    np.savez(args.out, scores=torch.cat(scores).numpy(), maps=torch.cat(maps).numpy())
    Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
