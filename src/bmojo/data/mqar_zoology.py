"""Zoology's multi-query associative recall (``data.mqar.layout=zoology``).

Generated as ``multiquery_ar`` in HazyResearch/zoology's ``zoology/data/multiquery_ar.py`` generates it, with
its defaults ``num_passes=1`` and ``random_non_queries=True``. For vocabulary V, length T and K pairs:

- keys: K distinct ids of [1, V // 2); values: K distinct ids of [V // 2, V), drawn per example (its lines
  98-106). Id 0 is never a key or a value;
- the pairs first, ``k_1 v_1 ... k_K v_K`` (lines 109-111);
- then the query region [2K, T): key i is queried at 2K + 2 g_i, where g_1, ..., g_K are K distinct gaps of
  [0, S), S = (T - 2K) / 2, drawn one after the other without replacement with probability proportional to
  ``power_a * (g + 1) ** (power_a - 1)`` (lines 115-124; ``power_a=1`` is uniform). Draw i goes to pair i,
  so with ``power_a < 1`` the first pairs tend to be asked first, as in Zoology;
- every other position (the filler): uniform over the whole vocabulary [0, V), keys and values included
  (line 137). The token after a query key is filler too: the value is never fed back;
- the target: the value of key i, as the next token of its query (lines 130-133). In this framework's
  unshifted labels it sits one step later, at 2K + 2 g_i + 1; everything else is -100 (no filler targets).

A seed gives Zoology's examples exactly: keys, values and gaps come from ``np.random.RandomState(seed)`` (the
stream of Zoology's ``np.random.seed(seed)``, line 92) in Zoology's order of calls (every example's keys,
then every example's values, then every example's gaps), and the filler from torch's generator seeded with
``seed`` (Zoology draws it from torch's global generator, which it leaves as it finds it: seeded with
``torch.manual_seed(seed)`` its examples are these). Those draws run one example at a time, about 0.1 ms an
example, because that is what reproduces the stream.

The filler draws keys too, so a filler token can repeat a pair's key, even at an even position of the query
region, without being a query (it has no target in Zoology either): the answers cannot be read off the
tokens, so :func:`zoology_examples` returns the query positions with the examples.
"""

from __future__ import annotations

import numpy as np
import torch


def gap_probabilities(seq_len: int, num_pairs: int, power_a: float) -> np.ndarray:
    """``[S]``: the probability of each gap g in [0, S), S = (seq_len - 2 * num_pairs) // 2 (Zoology's 115-117)."""
    space = (seq_len - 2 * num_pairs) // 2
    # Zoology's expression term by term (the leading power_a cancels): its draws depend on the last bit of p.
    weights = power_a * np.arange(1, space + 1) ** (power_a - 1)
    return weights / weights.sum()


def zoology_problems(vocab_size: int, seq_len: int, num_pairs: int, power_a: float) -> list[str]:
    """What is wrong with a zoology configuration (Zoology's asserts, lines 88-90), each with its fix."""
    problems = []
    if num_pairs < 1:
        problems.append(f"data.mqar.num_pairs={num_pairs} must be >= 1")
    if seq_len % 2:
        problems.append(f"data.seq_len={seq_len} must be even (queries sit at even offsets): use {seq_len + 1}")
    if seq_len < 4 * num_pairs:
        problems.append(
            f"data.seq_len={seq_len} is too short for num_pairs={num_pairs}: the pairs and their queries need "
            f"seq_len >= 4 * num_pairs = {4 * num_pairs} (or fewer pairs)"
        )
    if vocab_size <= seq_len:
        problems.append(
            f"data.mqar.vocab_size={vocab_size} must exceed data.seq_len={seq_len} (as Zoology asserts): "
            f"set vocab_size >= {seq_len + 1} or shorten seq_len"
        )
    if not power_a > 0:
        problems.append(f"data.mqar.power_a={power_a} must be > 0 (0.01: Zoology's power law, 1: uniform gaps)")
    return problems


