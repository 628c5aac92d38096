"""data.mqar.layout=zoology against Zoology's multiquery_ar: a transcription of it (exact outputs) and a slow
plain statement of its procedure (statistics and invariants)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bmojo.data import DataConfig, DataSource, prepare_data
from bmojo.data.mqar import (
    LayoutKind,
    MqarConfig,
    MqarLayout,
    answer_labels,
    generate,
    generate_examples,
    mqar_labels,
)
from bmojo.eval.mqar import evaluate_mqar

VOCAB, SEQ_LEN, PAIRS = 256, 128, 8
SPACE = (SEQ_LEN - 2 * PAIRS) // 2  # gaps lie in [0, SPACE)


def zoology(**overrides) -> MqarLayout:
    seq_len = overrides.pop("seq_len", SEQ_LEN)
    fields = {"layout": LayoutKind.zoology, "vocab_size": VOCAB, "num_pairs": PAIRS, **overrides}
    return MqarLayout(MqarConfig(**fields), seq_len)


def transcribed_zoology(vocab_size, num_examples, input_seq_len, seed, power_a, num_kv_pairs):
    """HazyResearch/zoology's multiquery_ar (num_passes=1, random_non_queries=True), transcribed statement by
    statement; torch's global generator seeded with ``seed`` too (Zoology leaves it to the caller). Returns
    its (inputs, labels), labels in its shifted convention (the label at t is the target of the prediction
    at t). The global generators are put back as they were."""
    numpy_state, torch_state = np.random.get_state(), torch.get_rng_state()
    try:
        np.random.seed(seed)
        torch.manual_seed(seed)
        context_size = num_kv_pairs * 2
        key_vocab_size = vocab_size // 2
        key_choices = np.arange(1, key_vocab_size)
        value_choices = np.arange(key_vocab_size, vocab_size)
        keys_unshuffled = np.tile(key_choices, (num_examples, 1))
        keys = np.apply_along_axis(np.random.choice, 1, keys_unshuffled, replace=False, size=num_kv_pairs)
        values_unshuffled = np.tile(value_choices, (num_examples, 1))
        values = np.apply_along_axis(np.random.choice, 1, values_unshuffled, replace=False, size=num_kv_pairs)
        kvs = np.zeros((num_examples, context_size), dtype=np.int64)
        kvs[:, 0::2] = keys
        kvs[:, 1::2] = values
        space = (input_seq_len - context_size) // 2
        p = power_a * np.arange(1, space + 1) ** (power_a - 1)
        p = p / p.sum()
        x = np.stack([np.arange(space, dtype=int)] * num_examples)
        gaps = np.apply_along_axis(np.random.choice, axis=1, arr=x, replace=False, p=p, size=num_kv_pairs)
        queries = np.zeros((num_examples, input_seq_len - context_size + 1), dtype=np.int64)
        np.put_along_axis(queries, (gaps * 2), values=keys, axis=1)
        examples = np.concatenate([kvs, queries], axis=1)
        labels = np.full((num_examples, input_seq_len + 1), -100, dtype=np.int64)
        np.put_along_axis(labels, (gaps * 2) + context_size + 1, values=values, axis=1)
        inputs, labels = torch.tensor(examples[:, :-1]), torch.tensor(labels[:, 1:])
        inputs[inputs == 0] = torch.randint(vocab_size, size=inputs.shape)[inputs == 0]
        return inputs, labels
    finally:
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)


def plain_examples(vocab_size, seq_len, num_pairs, power_a, count, seed):
    """Zoology's procedure stated plainly, one example and one draw at a time (its own generator, so only
    the distribution can agree): (ids [count, seq_len], unshifted labels [count, seq_len], gaps [count, K])."""
    rng = np.random.default_rng(seed)
    half, space = vocab_size // 2, (seq_len - 2 * num_pairs) // 2
    weight = [power_a * (g + 1) ** (power_a - 1) for g in range(space)]

    def without_replacement(pool, weights):
        picked = []
        for _ in range(num_pairs):
            left = [(item, w) for item, w in zip(pool, weights, strict=True) if item not in picked]
            u = rng.random() * sum(w for _, w in left)
            chosen, total = left[-1][0], 0.0
            for candidate, w in left:
                total += w
                if u < total:
                    chosen = candidate
                    break
            picked.append(chosen)
        return picked

    ids, labels, all_gaps = [], [], []
    for _ in range(count):
        keys = without_replacement(list(range(1, half)), [1.0] * (half - 1))
        values = without_replacement(list(range(half, vocab_size)), [1.0] * (vocab_size - half))
        gaps = without_replacement(list(range(space)), weight)
        row, label = list(rng.integers(0, vocab_size, size=seq_len)), [-100] * seq_len
        for i in range(num_pairs):
            row[2 * i], row[2 * i + 1] = keys[i], values[i]
            query = 2 * num_pairs + 2 * gaps[i]
            row[query], label[query + 1] = keys[i], values[i]
        ids.append(row), labels.append(label), all_gaps.append(gaps)
    return np.array(ids), np.array(labels), np.array(all_gaps)


def gaps_of(queries: np.ndarray) -> np.ndarray:
    return (queries - 2 * PAIRS) // 2


@pytest.mark.parametrize(
    ("vocab_size", "seq_len", "pairs", "power_a", "seed"),
    [(VOCAB, SEQ_LEN, PAIRS, 0.01, 0), (64, 32, 4, 0.01, 7), (100, 64, 16, 1.0, 3), (8192, 256, 32, 0.5, 1234)],
)
def test_a_seed_gives_zoologys_own_examples(vocab_size, seq_len, pairs, power_a, seed):
    lay = zoology(vocab_size=vocab_size, seq_len=seq_len, num_pairs=pairs, power_a=power_a)
    generated = generate(lay, 40, seed)
    inputs, shifted = transcribed_zoology(vocab_size, 40, seq_len, seed, power_a, pairs)
    assert np.array_equal(generated.ids, inputs.numpy())
    labels = answer_labels(lay, generated)(torch.as_tensor(generated.ids))
    assert torch.equal(labels[:, 1:], shifted[:, :-1]) and (labels[:, 0] == -100).all()
    assert (shifted[:, -1] == -100).all()  # nothing is lost to the shift


def test_pairs_queries_labels_and_filler_follow_the_procedure():
    lay = zoology()
    generated = generate(lay, 500, seed=11)
    ids, queries = generated.ids, generated.queries
    keys, values = ids[:, 0 : 2 * PAIRS : 2], ids[:, 1 : 2 * PAIRS : 2]
    assert ((keys >= 1) & (keys < VOCAB // 2)).all() and ((values >= VOCAB // 2) & (values < VOCAB)).all()
    assert all(len(set(k)) == PAIRS and len(set(v)) == PAIRS for k, v in zip(keys, values, strict=True))
    # Pair i is queried once, at an even offset 2 * gap of the region after the pairs.
    assert np.array_equal(np.take_along_axis(ids, queries, axis=1), keys)
    assert all(len(set(q)) == PAIRS for q in queries)
    assert ((queries >= 2 * PAIRS) & (queries <= SEQ_LEN - 2) & (queries % 2 == 0)).all()
    labels = answer_labels(lay, generated)(torch.as_tensor(ids)).numpy()
    expected = np.full_like(ids, -100)
    np.put_along_axis(expected, queries + 1, values, axis=1)
    assert np.array_equal(labels, expected)
    # Everything else is uniform over the whole vocabulary, id 0 and the keys and values included.
    filler = np.ones_like(ids, dtype=bool)
    filler[:, : 2 * PAIRS] = False
    np.put_along_axis(filler, queries, False, axis=1)
    assert set(np.unique(ids[filler]).tolist()) == set(range(VOCAB))
    assert abs(ids[filler].mean() - (VOCAB - 1) / 2) < 1.0
    # The token after a query key is filler, not the value (equal by chance 1 time in VOCAB).
    assert (np.take_along_axis(ids, queries + 1, axis=1) == values).mean() < 0.02
    # Filler repeats pair keys at even positions of the query region that are not queries (no label there).
    region = np.zeros_like(filler)
    region[:, 2 * PAIRS :: 2] = True
    repeats = filler & region & (ids[:, :, None] == keys[:, None, :]).any(-1)
    assert repeats.any() and (labels[:, 1:][repeats[:, :-1]] == -100).all()


def test_generation_is_deterministic_in_the_seed():
    first, again, other = (generate(zoology(), 20, seed) for seed in (5, 5, 6))
    assert np.array_equal(first.ids, again.ids) and np.array_equal(first.queries, again.queries)
    assert not np.array_equal(first.ids, other.ids) and not np.array_equal(first.queries, other.queries)


def power_law(power_a: float) -> np.ndarray:
    """Zoology's gap probabilities, from its formula: p(g) ~ power_a * (g + 1) ** (power_a - 1), g < SPACE."""
    weights = np.array([power_a * (g + 1) ** (power_a - 1) for g in range(SPACE)])
    return weights / weights.sum()


