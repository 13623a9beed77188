"""Bundled sign banks (SD-MAD) and their optional LLM regeneration hook."""

import json

import numpy as np
import pytest
import torch

from adcore import prompts, signs

DOMAINS = ["brain_mri", "chest_xray", "head_ct", "histopathology", "liver_ct", "retinal_fundus", "retinal_oct", "skin"]


def test_every_prompt_domain_has_a_sign_bank():
    assert signs.list_domains() == DOMAINS == prompts.list_domains()


@pytest.mark.parametrize("domain", DOMAINS)
def test_bank_loads_with_categories_and_shared_signs(domain):
    bank = signs.load_sign_bank(domain)
    assert bank.domain == domain and bank.source and bank.normal
    assert len(bank.categories) >= 3 and all(len(s) >= 3 for s in bank.categories.values())
    a = bank.association()
    assert a.shape == (len(bank.signs), len(bank.categories)) and (a.sum(1) >= 1).all()
    assert bank.shared() and len(bank.signs) == len(set(bank.signs))  # a shared sign is one row
    assert not set(bank.normal) & set(bank.signs)


def test_brain_bank_names_the_demo_lesion_kinds():
    from adcore.data.synth import LESION_KINDS

    bank = signs.load_sign_bank("brain_mri")
    assert set(bank.categories) == set(LESION_KINDS)
    shared = "a well-defined focal lesion with a clear margin"
    row = bank.association()[bank.signs.index(shared)]
    assert [c for c, v in zip(bank.categories, row) if v] == ["hyperintense_mass", "hypointense_cyst", "calcified_foci"]


def test_subset_keeps_the_named_categories_and_their_signs():
    bank = signs.load_sign_bank("brain_mri").subset(["hypointense_cyst", "diffuse_region"])
    assert bank.category_names == ["hypointense_cyst", "diffuse_region"]
    assert set(bank.signs) == set(bank.categories["hypointense_cyst"]) | set(bank.categories["diffuse_region"])
    np.testing.assert_array_equal(bank.association().sum(0), [4, 4])
    with pytest.raises(ValueError, match="glioma"):
        bank.subset(["glioma"])


def test_unknown_domain_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match="brain_mri"):
        signs.load_sign_bank("knee_xray")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"normal": ["ok"], "categories": {"a": ["x", "x"], "b": ["y"]}}))
    with pytest.raises(ValueError, match="distinct"):
        signs.read_sign_bank(bad)
    bad.write_text(json.dumps({"normal": ["ok"], "categories": {"a": ["x"]}}))
    with pytest.raises(ValueError, match="at least two"):
        signs.read_sign_bank(bad)


def test_regenerate_missing_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        signs.regenerate_with_llm("brain_mri", tmp_path / "nope", tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


def _tiny_lm(path):
    """A random-init GPT-2 with a word-level tokenizer over the brain sign bank's words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bank = signs.load_sign_bank("brain_mri")
    words = sorted({w for s in bank.normal + bank.signs for w in s.split()} | {"-", ":"})
    vocab = {t: i for i, t in enumerate(["<eos>", "<unk>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(vocab), n_positions=256, n_embd=16, n_layer=1, n_head=2, eos_token_id=0, bos_token_id=0
        )
    ).save_pretrained(path)


def test_regenerate_with_tiny_local_lm_keeps_shared_signs(tmp_path):
    _tiny_lm(tmp_path / "lm")
    state = torch.random.get_rng_state()
    bank = signs.regenerate_with_llm("brain_mri", tmp_path / "lm", tmp_path / "bank.json", n=2, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    base = signs.load_sign_bank("brain_mri")
    assert bank.category_names == base.category_names and len(bank.normal) == 2
    assert set(base.shared()) <= set(bank.shared())  # shared evidence survives regeneration
    again = signs.read_sign_bank(tmp_path / "bank.json")
    assert again.categories == bank.categories and again.normal == bank.normal
    twice = signs.regenerate_with_llm("brain_mri", tmp_path / "lm", tmp_path / "bank2.json", n=2, seed=1)
    assert twice.categories == bank.categories  # seeded
