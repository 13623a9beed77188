"""Sign banks: short radiological-sign descriptions per imaging domain and anomaly category (SD-MAD).

Each ``<domain>.json`` next to this file holds
``{"domain": ..., "normal": [...], "categories": {name: [sign, ...]}, "source": ...}``. A sign
written under several categories is *shared* (e.g. "a well-defined focal lesion with a clear
margin" for a mass, a cyst and calcified foci): :class:`SignBank` keeps each distinct sign once and
an association matrix that says which categories list it. Text towers
(:mod:`adcore.backbones.text`) embed the signs; SD-MAD (``adcore.models.sdmad``) aligns them with
the categories. :func:`regenerate_with_llm` rewrites a bank with a local language model, like
:func:`adcore.prompts.regenerate_with_llm` does for the prompt banks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from adcore.errors import UserError

SIGN_DIR = Path(__file__).resolve().parent
N_EXAMPLES = 3  # signs of a category shown to the language model as few-shot examples
ATTEMPTS_PER_SIGN = 5  # sampling attempts per wanted sign (duplicates and blanks are dropped)
MAX_NEW_TOKENS = 30  # one short sign
TEMPERATURE = 0.8


class SignBankError(UserError, ValueError):
    """A sign-bank file that cannot be used (not there, not YAML/JSON, or malformed)."""


@dataclass
class SignBank:
    """Normal-appearance signs and per-category anomaly signs of one domain."""

    domain: str
    normal: list[str]
    categories: dict[str, list[str]]
    source: str = ""
    signs: list[str] = field(init=False)  # distinct anomaly signs, in order of first appearance

    def __post_init__(self):
        self.signs = list(dict.fromkeys(s for signs in self.categories.values() for s in signs))

    @property
    def category_names(self) -> list[str]:
        return list(self.categories)

    def association(self) -> np.ndarray:
        """[n_signs, n_categories] float32: 1 where the category lists the sign."""
        out = np.zeros((len(self.signs), len(self.categories)), np.float32)
        index = {s: i for i, s in enumerate(self.signs)}
        for c, signs in enumerate(self.categories.values()):
            out[[index[s] for s in signs], c] = 1.0
        return out

    def shared(self) -> list[str]:
        """Signs listed under more than one category."""
        return [s for s, n in zip(self.signs, self.association().sum(1)) if n > 1]

    def subset(self, names: list[str]) -> SignBank:
        """The bank restricted to ``names`` (in that order), e.g. the categories a dataset has."""
        missing = [n for n in names if n not in self.categories]
        if missing:
            raise ValueError(f"sign bank {self.domain!r} has no categories {missing}; it has {self.category_names}")
        return SignBank(self.domain, list(self.normal), {n: list(self.categories[n]) for n in names}, self.source)


def list_domains() -> list[str]:
    """Domains with a bundled sign bank, sorted."""
    return sorted(p.stem for p in SIGN_DIR.glob("*.json"))


def load_sign_bank(domain: str) -> SignBank:
    """Loads the bundled bank for ``domain`` (see :func:`list_domains`)."""
    path = SIGN_DIR / f"{domain}.json"
    if not path.is_file():
        raise ValueError(f"no sign bank for domain {domain!r}; known domains: {list_domains()}")
    return read_sign_bank(path)


def _strings(values) -> bool:
    return bool(values) and all(isinstance(s, str) and s.strip() for s in values)


def read_sign_bank(path: str | Path) -> SignBank:
    """Reads and checks a sign-bank file: JSON (``.json``) or YAML, a local path or ``s3://`` URI.

    ``{"domain": ..., "normal": [sign, ...], "categories": {name: [sign, ...]}, "source": ...}``;
    ``domain`` defaults to the file name and ``source`` to empty. The file is untrusted input:
    YAML is read with ``safe_load`` and every field is checked.
    """
    import yaml

    from adcore import storage

    name = str(path)
    text = storage.read_bytes(name).decode()
    try:  # JSON is YAML too; a .json file is read as JSON for JSON's own error messages
        data = json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise SignBankError(f"{name}: not a valid sign bank ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise SignBankError(f"{name}: expected a mapping with 'normal' and 'categories'")
    cats = data.get("categories")
    if not _strings(data.get("normal")):
        raise SignBankError(f"{name}: 'normal' must be a non-empty list of non-empty strings")
    if not isinstance(cats, dict) or len(cats) < 2:
        raise SignBankError(f"{name}: 'categories' must map at least two category names to their signs")
    for cat, signs in cats.items():
        if not isinstance(cat, str) or not _strings(signs) or len(set(signs)) != len(signs):
            raise SignBankError(f"{name}: category {cat!r} needs a list of distinct non-empty signs")
    domain = str(data.get("domain") or Path(name).stem)
    return SignBank(domain, list(data["normal"]), dict(cats), str(data.get("source", "")))


def _sample_lines(model, tokenizer, prompt: str, n: int, avoid: list[str]) -> list[str]:
    """Up to ``n`` distinct first lines sampled after ``prompt``."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = tokenizer(prompt, return_tensors="pt")
    found: list[str] = []
    for _ in range(n * ATTEMPTS_PER_SIGN):
        gen = model.generate(
            **ids, do_sample=True, temperature=TEMPERATURE, max_new_tokens=MAX_NEW_TOKENS, pad_token_id=pad_id
        )
        line = tokenizer.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        line = line.strip().split("\n")[0].strip(" -")
        if line and line not in found and line not in avoid:
            found.append(line)
        if len(found) == n:
            break
    return found


