"""Eidetic selection (DESIGN §2.4) against a plain-Python statement of the rule."""

from __future__ import annotations

import pytest
import torch

from bmojo.model.memory import select_memory


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
