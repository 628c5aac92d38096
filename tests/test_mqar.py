"""MQAR data: layout, labels, the data.source=mqar recipe path, and the recall evaluation."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bmojo import BmojoConfig, BmojoForCausalLM
from bmojo.data import DataConfig, DataSource, prepare_data
from bmojo.data.mqar import (
    Filler,
    MqarConfig,
    MqarLayout,
    generate_examples,
    mqar_labels,
    mqar_training_labels,
)
from bmojo.eval.mqar import evaluate_mqar

SEQ_LEN = 64


def layout(**overrides) -> MqarLayout:
    return MqarLayout(MqarConfig(**{"num_pairs": 4, "gap": 16, **overrides}), SEQ_LEN)


def test_pairs_come_first_and_every_key_is_queried_once_after_the_gap():
    lay = layout()
    ids = generate_examples(lay, count=50, seed=0)
    keys, values = ids[:, 0:8:2], ids[:, 1:8:2]
    assert ((keys >= lay.first_key) & (keys < lay.first_value)).all()
    assert ((values >= lay.first_value) & (values < lay.first_filler)).all()
    assert all(len(set(row)) == 4 for row in keys)
    is_key = (ids >= lay.first_key) & (ids < lay.first_value)
    assert not is_key[:, 8 : lay.query_start].any()
    for row, row_keys in zip(ids.tolist(), keys.tolist(), strict=True):
        queried = [t for t in row[lay.query_start :] if lay.first_key <= t < lay.first_value]
        assert sorted(queried) == sorted(row_keys)


def test_periodic_filler_follows_the_position_and_noise_filler_does_not():
    periodic = generate_examples(layout(), count=8, seed=1)
    filler = periodic[:, 8 : layout().query_start]
    expected = layout().first_filler + np.arange(8, layout().query_start) % 2
    assert (filler == expected).all()
    longer = generate_examples(layout(period=3), count=2, seed=1)[:, 8 : layout().query_start]
    assert (longer == layout().first_filler + np.arange(8, layout().query_start) % 3).all()
    noisy = generate_examples(layout(filler=Filler.noise), count=8, seed=1)[:, 8 : layout().query_start]
    assert not (noisy == expected).all() and (noisy >= layout().first_filler).all()


def test_labels_are_the_queried_values_one_step_after_each_query():
    lay = layout()
    ids = torch.as_tensor(generate_examples(lay, count=6, seed=2))
    labels = mqar_labels(lay, ids)
    for row, row_labels in zip(ids.tolist(), labels.tolist(), strict=True):
        value_of = dict(zip(row[0:8:2], row[1:8:2], strict=True))
        expected = [-100] * SEQ_LEN
        for pos in range(lay.query_start, SEQ_LEN - 1):
            if row[pos] in value_of:
                expected[pos + 1] = value_of[row[pos]]
        assert row_labels == expected and sum(label != -100 for label in row_labels) == 4


@pytest.mark.parametrize("filler", [Filler.periodic, Filler.noise])
def test_training_labels_add_the_filler_to_the_answers(filler):
    lay = layout(filler=filler)
    ids = torch.as_tensor(generate_examples(lay, count=4, seed=6))
    answers, training = mqar_labels(lay, ids), mqar_training_labels(lay, ids)
    is_answer = answers != -100
    assert torch.equal(training[is_answer], answers[is_answer])
    expected_filler = (ids >= lay.first_filler) & ~is_answer
    assert torch.equal(training != -100, is_answer | expected_filler)
    assert torch.equal(training[expected_filler], ids[expected_filler])
    without = MqarLayout(MqarConfig(num_pairs=4, gap=16, filler=filler, filler_targets=False), SEQ_LEN)
    assert torch.equal(mqar_training_labels(without, ids), answers)


def test_generation_is_deterministic_in_the_seed():
    assert (generate_examples(layout(), 4, seed=3) == generate_examples(layout(), 4, seed=3)).all()
    assert not (generate_examples(layout(), 4, seed=3) == generate_examples(layout(), 4, seed=4)).all()


def test_periodic_filler_after_a_query_key_is_always_the_same_token():
    lay = layout()
    ids = generate_examples(lay, count=20, seed=5)[:, lay.query_start :]
    after_query = ids[:, 1:][(ids[:, :-1] >= lay.first_key) & (ids[:, :-1] < lay.first_value)]
    assert set(after_query.tolist()) == {lay.first_filler + 1}


def test_too_short_a_sequence_says_how_long_it_must_be():
    with pytest.raises(ValueError, match="need seq_len >= 32"):
        generate_examples(MqarLayout(MqarConfig(num_pairs=8, gap=0), 31), 1, 0)


def test_data_source_mqar_gives_blocks_labels_and_a_tokenizer():
    config = DataConfig(
        source=DataSource.mqar, seq_len=SEQ_LEN, mqar=MqarConfig(num_pairs=4, gap=16, train_examples=20, val_examples=5)
    )
    tokenizer, packed = prepare_data(config, seed=0)
    assert len(packed.train) == 20 and len(packed.val) == 5 and packed.seq_len == SEQ_LEN
    ids = torch.as_tensor(np.asarray(packed.val["input_ids"]))
    assert torch.equal(packed.labels(ids), mqar_training_labels(layout(), ids))
    assert tokenizer.decode(ids[0, :2].tolist()).split()[0].startswith("k")
    assert len(tokenizer) == layout().vocab_size and tokenizer.eos_token_id == 0
    _, again = prepare_data(config, seed=0)
    assert np.array_equal(again.train["input_ids"], packed.train["input_ids"])


class Oracle(torch.nn.Module):
    """Reads the answers off the pairs: logits one-hot on each query's value (or on a wrong value)."""

    def __init__(self, lay: MqarLayout, wrong: bool):
        super().__init__()
        self.lay, self.wrong = lay, wrong
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, ids: torch.Tensor) -> SimpleNamespace:
        answers = mqar_labels(self.lay, ids)[:, 1:]
        logits = torch.zeros(*ids.shape, self.lay.vocab_size)
        where = answers != -100
        logits[:, :-1][where, answers[where] + int(self.wrong)] = 1.0
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize(("wrong", "accuracy"), [(False, 1.0), (True, 0.0)])
def test_evaluate_mqar_scores_the_value_predicted_at_each_query_key(wrong, accuracy):
    lay = layout(num_values=70)
    result = evaluate_mqar(Oracle(lay, wrong), lay.config, SEQ_LEN, examples=10, batch_size=4)
    assert result.queries == 10 * 4 and result.accuracy == accuracy and result.value_in_memory == []


@pytest.mark.parametrize(("memory_size", "share"), [(12, 0.0), (64, 1.0)])
def test_value_in_memory_replays_the_selection_of_each_b_layer(memory_size, share):
    # tau = 0 and k = Q_e accept every token, so a query in block c reads positions [8c - M, 8c): with M = 12
    # the pairs (positions < 8) are gone before the first query (position >= 24); with M = 64 all are there.
    lay = layout()
    config = BmojoConfig(
        vocab_size=lay.vocab_size, hidden_size=32, layer_pattern="B", window_size=8, memory_size=memory_size,
        memory_topk=8, memory_block=8, memory_threshold=0.0, ssm_head_dim=16, ssm_chunk_size=16,
    )  # fmt: skip
    result = evaluate_mqar(BmojoForCausalLM(config), lay.config, SEQ_LEN, examples=6, batch_size=3)
    assert result.value_in_memory == [share, share]
