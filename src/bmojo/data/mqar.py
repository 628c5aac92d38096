"""Multi-query associative recall (MQAR): K key-value pairs, then every key queried once, in two layouts.

``data.mqar.layout=zoology`` is Zoology's layout (:mod:`bmojo.data.mqar_zoology`). The default,
``layout=gapped``, places the pairs beyond the attention window: each example of ``seq_len`` tokens is laid out as

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

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import NamedTuple

import datasets
import numpy as np
import torch

from bmojo.data.mqar_zoology import RecordedAnswers, zoology_examples, zoology_problems

IGNORE_INDEX = -100
HELD_OUT_SEED_OFFSET = 1_000_003  # the held-out split draws from another stream than training


class LayoutKind(Enum):
    gapped = "gapped"  # pairs | `gap` filler | the queries among filler; disjoint key/value/filler vocabularies
    zoology = "zoology"  # Zoology's multiquery_ar: power-law gaps, random filler over the whole vocabulary


class Filler(Enum):
    periodic = "periodic"  # f_{t mod period}: predictable from the token before
    noise = "noise"  # uniform random filler tokens


@dataclass
class MqarConfig:
    """The ``data.mqar`` section of a recipe (``data.source=mqar``; the length is ``data.seq_len``). The gapped
    layout ignores the zoology fields and the zoology layout the gapped ones."""

    layout: LayoutKind = LayoutKind.gapped
    num_pairs: int = 16  # K: key-value pairs per example, each queried once
    num_keys: int = 64  # key vocabulary; keys are distinct within an example
    num_values: int = 64  # value vocabulary
    num_filler: int = 16  # filler vocabulary (noise draws from all of it)
    filler: Filler = Filler.periodic
    period: int = 2  # the periodic filler cycles through the first `period` filler tokens
    # Also train next-token prediction of the filler (accuracy counts answers only). None: the layout's
    # choice, on for gapped (its filler is predictable) and off for zoology (uniform random filler, as in
    # Zoology; true is refused there).
    filler_targets: bool | None = None
    gap: int = 64  # filler tokens between the last pair and the query region
    train_examples: int = 20000
    val_examples: int = 256
    # zoology only: keys from [1, V/2), values from [V/2, V), filler from [0, V); Zoology's default V is 8192
    vocab_size: int = 8192
    power_a: float = 0.01  # gap g drawn with probability ~ (g + 1) ** (power_a - 1): 0.01 Zoology's, 1 uniform


@dataclass(frozen=True)
class MqarLayout:
    """Token ids and positions of one MQAR configuration. Gapped: id 0 is end of text, then keys, values,
    filler. Zoology: Zoology's own ids, keys [1, V/2), values [V/2, V), filler anywhere in [0, V); id 0, which
    only the filler draws there, is also the tokenizer's end of text."""

    config: MqarConfig
    seq_len: int

    @property
    def zoology(self) -> bool:
        return self.config.layout is LayoutKind.zoology

    @property
    def first_key(self) -> int:
        return 1

    @property
    def first_value(self) -> int:
        return self.config.vocab_size // 2 if self.zoology else 1 + self.config.num_keys

    @property
    def first_filler(self) -> int:
        return 0 if self.zoology else self.first_value + self.config.num_values

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size if self.zoology else self.first_filler + self.config.num_filler

    @property
    def query_start(self) -> int:
        """First position of the query region."""
        return 2 * self.config.num_pairs + (0 if self.zoology else self.config.gap)

    @property
    def filler_targets(self) -> bool:
        """``filler_targets`` resolved: None is on for gapped, off for zoology."""
        return not self.zoology if self.config.filler_targets is None else self.config.filler_targets

    def validate(self) -> None:
        cfg = self.config
        if self.zoology:
            problems = zoology_problems(cfg.vocab_size, self.seq_len, cfg.num_pairs, cfg.power_a)
            if cfg.filler_targets:
                problems.append(
                    "data.mqar.filler_targets=true: the zoology filler is uniform random, nothing to learn; "
                    "leave it unset (null) or false"
                )
            if problems:
                raise ValueError("data.mqar (layout=zoology): " + "; ".join(problems))
            return
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


class Generated(NamedTuple):
    """Generated examples and, where the tokens do not tell, where their queries are."""

    ids: np.ndarray  # [N, T] int64
    queries: np.ndarray | None  # zoology: [N, K], column i the position of pair i's query; gapped: None


def generate(layout: MqarLayout, count: int, seed: int) -> Generated:
    """``count`` examples of ``layout`` (deterministic in ``seed``)."""
    layout.validate()
    cfg = layout.config
    if layout.zoology:
        return Generated(*zoology_examples(cfg.vocab_size, layout.seq_len, cfg.num_pairs, cfg.power_a, count, seed))
    return Generated(_gapped_examples(layout, count, seed), None)


