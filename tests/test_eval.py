"""Evaluation helpers: perplexity on the same tokens at several lengths, equal-size family, bmojo-eval on MQAR."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bmojo import BmojoConfig, BmojoForCausalLM
from bmojo.cli import eval as eval_cli
from bmojo.eval.family import FAMILY, family_configs, match_parameters, parameter_count
from bmojo.eval.perplexity import cut_blocks, perplexity_at_lengths
from bmojo.train import train

TINY = dict(vocab_size=64, hidden_size=32, num_attention_heads=2, num_key_value_heads=2, window_size=8,
            ssm_head_dim=16, ssm_chunk_size=16, memory_size=8, memory_topk=2)  # fmt: skip


def test_every_length_reads_the_same_tokens_with_its_own_context():
    torch.manual_seed(0)
    model = BmojoForCausalLM(BmojoConfig(layer_pattern="A", **TINY)).eval()
    blocks = torch.randint(0, 64, (2, 32))
    results = perplexity_at_lengths(model, blocks, [8, 32], batch_size=3)
    assert [r.length for r in results] == [8, 32] and [r.tokens for r in results] == [8 * 7, 2 * 31]
    with torch.no_grad():
        whole = model(blocks, labels=blocks).loss.item()
        pieces = [model(piece[None], labels=piece[None]).loss.item() for piece in blocks.reshape(-1, 8)]
    assert results[1].loss == pytest.approx(whole, rel=1e-5)
    assert results[0].loss == pytest.approx(sum(pieces) / len(pieces), rel=1e-5)
    assert results[0].perplexity == pytest.approx(math.exp(results[0].loss))


def test_lengths_must_divide_the_blocks():
    with pytest.raises(ValueError, match="context length 12 does not divide the evaluation blocks of 32"):
        cut_blocks(torch.zeros(1, 32), 12)


def test_family_members_are_matched_to_the_reference_parameter_count():
    configs = family_configs(**TINY, intermediate_size=64)
    target = parameter_count(BmojoConfig(layer_pattern="B", intermediate_size=64, **TINY))
    assert list(configs) == list(FAMILY)
    for member, config in configs.items():
        # One MLP step of 8 channels changes the count by 3 * 8 * hidden per layer: the match is within half.
        assert abs(parameter_count(config) - target) <= 3 * 8 * 32 * 2 / 2, member
        assert config.layer_pattern == member
    assert configs["A"].intermediate_size > configs["B"].intermediate_size
    assert match_parameters("A", 0, **TINY).intermediate_size == 8  # never below one step


def test_bmojo_eval_reports_mqar_accuracy_for_a_model_trained_on_mqar(compose_recipe, tmp_path, capsys):
    config = compose_recipe(
        [
            "experiment=mqar_B",
            f"run_dir={tmp_path / 'run'}",
            "data.mqar.num_pairs=2",
            "data.mqar.gap=8",
            "data.mqar.train_examples=16",
            "data.mqar.val_examples=4",
            "data.seq_len=24",
            "trainer.max_steps=2",
            "trainer.micro_batch_size=4",
            "trainer.eval_batches=1",
            "trainer.progress_bar=false",
            "trainer.tensorboard=false",
            "trainer.export_at_end=false",
        ]
    )
    summary = train(config)
    out_json = tmp_path / "eval.json"
    eval_cli.main([str(summary.run_dir), "--mqar-examples", "8", "--json", str(out_json)])
    report = json.loads(out_json.read_text())
    assert report["mqar"]["queries"] == 8 * 2 and report["mqar"]["num_pairs"] == 2
    assert 0.0 <= report["mqar"]["accuracy"] <= 1.0 and len(report["mqar"]["value_in_memory"]) == 2
    assert "MQAR recall accuracy" in capsys.readouterr().out