def zoology_examples(
    vocab_size: int, seq_len: int, num_pairs: int, power_a: float, count: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` examples ``[count, seq_len]`` (int64) and their query positions ``[count, num_pairs]``, where
    column i is the position of pair i's key in the query region. Deterministic in ``seed`` (< 2**32)."""
    rng = np.random.RandomState(seed)
    half, space = vocab_size // 2, (seq_len - 2 * num_pairs) // 2

    def per_example(draw) -> np.ndarray:
        return np.array([draw() for _ in range(count)], dtype=np.int64).reshape(count, num_pairs)

    # Three passes over the examples, in this order, because that is the order of Zoology's RNG calls.
    keys = per_example(lambda: rng.choice(np.arange(1, half), size=num_pairs, replace=False))
    values = per_example(lambda: rng.choice(np.arange(half, vocab_size), size=num_pairs, replace=False))
    p = gap_probabilities(seq_len, num_pairs, power_a)
    gaps = per_example(lambda: rng.choice(space, size=num_pairs, replace=False, p=p))

    # Zoology fills the whole [count, seq_len] with random tokens and keeps those off the pairs and queries.
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab_size, (count, seq_len), generator=generator).numpy()
    ids[:, 0 : 2 * num_pairs : 2] = keys
    ids[:, 1 : 2 * num_pairs : 2] = values
    query_pos = 2 * num_pairs + 2 * gaps
    np.put_along_axis(ids, query_pos, keys, axis=1)
    return ids, query_pos


class RecordedAnswers:
    """The answer labels of generated rows, found by their tokens, for a layout whose tokens do not tell
    which key is a query (the zoology layout). Called on a batch ``[B, T]`` of those rows (any order, on any
    device), it gives ``[B, T]``: -100 except one step after each query key, where the label is its value.

    A row is found through an integer hash of its tokens and then compared token by token, so the lookup is
    exact; a row that was not generated is an error. Costs one device-to-host sync per call (the check).
    """

    def __init__(self, ids: np.ndarray, queries: np.ndarray, num_pairs: int, ignore_index: int = -100):
        self.ignore_index = ignore_index  # the label the loss skips (bmojo.data.mqar.IGNORE_INDEX)
        self.rows = torch.as_tensor(ids, dtype=torch.int64)  # [N, T]
        self.targets = torch.as_tensor(queries + 1)  # [N, K]: the value is the target one step after its key
        self.values = self.rows[:, 1 : 2 * num_pairs : 2]  # [N, K], pair i's value in column i
        # Weights small enough that no sum of id * weight over a row overflows int64 on any device.
        vocab, length = int(ids.max(initial=0)) + 1, self.rows.shape[1]
        bits = max(62 - vocab.bit_length() - length.bit_length(), 8)
        for salt in range(8):  # two different rows with one hash would hide one of them: draw new weights
            generator = torch.Generator().manual_seed(salt)
            self.weights = torch.randint(1 << bits, (length,), generator=generator)
            hashes, self.order = torch.sort(self._hash(self.rows))
            if len(hashes) < 2 or bool((hashes[1:] != hashes[:-1]).all()):
                break
        else:
            raise ValueError("data.mqar: two generated examples are identical; use another seed")
        self.hashes = hashes
        self._devices: dict[torch.device, list[torch.Tensor]] = {}

    def _hash(self, rows: torch.Tensor) -> torch.Tensor:
        return (rows * self.weights.to(rows.device)).sum(-1)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] != self.rows.shape[1]:
            raise ValueError(f"MQAR answers exist for whole rows of {self.rows.shape[1]} tokens, not {input_ids.shape}")
        device = input_ids.device
        if device not in self._devices:
            self._devices[device] = [
                t.to(device) for t in (self.rows, self.targets, self.values, self.hashes, self.order)
            ]
        rows, targets, values, hashes, order = self._devices[device]
        slot = torch.searchsorted(hashes, self._hash(input_ids)).clamp(max=len(hashes) - 1)
        index = order[slot]
        # index_select, not rows[index]: on CPU the latter takes ~10 ms for 32 rows of a 20000-row table.
        if not bool((rows.index_select(0, index) == input_ids).all()):
            raise ValueError("MQAR answers of the zoology layout exist only for the rows generated with them")
        labels = torch.full_like(input_ids, self.ignore_index)
        return labels.scatter_(1, targets.index_select(0, index), values.index_select(0, index))
