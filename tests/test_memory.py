"""Eidetic selection (DESIGN §2.4) against a plain-Python statement of the rule, and its numerics in bf16."""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
from test_model import tiny_config

import bmojo.model.attention as attention_module
from bmojo import BmojoForCausalLM
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
    torch.manual_seed(0)
    predictor = InnovationPredictor(6, rank=None)
    h, s_prev = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    err = h.double() - s_prev.double() @ predictor.proj.weight.double().T
    expected = (err**2).sum(-1) / ((h.double() ** 2).sum(-1) + 1e-6)
    iota, aux = innovation_scores(predictor, h, s_prev, 1e-6)
    # fp32 results against fp64: fp32 tolerances (fp64's would fail a third of random draws).
    torch.testing.assert_close(iota.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(aux.double(), (err**2).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(innovation_ratio(predictor, h, s_prev, 1e-6).double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("rank", [None, 3])
@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "bf16-autocast"])
def test_innovation_is_computed_in_fp32_from_bf16_inputs_and_weights(rank, autocast):
    # A predictor close to the least-squares one: h = P s + small noise, so h - P s cancels most of h.
    generator = torch.Generator().manual_seed(5)
    predictor = InnovationPredictor(16, rank=rank).to(torch.bfloat16)
    s_prev = torch.randn(2, 7, 16, generator=generator).to(torch.bfloat16)
    with torch.no_grad():
        h = (predictor(s_prev) + 0.01 * torch.randn(2, 7, 16, generator=generator)).to(torch.bfloat16)
    h.requires_grad_()
    prediction = s_prev.double()
    for weight in predictor.parameters():  # in layer order (low rank: P = W_1 W_0)
        prediction = prediction @ weight.detach().double().T
    err = h.detach().double() - prediction
    expected = (err**2).sum(-1) / ((h.detach().double() ** 2).sum(-1) + 1e-6)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        iota, aux = innovation_scores(predictor, h, s_prev, 1e-6)
        decoded = innovation_ratio(predictor, h, s_prev, 1e-6)
    assert iota.dtype == decoded.dtype == aux.dtype == torch.float32
    assert float(expected.min()) < 0.01  # the cancellation bf16 would get wrong
    for got in (iota, decoded):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(aux.double(), (err**2).mean(), rtol=1e-5, atol=0)
    aux.backward()
    assert h.grad is None  # the inputs are detached: the aux loss trains only the predictor
    for weight in predictor.parameters():
        assert weight.grad is not None and weight.grad.dtype == torch.bfloat16 and bool(weight.grad.abs().sum() > 0)


# Blocks of 8 tokens, 2 candidates each, 6 memory slots, 7 complete blocks: at this threshold the ratios of an
# untrained model (about 1, as its predictor predicts little) straddle it, so candidates are accepted and
# rejected, and more are accepted than the memory holds. Ratios this close together make bf16 rounding of the
# innovation decide between candidates. The two paths also round the SSM's output differently in bf16 (about
# 1e-3 in the ratios), which fp32 innovation cannot undo; the sequence here keeps clear of that.
BLOCK, TOPK, MEMORY_SIZE, LENGTH, THRESHOLD = 8, 2, 6, 60, 1.04


def parallel_memories(model: BmojoForCausalLM, ids: torch.Tensor, monkeypatch) -> list[list[list[list[int]]]]:
    """The positions each B layer's parallel pass gives each query block to read: [layer][block][row]."""
    calls = []
    original = attention_module.bmojo_attention

    def recording(q, k, v, **kwargs):
        calls.append((kwargs["mem_pos"], kwargs["mem_valid"]))
        return original(q, k, v, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(attention_module, "bmojo_attention", recording)
        model(ids, use_cache=False)
    rows = range(ids.shape[0])
    return [[[pos[b, c][valid[b, c]].tolist() for b in rows] for c in range(pos.shape[1])] for pos, valid in calls]


def decoded_memories(model: BmojoForCausalLM, ids: torch.Tensor) -> list[list[list[list[int]]]]:
    """The same from the cache's memory FIFOs while decoding token by token, as each block starts."""
    rows = range(ids.shape[0])
    cache = None
    memories = None
    for t in range(ids.shape[1]):
        cache = model(ids[:, t : t + 1], cache=cache, use_cache=True).cache
        if memories is None:
            memories = [[[[] for _ in rows]] for _ in cache.states]  # block 0 reads an empty memory
        if (t + 1) % BLOCK == 0:
            for layer, memory in enumerate(state.memory for state in cache.states):
                memories[layer].append([memory.positions[b][memory.valid[b]].tolist() for b in rows])
    return memories


@pytest.mark.parametrize("precision", ["bf16-weights", "bf16-autocast"])
def test_bf16_decoding_selects_the_memory_the_parallel_pass_selects(precision, monkeypatch):
    config = tiny_config(
        "B", layers=3, window_size=BLOCK, memory_size=MEMORY_SIZE, memory_topk=TOPK, memory_threshold=THRESHOLD
    )
    torch.manual_seed(1)
    model = BmojoForCausalLM(config).eval()
    if precision == "bf16-weights":
        model = model.to(torch.bfloat16)
    ids = torch.randint(0, 97, (2, LENGTH), generator=torch.Generator().manual_seed(11))
    autocast = precision == "bf16-autocast"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        parallel = parallel_memories(model, ids, monkeypatch)
        decoded = decoded_memories(model, ids)
    mismatches = [
        (layer, block, row, parallel[layer][block][row], memory[row])
        for layer, blocks in enumerate(decoded)
        for block, memory in enumerate(blocks)
        for row in range(ids.shape[0])
        if parallel[layer][block][row] != memory[row]
    ]
    assert not mismatches, f"(layer, block, row, parallel, decoded): {mismatches}"
    assert len(decoded[0]) == LENGTH // BLOCK + 1  # every block start was compared
    # A block's accepted tokens (at most k <= M) are all in the next block's memory, so the memories of a row
    # hold, together, every token accepted in a complete block.
    accepted_per_block = []  # per layer and row
    for layer_memories in parallel:
        for row in range(ids.shape[0]):
            accepted = Counter(p // BLOCK for p in set().union(*(memory[row] for memory in layer_memories)))
            accepted_per_block.append([accepted[b] for b in range(LENGTH // BLOCK)])
    assert all(sum(counts) > 0 for counts in accepted_per_block)
    assert any(min(counts) < TOPK for counts in accepted_per_block), "some candidates should be rejected"
    assert any(sum(counts) > MEMORY_SIZE for counts in accepted_per_block), "some memory should evict"
