"""Bundled prompt banks and the optional LLM regeneration hook."""

import json

import pytest
import torch

from adcore import prompts

DOMAINS = ["brain_mri", "chest_xray", "head_ct", "histopathology", "liver_ct", "retinal_fundus", "retinal_oct", "skin"]


def test_list_domains():
    assert prompts.list_domains() == DOMAINS


@pytest.mark.parametrize("domain", DOMAINS)
def test_bank_has_ten_plus_ten_unique_prompts(domain):
    bank = prompts.load_prompt_bank(domain)
    assert bank.domain == domain and bank.source
    assert len(bank.normal) == len(set(bank.normal)) == 10
    assert len(bank.anomalous) == len(set(bank.anomalous)) == 10
    assert not set(bank.normal) & set(bank.anomalous)


def test_unknown_domain_lists_known_ones():
    with pytest.raises(ValueError, match="brain_mri"):
        prompts.load_prompt_bank("knee_xray")


def test_regenerate_missing_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        prompts.regenerate_with_llm("brain_mri", tmp_path / "nope", tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


def _tiny_lm(path):
    """A random-init GPT-2 with a word-level tokenizer over the brain bank's words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bank = prompts.load_prompt_bank("brain_mri")
    words = sorted({w for s in bank.normal + bank.anomalous for w in s.split()} | {"-", ":"})
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


def test_regenerate_with_tiny_local_lm(tmp_path):
    _tiny_lm(tmp_path / "lm")
    state = torch.random.get_rng_state()
    bank = prompts.regenerate_with_llm("brain_mri", tmp_path / "lm", tmp_path / "bank.json", n=3, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert len(set(bank.normal)) == len(set(bank.anomalous)) == 3
    saved = json.loads((tmp_path / "bank.json").read_text())
    assert saved["normal"] == bank.normal and saved["domain"] == "brain_mri"
    again = prompts.regenerate_with_llm("brain_mri", tmp_path / "lm", tmp_path / "bank2.json", n=3, seed=1)
    assert again.normal == bank.normal  # seeded