@pytest.mark.parametrize("power_a", [0.01, 1.0])
def test_gaps_follow_the_power_law(power_a):
    count = 3000
    gaps = gaps_of(generate(zoology(power_a=power_a), count, seed=21).queries)  # [count, K], pair i in column i
    _, _, plain = plain_examples(VOCAB, SEQ_LEN, PAIRS, power_a, count, seed=22)
    # The first draw (pair 1's gap) is distributed as p itself.
    p = power_law(power_a)
    g = np.arange(SPACE)
    mean, sd = (g * p).sum(), np.sqrt(((g - (g * p).sum()) ** 2 * p).sum())
    for first in (gaps[:, 0], plain[:, 0]):
        assert abs(first.mean() - mean) < 5 * sd / np.sqrt(count)
        assert abs((first == 0).mean() - p[0]) < 5 * np.sqrt(p[0] * (1 - p[0]) / count)
    # Later draws, without replacement: compare each pair's mean gap with the plain statement's.
    for column in range(PAIRS):
        a, b = gaps[:, column], plain[:, column]
        assert abs(a.mean() - b.mean()) < 5 * np.sqrt((a.var() + b.var()) / count)
    if power_a == 1.0:  # uniform: every slot is a query with probability K / SPACE, pair 1's gap has mean (S-1)/2
        assert abs(mean - (SPACE - 1) / 2) < 1e-9
        occupied = np.zeros(SPACE)
        np.add.at(occupied, gaps.ravel(), 1)
        share = PAIRS / SPACE
        assert np.abs(occupied / count - share).max() < 5 * np.sqrt(share * (1 - share) / count)
    else:  # the power law asks the first pairs first, and mostly close to the pairs
        assert gaps[:, 0].mean() < gaps[:, -1].mean() and mean < (SPACE - 1) / 4