def generate_examples(layout: MqarLayout, count: int, seed: int) -> np.ndarray:
    """``count`` examples as an int64 array ``[count, seq_len]`` (deterministic in ``seed``)."""
    return generate(layout, count, seed).ids


def _gapped_examples(layout: MqarLayout, count: int, seed: int) -> np.ndarray:
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


def answer_labels(layout: MqarLayout, *generated: Generated) -> Callable[[torch.Tensor], torch.Tensor]:
    """The answer labels ``[B, T]`` of any batch ``[B, T]`` of the rows of ``generated``: read off the tokens for
    the gapped layout (:func:`mqar_labels`), looked up for zoology (:class:`RecordedAnswers`)."""
    if not layout.zoology:
        return partial(mqar_labels, layout)
    ids = np.concatenate([g.ids for g in generated])
    queries = np.concatenate([g.queries for g in generated])
    return RecordedAnswers(ids, queries, layout.config.num_pairs, IGNORE_INDEX)


def mqar_labels(layout: MqarLayout, input_ids: torch.Tensor) -> torch.Tensor:
    """The answers of ``input_ids [B, T]`` in the model's unshifted label convention: ``[B, T]``, -100 except
    one step after each query key, where the label is that key's value (read from the pairs at the start).
    Gapped layout only: a zoology filler token can repeat a key, so its answers come from :func:`answer_labels`."""
    if layout.zoology:
        raise ValueError("the zoology layout's answers cannot be read off the tokens: use answer_labels(layout, ...)")
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


def mqar_training_labels(
    layout: MqarLayout, input_ids: torch.Tensor, answers: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """The answers (``answers(input_ids)``, by default :func:`mqar_labels`) plus, with ``filler_targets``
    (gapped only), every filler token as the target of the token before it: ``[B, T]``.

    Trained to predict the filler, a model keeps its hidden states at the filler regular, so a fading memory
    can predict them in every layer; without that target nothing constrains them, and in the second layer
    they vary with whatever attention picked up, which the innovation test reads as surprise.
    """
    labels = (answers or partial(mqar_labels, layout))(input_ids)
    if not layout.filler_targets:
        return labels
    is_filler = input_ids >= layout.first_filler
    return torch.where(is_filler & (labels == IGNORE_INDEX), input_ids, labels)


def mqar_tokenizer(layout: MqarLayout):
    """A word-level tokenizer over the MQAR symbols (``k3 v17 f0 ...``), end of text at id 0."""
    # Imported here because bmojo.data.config imports this module and the tokenizer module imports config.
    from tokenizers import Tokenizer, models, pre_tokenizers

    from bmojo.data.tokenizer import END_OF_TEXT, _wrap

    cfg = layout.config
    if layout.zoology:  # no filler symbols: Zoology's filler is any id, so it reads as keys, values or id 0
        keys, values, filler = layout.first_value - 1, layout.vocab_size - layout.first_value, 0
    else:
        keys, values, filler = cfg.num_keys, cfg.num_values, cfg.num_filler
    symbols = [END_OF_TEXT] + [f"k{i}" for i in range(keys)] + [f"v{i}" for i in range(values)]
    symbols += [f"f{i}" for i in range(filler)]
    tokenizer = Tokenizer(models.WordLevel({s: i for i, s in enumerate(symbols)}, unk_token=END_OF_TEXT))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([END_OF_TEXT])
    return _wrap(tokenizer)


def _dataset(ids: np.ndarray) -> datasets.Dataset:
    """Examples as a dataset with one ``input_ids`` column (numpy format), like packed text."""
    return datasets.Dataset.from_dict({"input_ids": ids}).with_format("numpy")


def prepare_mqar(config: MqarConfig, seq_len: int, seed: int, tokenizer=None):
    """Training and held-out MQAR examples as :class:`bmojo.data.PackedData` (its labels: the answers, and the
    filler with ``filler_targets``) and the tokenizer (``tokenizer`` when given, e.g. on resume)."""
    from bmojo.data.packing import PackedData  # imported here for the same reason as in mqar_tokenizer

    layout = MqarLayout(config, seq_len)
    train = generate(layout, config.train_examples, seed=seed)
    val = generate(layout, config.val_examples, seed=seed + HELD_OUT_SEED_OFFSET)
    labels = partial(mqar_training_labels, layout, answers=answer_labels(layout, train, val))
    tokens = (len(train.ids) + len(val.ids)) * seq_len
    packed = PackedData(_dataset(train.ids), _dataset(val.ids), seq_len, tokens, label_fn=labels)
    return tokenizer or mqar_tokenizer(layout), packed
