"""Eidetic selection (DESIGN §2.4) against a plain-Python statement of the rule."""

from __future__ import annotations

import pytest
import torch

from bmojo.model.memory import (
    InnovationPredictor,
    MemoryFIFO,
    innovation_ratio,
    innovation_scores,
    select_memory,
)


def reference_memory(scores: list[float], block: int, topk: int, threshold: float, size: int, query_blocks: int):
    """For each query block c, the positions of the last ``size`` accepted tokens of blocks < c (oldest first)."""
    stream_by_block = []
    for start in range(0, len(scores), block):
        members = range(start, min(start + block, len(scores)))
        best = sorted(members, key=lambda p: (-scores[p], p))[:topk]  # ties to the earlier position
        stream_by_block.append(sorted(p for p in best if scores[p] > threshold))
    memories = []
    for c in range(query_blocks):
        stream = [p for chosen in stream_by_block[:c] for p in chosen]
        memories.append(stream[-size:])
    return memories


@pytest.mark.parametrize(
    "length,block,topk,threshold,size", [(45, 8, 2, 0.0, 6), (40, 5, 3, 0.5, 4), (7, 8, 2, 0.3, 3)]
)
def test_select_memory_matches_the_rule(length, block, topk, threshold, size):
    generator = torch.Generator().manual_seed(length)
    # Few distinct values force ties; values straddle the threshold so some candidates are rejected.
    iota = torch.randint(0, 5, (3, length), generator=generator).float() / 4
    query_blocks = length // block + 1
    positions, valid = select_memory(
        iota, block=block, topk=topk, threshold=threshold, memory_size=size, num_query_blocks=query_blocks
    )
    assert positions.shape == valid.shape == (3, query_blocks, size)
    for b in range(3):
        expected = reference_memory(iota[b].tolist(), block, topk, threshold, size, query_blocks)
        for c in range(query_blocks):
            got = positions[b, c][valid[b, c]].tolist()
            assert got == expected[c], (b, c)
            # Valid entries are packed at the newest end, so the oldest slots are the ones left empty.
            assert valid[b, c].tolist() == [False] * (size - len(got)) + [True] * len(got)


def test_boring_blocks_do_not_push_remembered_tokens_out():
    iota = torch.zeros(1, 32)
    iota[0, 3] = 2.0  # one surprising token in block 0, then three blocks below the threshold
    positions, valid = select_memory(iota, block=8, topk=2, threshold=0.5, memory_size=2, num_query_blocks=5)
    for c in range(1, 5):
        assert positions[0, c][valid[0, c]].tolist() == [3]
    assert not valid[0, 0].any()


def test_memory_fifo_push_matches_the_rule_per_row():
    batch, size, block, topk, heads, dim = 3, 5, 6, 3, 2, 4
    generator = torch.Generator().manual_seed(0)
    # Rows start with 0, 2 and 5 entries (valid slots are the newest, at the end).
    filled = [0, 2, size]
    valid = torch.tensor([[slot >= size - n for slot in range(size)] for n in filled])
    positions = torch.randint(0, 100, (batch, size), generator=generator) * valid
    keys = torch.randn(batch, heads, size, dim, generator=generator)
    values = torch.randn(batch, heads, size, dim, generator=generator)
    # Per row, the plain rule: a list of (position, key, value), oldest first, cut to the last ``size``.
    expected = [
        [(int(positions[b, i]), keys[b, :, i].clone(), values[b, :, i].clone()) for i in range(size) if valid[b, i]]
        for b in range(batch)
    ]
    fifo, accepted_counts = MemoryFIFO(positions=positions, valid=valid), set()
    for index in range(4):
        start = 100 + index * block
        # Few distinct values force ties; values straddle the threshold, so rows accept different counts.
        scores = torch.randint(0, 5, (batch, block), generator=generator).float() / 4
        block_keys = torch.randn(batch, heads, block, dim, generator=generator)
        block_values = torch.randn(batch, heads, block, dim, generator=generator)
        fifo.push_block(scores, start, topk, 0.5, block_entries=(block_keys, block_values), entries=(keys, values))
        for b in range(batch):
            row = scores[b].tolist()
            best = sorted(range(block), key=lambda p: (-row[p], p))[:topk]  # ties to the earlier position
            accepted = sorted(p for p in best if row[p] > 0.5)
            accepted_counts.add((index, b, len(accepted)))
            entries = expected[b] + [(start + p, block_keys[b, :, p], block_values[b, :, p]) for p in accepted]
            expected[b] = entries[-size:]
    for b in range(batch):
        count = len(expected[b])
        assert fifo.valid[b].tolist() == [False] * (size - count) + [True] * count
        assert fifo.positions[b, size - count :].tolist() == [p for p, _, _ in expected[b]]
        for slot, (_, key, value) in zip(range(size - count, size), expected[b], strict=True):
            assert torch.equal(keys[b, :, slot], key) and torch.equal(values[b, :, slot], value)
    # The rule's hard case: rows of one push that accept different numbers of entries.
    assert any(len({n for i, _, n in accepted_counts if i == index}) > 1 for index in range(4))


def test_innovation_ratio_is_the_unpredicted_share_of_the_input_in_both_paths():
    predictor = InnovationPredictor(6, rank=None)
    h, s_prev = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    err = h.double() - s_prev.double() @ predictor.proj.weight.double().T
    expected = (err**2).sum(-1) / ((h.double() ** 2).sum(-1) + 1e-6)
    iota, aux = innovation_scores(predictor, h, s_prev, 1e-6)
    torch.testing.assert_close(iota.double(), expected)
    torch.testing.assert_close(aux.double(), (err**2).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(innovation_ratio(predictor, h, s_prev, 1e-6).double(), expected)
