"""Prompt banks: normal and anomalous text descriptions per imaging domain.

Each ``<domain>.json`` next to this file holds
``{"domain": ..., "normal": [...], "anomalous": [...], "source": ...}``. Text towers
(:mod:`adcore.backbones.text`) turn a bank into class anchors for zero-shot scoring.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PROMPT_DIR = Path(__file__).resolve().parent
# Few-shot examples shown to the language model per class when regenerating a bank.
N_EXAMPLES = 4
# Sampling attempts per wanted prompt before giving up (duplicates and blanks are dropped).
ATTEMPTS_PER_PROMPT = 5
MAX_NEW_TOKENS = 40  # one descriptive sentence
TEMPERATURE = 0.8
CLASS_WORDING = {"normal": "normal, healthy", "anomalous": "abnormal, diseased"}


@dataclass
class PromptBank:
    """Normal and anomalous descriptions for one domain."""

    domain: str
    normal: list[str]
    anomalous: list[str]
    source: str = ""


def list_domains() -> list[str]:
    """Domains with a bundled prompt bank, sorted."""
    return sorted(p.stem for p in PROMPT_DIR.glob("*.json"))


def load_prompt_bank(domain: str) -> PromptBank:
    """Loads the bundled bank for ``domain`` (see :func:`list_domains`)."""
    path = PROMPT_DIR / f"{domain}.json"
    if not path.is_file():
        raise ValueError(f"no prompt bank for domain {domain!r}; known domains: {list_domains()}")
    return _read_bank(path)


def _read_bank(path: Path) -> PromptBank:
    data = json.loads(path.read_text())
    for key in ("normal", "anomalous"):
        values = data.get(key)
        if not values or not all(isinstance(s, str) and s.strip() for s in values):
            raise ValueError(f"{path}: '{key}' must be a non-empty list of non-empty strings")
    return PromptBank(
        domain=data.get("domain", path.stem),
        normal=list(data["normal"]),
        anomalous=list(data["anomalous"]),
        source=data.get("source", ""),
    )


def regenerate_with_llm(
    domain: str, model_dir: str | Path, out_path: str | Path, n: int = 10, seed: int = 0
) -> PromptBank:
    """Writes a new bank for ``domain`` sampled from a local causal language model.

    The bundled bank's sentences are the few-shot examples; the model continues the list
    one sentence at a time. Sampling uses its own seeded RNG (global torch state is kept).

    Args:
        domain: An existing domain (its bank supplies the examples).
        model_dir: Local Hugging Face causal-LM folder (never downloaded).
        out_path: Where the JSON bank is written.
        n: Prompts per class.
        seed: Sampling seed.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} is not a local Hugging Face model folder (no config.json); "
            "regenerate_with_llm never downloads models"
        )
    base = load_prompt_bank(domain)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: dict[str, list[str]] = {}
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        for cls in ("normal", "anomalous"):
            examples = getattr(base, cls)[:N_EXAMPLES]
            prompt = (
                f"Short descriptions of {CLASS_WORDING[cls]} {domain.replace('_', ' ')} images:\n"
                + "".join(f"- {e}\n" for e in examples)
                + "- "
            )
            ids = tokenizer(prompt, return_tensors="pt")
            found: list[str] = []
            for _ in range(n * ATTEMPTS_PER_PROMPT):
                gen = model.generate(
                    **ids, do_sample=True, temperature=TEMPERATURE, max_new_tokens=MAX_NEW_TOKENS, pad_token_id=pad_id
                )
                text = tokenizer.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
                line = text.strip().split("\n")[0].strip(" -")
                if line and line not in found and line not in examples:
                    found.append(line)
                if len(found) == n:
                    break
            if len(found) < n:
                raise RuntimeError(
                    f"{model_dir}: only {len(found)} distinct {cls} prompts after "
                    f"{n * ATTEMPTS_PER_PROMPT} samples (wanted {n})"
                )
            out[cls] = found
    bank = PromptBank(
        domain=domain,
        normal=out["normal"],
        anomalous=out["anomalous"],
        source=f"sampled from local model {model_dir.name} (seed {seed}) with few-shot examples "
        f"from the bundled {domain} bank",
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(bank.__dict__, indent=2) + "\n")
    return bank