def test_recipe_data_trains_on_the_answers_only_and_looks_rows_up_in_any_order():
    config = DataConfig(
        source=DataSource.mqar,
        seq_len=SEQ_LEN,
        mqar=MqarConfig(
            layout=LayoutKind.zoology, vocab_size=VOCAB, num_pairs=PAIRS, train_examples=30, val_examples=6
        ),
    )
    tokenizer, packed = prepare_data(config, seed=0)
    assert len(packed.train) == 30 and len(packed.val) == 6
    train, val = (torch.as_tensor(np.asarray(split["input_ids"])) for split in (packed.train, packed.val))
    mixed = torch.cat([val[[3, 1]], train[[17, 0, 17]]])
    labels = packed.labels(mixed)
    assert ((labels != -100).sum(1) == PAIRS).all()  # no filler targets
    expected = generate(zoology(), 30, seed=0)
    alone = answer_labels(zoology(), expected)(torch.as_tensor(expected.ids))
    assert torch.equal(labels[2:], alone[[17, 0, 17]])
    changed = train[:2].clone()
    changed[1, -1] = (changed[1, -1] + 1) % VOCAB
    with pytest.raises(ValueError, match="only for the rows generated"):
        packed.labels(changed)
    with pytest.raises(ValueError, match="cannot be read off the tokens"):
        mqar_labels(zoology(), train)
    assert len(tokenizer) == VOCAB and tokenizer.eos_token_id == 0
    assert tokenizer.convert_ids_to_tokens([1, VOCAB // 2 - 1, VOCAB // 2, VOCAB - 1]) == ["k0", "k126", "v0", "v127"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"seq_len": 127}, "data.seq_len=127 must be even"),
        ({"seq_len": 30}, r"seq_len >= 4 \* num_pairs = 32"),
        ({"vocab_size": 128}, "data.mqar.vocab_size=128 must exceed data.seq_len=128"),
        ({"power_a": 0.0}, "data.mqar.power_a=0.0 must be > 0"),
        ({"filler_targets": True}, "data.mqar.filler_targets=true"),
    ],
)
def test_invalid_settings_name_the_field_and_the_fix(overrides, message):
    with pytest.raises(ValueError, match=message):
        generate_examples(zoology(**overrides), 1, 0)


def test_filler_targets_default_per_layout():
    assert zoology().filler_targets is False and zoology(filler_targets=False).filler_targets is False
    assert MqarLayout(MqarConfig(), 256).filler_targets is True
    assert MqarLayout(MqarConfig(filler_targets=False), 256).filler_targets is False


class Oracle(torch.nn.Module):
    """Answers at every even position of the query region that holds a pair key (the queries and the filler
    copies of keys alike, as a model reading the tokens would), or a wrong value."""

    def __init__(self, wrong: bool):
        super().__init__()
        self.wrong = wrong
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, ids: torch.Tensor) -> SimpleNamespace:
        logits = torch.zeros(*ids.shape, VOCAB)
        for b, row in enumerate(ids.tolist()):
            value_of = dict(zip(row[0 : 2 * PAIRS : 2], row[1 : 2 * PAIRS : 2], strict=True))
            for t in range(2 * PAIRS, SEQ_LEN, 2):
                if row[t] in value_of:
                    logits[b, t, (value_of[row[t]] + int(self.wrong)) % VOCAB] = 1.0
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize(("wrong", "accuracy"), [(False, 1.0), (True, 0.0)])
def test_evaluate_mqar_counts_the_zoology_queries(wrong, accuracy):
    result = evaluate_mqar(Oracle(wrong), zoology().config, SEQ_LEN, examples=10, batch_size=4)
    assert result.queries == 10 * PAIRS and result.accuracy == accuracy


def test_the_recipe_composes_with_the_mqar_experiments(compose_recipe):
    cfg = compose_recipe(["experiment=mqar_A", "data=mqar_zoology"])
    assert cfg.data.source == DataSource.mqar and cfg.data.seq_len == 64
    assert cfg.data.mqar.layout == LayoutKind.zoology and cfg.data.mqar.vocab_size == 128
    assert cfg.data.mqar.num_pairs == PAIRS and cfg.data.mqar.power_a == 0.01
