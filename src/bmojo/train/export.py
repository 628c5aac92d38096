"""Export to a Hugging Face folder, and a short sample from a model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def export_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Write ``save_pretrained`` weights (safetensors), config and tokenizer; ``out_dir`` is replaced whole.

    The folder loads with ``AutoModelForCausalLM.from_pretrained`` once ``bmojo`` is imported, and in any
    process with ``trust_remote_code=True``: config.json carries ``auto_map`` and the folder the small modules
    it names (``bmojo.remote``), which take the classes from the installed ``bmojo``.
    """
    out_dir = Path(out_dir)
    temporary = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(str(temporary), safe_serialization=True)  # with the remote-code modules
    tokenizer.save_pretrained(str(temporary))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(temporary, out_dir)
    return out_dir


@torch.no_grad()
def generate_sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_new_tokens: int,
    seed: int = 0,
    temperature: float = 0.8,
    top_k: int = 40,
) -> str:
    """Prompt plus up to ``max_new_tokens`` sampled tokens, decoded; the global RNG state is left untouched."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    if ids.shape[1] == 0:
        ids = torch.tensor([[tokenizer.eos_token_id]], device=device)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        output = model.generate(
            ids,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_k=top_k,
            pad_token_id=tokenizer.eos_token_id,
        )
    model.train(was_training)
    return tokenizer.decode(output[0], skip_special_tokens=True)
