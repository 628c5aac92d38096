"""Every shipped experiment trains what it names: at its own geometry, the language-model loss reaches every
parameter it should train (the SSM inside F/B included), and the start-up check refuses geometries where it
cannot."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from bmojo import BmojoConfig, BmojoForCausalLM
from bmojo.train import recipes_dir, train
from bmojo.train.trainer import check_memory_reachable

TINY_LENGTH = 128  # the scaled-down sequence length (at most)


def experiment_presets() -> list[str]:
    return sorted(p.stem for p in (recipes_dir() / "experiment").glob("*.yaml") if not p.stem.startswith("_"))


def scaled_down(model: dict, seq_len: int) -> tuple[BmojoConfig, int]:
    """The preset's model at tiny width, with its sequence length, window, memory block and memory size
    divided by one common factor (so that the sequence is at most ``TINY_LENGTH``)."""
    factor = max(1, math.ceil(seq_len / TINY_LENGTH))
    window = max(2, model["window_size"] // factor)
    block = max(1, (model["memory_block"] or model["window_size"]) // factor)
    config = BmojoConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=0 if model["intermediate_size"] == 0 else 32,
        num_hidden_layers=max(2, len(model["layer_pattern"])),
        layer_pattern=model["layer_pattern"],
        num_attention_heads=2,
        num_key_value_heads=1 if model["num_key_value_heads"] < model["num_attention_heads"] else 2,
        head_dim=16,
        qk_norm=model["qk_norm"],
        window_size=window,
        ssm_state_size=8,
        ssm_head_dim=16,
        ssm_chunk_size=16,
        memory_size=max(1, model["memory_size"] // factor),
        memory_block=block,
        memory_topk=min(model["memory_topk"], block),
        memory_threshold=model["memory_threshold"],
        innovation_rank=None if model["innovation_rank"] is None else 8,
        tie_fading_proj=model["tie_fading_proj"],
        memory_rope=model.get("memory_rope", True),
        tie_word_embeddings=model["tie_word_embeddings"],
    )
    return config, seq_len // factor


@pytest.mark.parametrize("experiment", experiment_presets())
def test_language_model_loss_reaches_every_parameter_it_trains(compose_recipe, experiment):
    composed = compose_recipe([f"experiment={experiment}"])
    model_fields = OmegaConf.to_container(composed.model)
    seq_len = composed.data.seq_len
    check_memory_reachable(composed.model, seq_len)  # the full-size geometry passes the start-up check
    config, length = scaled_down(model_fields, seq_len)
    torch.manual_seed(0)
    model = BmojoForCausalLM(config).train()
    ids = torch.randint(0, config.vocab_size, (2, length))
    logits = model(ids).logits
    lm_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    lm_loss.backward()
    auxiliary = model.auxiliary_parameter_names()
    for name, parameter in model.named_parameters():
        grad = parameter.grad
        if name in auxiliary:
            assert grad is None or not grad.any(), f"{experiment}: {name} is auxiliary but the LM loss reached it"
        else:
            assert grad is not None and grad.abs().max() > 0, f"{experiment} at T={length}: {name} gets no gradient"


def test_f_at_a_sequence_no_longer_than_its_window_leaves_its_ssm_without_gradient():
    """The failure the check guards against, measured: window = sequence gives the SSM exactly zero gradient."""
    torch.manual_seed(0)
    config = BmojoConfig(layer_pattern="F", vocab_size=64, hidden_size=32, window_size=32, ssm_head_dim=16)
    model = BmojoForCausalLM(config)
    ids = torch.randint(0, 64, (2, 32))
    model(ids, labels=ids).loss.backward()
    ssm_grads = [p.grad for n, p in model.named_parameters() if ".ssm." in n]
    assert ssm_grads and all(g is None or not g.any() for g in ssm_grads)


@pytest.mark.parametrize(
    ("model", "seq_len", "needed"),
    [("F_130m", 512, 1024), ("B_130m", 768, 1024), ("W_130m", 512, 513), ("MW_130m", 256, 513)],
)
def test_training_stops_at_start_up_where_the_memory_is_unreachable(
    compose_recipe, tmp_path, jsonl_corpus, tiny_run_overrides, model, seq_len, needed
):
    overrides = [*tiny_run_overrides(jsonl_corpus, tmp_path / "run"), f"model={model}", f"data.seq_len={seq_len}"]
    message = rf"data.seq_len={seq_len} .* model.window_size=512 .* data.seq_len >= {needed} .*allow_unreachable_memory"
    with pytest.raises(ValueError, match=message):
        train(compose_recipe(overrides))
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before anything was written


def test_allow_unreachable_memory_trains_anyway(compose_recipe, tmp_path, jsonl_corpus, tiny_run_overrides):
    overrides = [
        *tiny_run_overrides(jsonl_corpus, tmp_path / "run"),
        "model.window_size=64",
        "trainer.max_steps=1",
        "trainer.allow_unreachable_memory=true",
    ]
    assert train(compose_recipe(overrides)).step == 1
