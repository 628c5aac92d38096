"""Multi-query associative recall (MQAR) with the key-value pairs placed beyond the attention window.

Each example of ``seq_len`` tokens is laid out as

    k_1 v_1 ... k_K v_K | filler (``gap`` tokens) | filler with the K keys queried once each, in random order

The first query comes ``gap`` tokens after the last pair, so with ``gap`` at least the window every pair has
left the window of a sliding-window model before it is asked for. At a query key the next-token target is
its value (as in Zoology's MQAR); the token fed after the key is the filler again, so the value never
re-enters the context. Keys, values and filler use disjoint vocabularies. Accuracy counts the answers only;
training also predicts the filler by default (``filler_targets``, see :func:`mqar_training_labels`).

The filler is either ``periodic`` (``f_{t mod period}``) or ``noise`` (uniform random filler tokens, as
surprising as the pairs). Queries sit at even positions (for an even gap), so with the default period of 2
every periodic filler token follows from the kind of token before it (``f_1`` after a query key, ``f_0``
after a pair's value or ``f_1``, ``f_1`` after ``f_0``): the fading memory predicts all of it, and an
innovation-selected memory keeps just the pairs and the query keys, 3K tokens. With a longer period the token
after a query depends on the filler two steps back, which is harder to predict.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import partial

import datasets
import numpy as np
import torch

IGNORE_INDEX = -100
HELD_OUT_SEED_OFFSET = 1_000_003  # the held-out split draws from another stream than training


class Filler(Enum):
    periodic = "periodic"  # f_{t mod period}: predictable from the token before
    noise = "noise"  # uniform random filler tokens


@dataclass
class MqarConfig:
    """The ``data.mqar`` section of a recipe (``data.source=mqar``; the length is ``data.seq_len``)."""

    num_pairs: int = 16  # K: key-value pairs per example, each queried once
    num_keys: int = 64  # key vocabulary; keys are distinct within an example
    num_values: int = 64  # value vocabulary
    num_filler: int = 16  # filler vocabulary (noise draws from all of it)
    filler: Filler = Filler.periodic
    period: int = 2  # the periodic filler cycles through the first `period` filler tokens
    filler_targets: bool = True  # also train next-token prediction of the filler (accuracy counts answers only)
    gap: int = 64  # filler tokens between the last pair and the query region
    train_examples: int = 20000
    val_examples: int = 256


@dataclass(frozen=True)
class MqarLayout:
    """Token ids and positions of one MQAR configuration. Id 0 is end of text, then keys, values, filler."""

    config: MqarConfig
    seq_len: int

    @property
    def first_key(self) -> int:
        return 1

    @property
    def first_value(self) -> int:
        return 1 + self.config.num_keys

    @property
    def first_filler(self) -> int:
        return self.first_value + self.config.num_values

    @property
    def vocab_size(self) -> int:
        return self.first_filler + self.config.num_filler

    @property
    def query_start(self) -> int:
        """First position of the query region."""
        return 2 * self.config.num_pairs + self.config.gap

    def validate(self) -> None:
        cfg = self.config
        if cfg.num_pairs < 1 or cfg.num_keys < cfg.num_pairs or cfg.num_values < 1 or cfg.num_filler < 1:
            raise ValueError(
                f"data.mqar: need 1 <= num_pairs ({cfg.num_pairs}) <= num_keys ({cfg.num_keys}), num_values >= 1 "
                f"and num_filler >= 1 (got {cfg.num_values}, {cfg.num_filler})"
            )
        if cfg.gap < 0:
            raise ValueError(f"data.mqar.gap={cfg.gap} must be >= 0")
        if not 1 <= cfg.period <= cfg.num_filler:
            raise ValueError(f"data.mqar.period={cfg.period} must lie in [1, num_filler={cfg.num_filler}]")
        # A query and its target take two positions, so the region needs room for K of them.
        slots = (self.seq_len - self.query_start) // 2
        if slots < cfg.num_pairs:
            need = self.query_start + 2 * cfg.num_pairs
            raise ValueError(
                f"data.seq_len={self.seq_len} leaves room for {max(slots, 0)} queries but num_pairs={cfg.num_pairs}; "
                f"need seq_len >= {need} (2 * num_pairs + gap + 2 * num_pairs) or fewer pairs / a shorter gap"
            )


def generate_examples(layout: MqarLayout, count: int, seed: int) -> np.ndarray:
    """``count`` examples as an int64 array ``[count, seq_len]`` (deterministic in ``seed``)."""
    layout.validate()
    cfg, length = layout.config, layout.seq_len
    rng = np.random.default_rng(seed)
    positions = np.arange(length)
    if cfg.filler is Filler.periodic:
        ids = np.broadcast_to(layout.first_filler + positions % cfg.period, (count, length)).copy()
    else:
        ids = layout.first_filler + rng.integers(0, cfg.num_filler, size=(count, length))
    # Distinct keys per example: the first K of a random permutation of the key vocabulary.
    keys = layout.first_key + np.argsort(rng.random((count, cfg.num_keys)), axis=1)[:, : cfg.num_pairs]
    values = layout.first_value + rng.integers(0, cfg.num_values, size=(count, cfg.num_pairs))
    ids[:, 0 : 2 * cfg.num_pairs : 2] = keys
    ids[:, 1 : 2 * cfg.num_pairs : 2] = values
    # Queries sit at even offsets of the query region (so a target never lands on another query), K of them.
    slots = (length - layout.query_start) // 2
    chosen = np.sort(np.argsort(rng.random((count, slots)), axis=1)[:, : cfg.num_pairs], axis=1)
    query_pos = layout.query_start + 2 * chosen
    order = np.argsort(rng.random((count, cfg.num_pairs)), axis=1)
    np.put_along_axis(ids, query_pos, np.take_along_axis(keys, order, axis=1), axis=1)
    return ids.astype(np.int64)


def mqar_labels(layout: MqarLayout, input_ids: torch.Tensor) -> torch.Tensor:
    """The answers of ``input_ids [B, T]`` in the model's unshifted label convention: ``[B, T]``, -100 except
    one step after each query key, where the label is that key's value (read from the pairs at the start)."""
    num_pairs = layout.config.num_pairs
    keys, values = input_ids[:, 0 : 2 * num_pairs : 2], input_ids[:, 1 : 2 * num_pairs : 2]
    value_of = torch.zeros(input_ids.shape[0], layout.vocab_size, dtype=input_ids.dtype, device=input_ids.device)
    value_of.scatter_(1, keys, values)
    is_key = (input_ids >= layout.first_key) & (input_ids < layout.first_value)
    is_query = is_key & (torch.arange(input_ids.shape[1], device=input_ids.device) >= layout.query_start)
    targets = value_of.gather(1, input_ids.clamp(max=layout.vocab_size - 1))
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, 1:] = torch.where(is_query[:, :-1], targets[:, :-1], IGNORE_INDEX)
    return labels


