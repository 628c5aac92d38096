"""The in-storage eidetic memory of B layers (``store_topk``): its retrieval rule against a plain loop, the
parallel form against token-by-token decoding, gradients through the retrieved entries on every backend."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from optional_packages import require_package
from test_model import SEQ_LEN, VOCAB, assert_backends_agree_on_loss_and_gradients, build, case_id, tiny_config

from bmojo.model import store
from bmojo.model.store import retrieve_parallel
from bmojo.model.store_index import RowIndexes


@pytest.fixture(autouse=True)
def faiss_on_one_thread():
    """faiss searches on one thread here: an OpenMP pool started in the pytest process would be inherited, in
    whatever state, by the ranks that later tests fork (tests/parallel/harness.py)."""
    if importlib.util.find_spec("faiss") is None:
        yield
        return
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def plain_retrieval(query, keys, storable, memory_positions, memory_valid, block, window, topk):
    """The rule of ``retrieve_parallel`` written as loops: for each row and query, the scores of the positions it
    may read (summed over query heads, each reading key head ``h // group``), best first."""
    batch, length, query_heads, _ = query.shape
    group = query_heads // keys.shape[2]
    chosen = []
    for b in range(batch):
        rows = []
        for t in range(length):
            held = {
                int(p) for p, ok in zip(memory_positions[b, t // block], memory_valid[b, t // block], strict=True) if ok
            }
            scored = []
            for p in range(length):
                if p >= (t // block) * block or p >= t - window + 1 or p in held or not storable[b, p]:
                    continue
                score = sum(float(query[b, t, h] @ keys[b, p, h // group]) for h in range(query_heads))
                scored.append((score, p))
            rows.append([p for _, p in sorted(scored, reverse=True)[:topk]])
        chosen.append(rows)
    return chosen


@pytest.mark.parametrize("query_chunk", [1024, 7], ids=["one_chunk", "chunks_of_7"])
def test_parallel_retrieval_follows_the_rule(query_chunk, monkeypatch):
    monkeypatch.setattr(store, "QUERY_CHUNK", query_chunk)
    generator = torch.Generator().manual_seed(0)
    batch, length, block, window, topk, slots = 2, 29, 5, 4, 3, 4
    query = torch.randn(batch, length, 4, 8, generator=generator)
    keys = torch.randn(batch, length, 2, 8, generator=generator)
    storable = torch.rand(batch, length, generator=generator) > 0.3
    blocks = -(-length // block)
    memory_positions = torch.randint(0, length, (batch, blocks, slots), generator=generator)
    memory_valid = torch.rand(batch, blocks, slots, generator=generator) > 0.5
    positions, valid = retrieve_parallel(
        query, keys, storable, memory_positions, memory_valid, block=block, window=window, topk=topk
    )
    expected = plain_retrieval(query, keys, storable, memory_positions, memory_valid, block, window, topk)
    for b in range(batch):
        for t in range(length):
            got = positions[b, t][valid[b, t]].tolist()
            assert got == expected[b][t], (b, t)
    assert bool(valid[:, -1].all()) and not bool(valid[:, :block].any())  # late queries fill r, the first block none


# SEQ_LEN 45 with w = Q_e = 8: queries of blocks 2..5 read the store; r = 3, beside a memory of M = 6 that evicts.
STORE_CASES = [
    ("B", {"store_topk": 3, "memory_threshold": 0.0}),
    ("B", {"store_topk": 3, "store_rule": "innovative", "memory_threshold": 1.0, "memory_block": 5}),
    ("B", {"store_topk": 4, "memory_rope": False, "tie_fading_proj": False, "qk_norm": True}),
    ("MB", {"store_topk": 2, "memory_block": 12, "memory_size": 4, "memory_threshold": 0.0}),
]


@pytest.mark.parametrize("pattern,overrides", STORE_CASES, ids=[case_id(*case) for case in STORE_CASES])
def test_token_by_token_decoding_with_the_store_matches_parallel_forward(pattern, overrides):
    model = build(tiny_config(pattern, **overrides))
    ids = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        parallel = model(ids, use_cache=False).logits
        without_store = build(tiny_config(pattern, **{**overrides, "store_topk": 0}))(ids).logits
        cache, stepwise = None, []
        for t in range(SEQ_LEN):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache, stepwise = out.cache, [*stepwise, out.logits]
        prefill = model(ids[:, :21], use_cache=True)
        cache, continued = prefill.cache, [prefill.logits]
        for t in range(21, SEQ_LEN):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache, continued = out.cache, [*continued, out.logits]
    torch.testing.assert_close(torch.cat(stepwise, 1), parallel, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(continued, 1), parallel, atol=1e-4, rtol=0)
    assert not torch.allclose(parallel, without_store, atol=1e-3), "the store should change what late queries read"
    store = next(state.store for state in cache.states if getattr(state, "store", None) is not None)
    block = model.config.memory_block
    assert store.size == (SEQ_LEN // block) * block  # every finished block, no bound


def test_gradients_through_the_store_agree_between_naive_and_torch_kernels():
    model = build(tiny_config("FB", layers=2, store_topk=3, memory_threshold=0.0)).train()
    ids = torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(3))
    assert_backends_agree_on_loss_and_gradients(model, ids)


def test_store_settings_are_checked_and_compiled_decoding_refuses_the_store():
    with pytest.raises(ValueError, match="BmojoConfig.store_index"):
        tiny_config("B", store_index="ivf")
    with pytest.raises(ValueError, match="BmojoConfig.store_rule"):
        tiny_config("B", store_rule="recent")
    with pytest.raises(ValueError, match="BmojoConfig.store_topk"):
        tiny_config("B", store_topk=-1)
    with pytest.raises(ValueError, match="in-storage memory"):
        build(tiny_config("B", store_topk=2)).compile_decoding()


@pytest.mark.parametrize("index", ["flat", "hnsw"])
def test_decoding_through_a_faiss_index_retrieves_what_the_dense_score_does(index):
    require_package("faiss", "store")
    # At threshold 1.0 the rule keeps some tokens and drops others, so the index holds kept entries only.
    overrides = dict(store_topk=3, memory_threshold=1.0, store_rule="innovative")
    ids = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(5))
    logits = {}
    for kind in ("dense", index):
        # From 8 entries on (the first finished block) the index proposes the candidates.
        model = build(tiny_config("B", store_index=kind, store_index_from=8, **overrides))
        with torch.no_grad():
            out = model(ids[:, :10], use_cache=True)
            pieces = [out.logits]
            for t in range(10, SEQ_LEN):
                out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True)
                pieces.append(out.logits)
        logits[kind] = torch.cat(pieces, 1)
        store = out.cache.states[0].store
        assert (store.index is not None) == (kind != "dense")
    # hnsw is approximate, but at a few dozen entries its graph search finds every neighbour.
    torch.testing.assert_close(logits[index], logits["dense"], atol=1e-5, rtol=0)
    kept = store.valid[:, : store.size]
    assert bool(kept.any()) and not bool(kept.all())
    assert int(store.index.indexes[0].ntotal) == int(kept[0].sum())


def test_hnsw_finds_most_of_the_exact_neighbours_of_a_large_store():
    require_package("faiss", "store")
    generator = torch.Generator().manual_seed(7)
    keys = torch.randn(1, 2, 20000, 32, generator=generator)
    queries = torch.randn(1, 2 * 32, generator=generator)
    found = {}
    for kind in ("flat", "hnsw"):
        indexes = RowIndexes(kind, batch=1, dim=64)
        indexes.add(keys, torch.ones(1, 20000, dtype=torch.bool))
        found[kind] = [set(indexes.search(queries, 10)[0].tolist())]
    recall = len(found["flat"][0] & found["hnsw"][0]) / 10
    assert recall >= 0.8, recall


def test_a_reordered_or_shrunk_cache_reorders_its_index_rows():
    require_package("faiss", "store")
    model = build(tiny_config("B", store_topk=3, store_index="flat", store_index_from=8))
    ids = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = model(ids[:, :30], use_cache=True)
        out = model(ids[:, 30:31], cache=out.cache, use_cache=True)
        first = out.cache.states[0].store.index
        out.cache.reorder_cache(torch.tensor([1, 1]))  # both rows continue row 1
        swapped = model(ids[1:2, 31:32].expand(2, 1), cache=out.cache, use_cache=True).logits
        alone = model(ids[1:2, :32]).logits[:, -1:]
    indexes = out.cache.states[0].store.index
    assert indexes is first and indexes.indexes[0] is not indexes.indexes[1]  # row 1's index, and a copy of it
    torch.testing.assert_close(swapped, alone.expand(2, 1, -1), atol=1e-4, rtol=0)
    out.cache.batch_select_indices(torch.tensor([0]))  # the batch shrinks to its first row
    shrunk = model(ids[1:2, 32:33], cache=out.cache, use_cache=True).logits
    torch.testing.assert_close(shrunk, model(ids[1:2, :33]).logits[:, -1:], atol=1e-4, rtol=0)