def regenerate_with_llm(
    domain: str, model_dir: str | Path, out_path: str | Path, n: int = 4, seed: int = 0, keep_shared: bool = True
) -> SignBank:
    """Writes a new sign bank for ``domain`` sampled from a local causal language model.

    Each category's bundled signs are the few-shot examples ("Radiological signs of <category> on
    <domain> images:"); the model continues the list one sign at a time. Shared signs of the bundled
    bank are kept (``keep_shared``) so categories still share evidence. Sampling uses its own seeded
    RNG (global torch state is kept). Never downloads: ``model_dir`` must be a local folder.

    Args:
        domain: An existing domain (its bank supplies the examples and category names).
        model_dir: Local Hugging Face causal-LM folder.
        out_path: Where the JSON bank is written.
        n: New signs per category (and for the normal appearance).
        seed: Sampling seed.
        keep_shared: Keep the bundled bank's shared signs in each category that lists them.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} is not a local Hugging Face model folder (no config.json); "
            "regenerate_with_llm never downloads models"
        )
    base = load_sign_bank(domain)
    shared = set(base.shared()) if keep_shared else set()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    where = domain.replace("_", " ")
    groups = {"normal": base.normal, **base.categories}
    out: dict[str, list[str]] = {}
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        for name, examples in groups.items():
            what = "a normal appearance" if name == "normal" else name.replace("_", " ")
            prompt = f"Radiological signs of {what} on {where} images:\n"
            prompt += "".join(f"- {e}\n" for e in examples[:N_EXAMPLES]) + "- "
            found = _sample_lines(model, tokenizer, prompt, n, list(examples))
            if len(found) < n:
                raise RuntimeError(
                    f"{model_dir}: only {len(found)} distinct signs for {name!r} after {n * ATTEMPTS_PER_SIGN} samples"
                )
            out[name] = found + [s for s in examples if s in shared and s not in found]
    bank = SignBank(
        domain,
        out.pop("normal"),
        out,
        f"sampled from local model {model_dir.name} (seed {seed}) with few-shot examples from the bundled "
        f"{domain} sign bank" + (" (its shared signs kept)" if shared else ""),
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    record = {"domain": bank.domain, "normal": bank.normal, "categories": bank.categories, "source": bank.source}
    out_path.write_text(json.dumps(record, indent=2) + "\n")
    return bank