def mqar_training_labels(layout: MqarLayout, input_ids: torch.Tensor) -> torch.Tensor:
    """The answers plus, with ``filler_targets``, every filler token as the target of the token before it.

    Trained to predict the filler, a model keeps its hidden states at the filler regular, so a fading memory
    can predict them in every layer; without that target nothing constrains them, and in the second layer
    they vary with whatever attention picked up, which the innovation test reads as surprise.
    """
    labels = mqar_labels(layout, input_ids)
    if not layout.config.filler_targets:
        return labels
    is_filler = input_ids >= layout.first_filler
    return torch.where(is_filler & (labels == IGNORE_INDEX), input_ids, labels)


def mqar_tokenizer(layout: MqarLayout):
    """A word-level tokenizer over the MQAR symbols (``k3 v17 f0 ...``), end of text at id 0."""
    # Imported here because bmojo.data.config imports this module and the tokenizer module imports config.
    from tokenizers import Tokenizer, models, pre_tokenizers

    from bmojo.data.tokenizer import END_OF_TEXT, _wrap

    cfg = layout.config
    symbols = [END_OF_TEXT] + [f"k{i}" for i in range(cfg.num_keys)] + [f"v{i}" for i in range(cfg.num_values)]
    symbols += [f"f{i}" for i in range(cfg.num_filler)]
    tokenizer = Tokenizer(models.WordLevel({s: i for i, s in enumerate(symbols)}, unk_token=END_OF_TEXT))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([END_OF_TEXT])
    return _wrap(tokenizer)


def mqar_dataset(layout: MqarLayout, count: int, seed: int) -> datasets.Dataset:
    """``count`` examples as a dataset with one ``input_ids`` column (numpy format), like packed text."""
    ids = generate_examples(layout, count, seed)
    return datasets.Dataset.from_dict({"input_ids": ids}).with_format("numpy")


def prepare_mqar(config: MqarConfig, seq_len: int, seed: int, tokenizer=None):
    """Training and held-out MQAR examples as :class:`bmojo.data.PackedData` (its labels: the answers, and the
    filler with ``filler_targets``) and the tokenizer (``tokenizer`` when given, e.g. on resume)."""
    from bmojo.data.packing import PackedData  # imported here for the same reason as in mqar_tokenizer

    layout = MqarLayout(config, seq_len)
    layout.validate()
    train = mqar_dataset(layout, config.train_examples, seed=seed)
    val = mqar_dataset(layout, config.val_examples, seed=seed + HELD_OUT_SEED_OFFSET)
    labels = partial(mqar_training_labels, layout)
    packed = PackedData(train, val, seq_len, (len(train) + len(val)) * seq_len, label_fn=labels)
    return tokenizer or mqar_tokenizer(layout), packed
