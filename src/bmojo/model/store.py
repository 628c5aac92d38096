"""In-storage eidetic memory of a B layer (DESIGN §2.4b): past tokens beyond the window and the in-context memory,
read by content.

The store holds the keys and values of the tokens of finished memory blocks (all of them, or the innovative
ones: ``store_rule``). It is written when a block finishes, so a query reads only what earlier blocks wrote,
as an asynchronously updated index would serve it. Each query retrieves the ``r`` entries it scores highest
(``q·k`` summed over the query heads: one choice for all heads, as the in-context memory's), leaving out the
entries still inside its window and those the in-context memory already holds; the retrieved keys and values
join the one softmax beside the memory entries. The choice is not differentiated; gradients reach the
retrieved keys and values.

:func:`retrieve_parallel` is the static-shaped training form (a dense ``[T, T]`` score, no gradient, ``r`` slots a
query with a validity mask); :class:`TokenStore` is the decoding form, a store without a fixed bound that grows
by one block at a time. Tests hold the two to the same choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bmojo.model.store_index import RowIndexes

# Queries whose retrieval scores the parallel form computes at once.
QUERY_CHUNK = 1024


def summed_query(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The retrieval query: the query heads of each key head summed, so one dot product with a key [Hkv, Dh]
    is the score summed over all query heads. query: [..., Hq, Dh] -> [..., Hkv, Dh] fp32."""
    return query.float().unflatten(-2, (kv_heads, -1)).sum(-2)


@torch.no_grad()
def retrieve_parallel(
    query: torch.Tensor,
    keys: torch.Tensor,
    storable: torch.Tensor,
    memory_positions: torch.Tensor,
    memory_valid: torch.Tensor,
    *,
    block: int,
    window: int,
    topk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What each query retrieves from the store, in the parallel form.

    query: [B, T, Hq, Dh] (as the memory keys are scored); keys: [B, T, Hkv, Dh] the memory keys of every
    position; storable: [B, T] bool, the tokens the store keeps; memory_positions, memory_valid:
    [B, NB, M] the in-context memory of each query block. Query ``t`` may retrieve position ``p`` when ``p`` is in
    a block before its own, behind its window (``p < t - w + 1``), storable, and not in its block's memory.
    Returns (positions: [B, T, r] int64, highest score first, valid: [B, T, r] bool).
    """
    batch, length = keys.shape[:2]
    summed, keys32 = summed_query(query, keys.shape[2]), keys.float()
    # The in-context memory of each query block as a [B, NB, T] membership map, read by each query's block.
    held = torch.zeros(batch, memory_positions.shape[1], length + 1, dtype=torch.bool, device=keys.device)
    held.scatter_(2, torch.where(memory_valid, memory_positions, length), True)
    p = torch.arange(length, device=keys.device)[None, :]
    chosen = []
    # Queries a chunk at a time, so the scores take [B, chunk, T], not [B, T, T].
    for start in range(0, length, QUERY_CHUNK):
        t = torch.arange(start, min(start + QUERY_CHUNK, length), device=keys.device)[:, None]
        scores = torch.einsum("bthd,bphd->btp", summed[:, start : start + QUERY_CHUNK], keys32)
        allowed = (p < (t // block) * block) & (p < t - window + 1) & ~held[:, t[:, 0] // block, :length]
        allowed = allowed & storable[:, None, :]
        chosen.append(_top(scores.masked_fill(~allowed, float("-inf")), topk))
    return torch.cat([c[0] for c in chosen], dim=1), torch.cat([c[1] for c in chosen], dim=1)


def _top(scores: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``topk`` highest of scores [..., N] (fewer entries are padded invalid): (indices, valid) [..., topk]."""
    count = min(topk, scores.shape[-1])
    best = scores.topk(count, dim=-1)
    indices, valid = best.indices, torch.isfinite(best.values)
    if count < topk:
        pad = (*scores.shape[:-1], topk - count)
        indices = torch.cat([indices, indices.new_zeros(pad)], dim=-1)
        valid = torch.cat([valid, valid.new_zeros(pad)], dim=-1)
    return indices, valid


def _scores(keys: torch.Tensor, summed: torch.Tensor) -> torch.Tensor:
    """keys [B, Hkv, n, Dh] scored by the summed query [B, Hkv, Dh] -> [B, n] fp32. A batched matrix-vector
    product reads the keys where they lie (a slice of the store's buffer), which einsum would copy first."""
    return (keys.float() @ summed[..., None]).squeeze(-1).sum(1)


@dataclass
class TokenStore:
    """The decoding form of the store: every token of the finished memory blocks, entry ``n`` being position ``n``.

    keys, values: [B, Hkv, C, Dh] and valid: [B, C] bool, of which the first ``size`` entries are filled (a token
    a row's rule did not keep is an invalid entry; the capacity C doubles when full, so a growing store is copied
    O(log N) times, not once a block). From ``index_from`` entries on, ``index_kind`` ``flat`` or ``hnsw`` finds
    the candidates with a faiss index (:mod:`bmojo.model.store_index`); ``index_rows`` [B] (the batch rows it was
    built for) follows the rows when a cache reorders them, which tells the index to reorder its rows alike.
    """

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    size: int = 0
    index_kind: str = "dense"
    index_from: int = 0
    index_rows: torch.Tensor | None = None
    index: RowIndexes | None = field(default=None, repr=False)

    @classmethod
    def empty(
        cls,
        like: torch.Tensor,
        batch: int,
        kv_heads: int,
        head_dim: int,
        index_kind: str = "dense",
        index_from: int = 0,
    ) -> TokenStore:
        keys = like.new_zeros(batch, kv_heads, 0, head_dim)
        valid = torch.zeros(batch, 0, dtype=torch.bool, device=like.device)
        return cls(keys, torch.zeros_like(keys), valid, 0, index_kind, index_from)

    def append(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
        """Add the next positions' tokens: keys, values [B, Hkv, n, Dh]; valid [B, n]."""
        count = keys.shape[2]
        if self.size + count > self.keys.shape[2]:
            capacity = max(2 * self.keys.shape[2], self.size + count)
            grown = [t.new_zeros(*t.shape[:2], capacity, t.shape[3]) for t in (self.keys, self.values)]
            for new, old in zip(grown, (self.keys, self.values), strict=True):
                new[:, :, : self.size] = old[:, :, : self.size]
            kept = self.valid.new_zeros(self.valid.shape[0], capacity)
            kept[:, : self.size] = self.valid[:, : self.size]
            (self.keys, self.values), self.valid = grown, kept
        self.keys[:, :, self.size : self.size + count] = keys
        self.values[:, :, self.size : self.size + count] = values
        self.valid[:, self.size : self.size + count] = valid
        self.size += count

    @torch.no_grad()
    def retrieve(
        self,
        query: torch.Tensor,
        position: int,
        window: int,
        memory_positions: torch.Tensor,
        memory_valid: torch.Tensor,
        topk: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The entries the query at ``position`` retrieves, by :func:`retrieve_parallel`'s rule.

        query: [B, Hkv, G, Dh] (the query heads grouped by key head); memory_positions, memory_valid: [B, M].
        Returns (keys, values: [B, Hkv, r, Dh], valid: [B, r]).
        """
        batch, kv_heads, _, head_dim = self.keys.shape
        behind = min(self.size, position - window + 1)  # entries [0, behind) have left the query's window
        if behind <= 0:
            empty = self.keys.new_zeros(batch, kv_heads, topk, head_dim)
            return empty, torch.zeros_like(empty), torch.zeros(batch, topk, dtype=torch.bool, device=empty.device)
        # The in-context memory's positions (all of finished blocks, so inside the store) as a map over entries.
        held = torch.zeros(batch, self.size + 1, dtype=torch.bool, device=self.keys.device)
        held.scatter_(1, torch.where(memory_valid, memory_positions, self.size), True)
        readable = self.valid[:, :behind] & ~held[:, :behind]
        summed = query.float().sum(2)  # [B, Hkv, Dh]
        if self.index_kind != "dense" and self.size >= self.index_from:
            # Entries the rule leaves out (in the memory, inside the window) can outrank the ones it keeps, so
            # the index is asked for that many more; the store then scores and filters them exactly.
            candidates = self._candidates(summed, topk + memory_positions.shape[1] + window)
            entries = candidates.clamp(min=0)
            allowed = (candidates >= 0) & (entries < behind) & readable.gather(1, entries.clamp(max=behind - 1))
            scores = _scores(self.keys.gather(2, entries[:, None, :, None].expand(-1, kv_heads, -1, head_dim)), summed)
        else:
            entries, allowed = None, readable
            scores = _scores(self.keys[:, :, :behind], summed)
        best, valid = _top(scores.masked_fill(~allowed, float("-inf")), topk)
        if entries is not None:
            best = entries.gather(1, best)
        gather = best[:, None, :, None].expand(-1, kv_heads, -1, head_dim)
        return self.keys.gather(2, gather), self.values.gather(2, gather), valid

    def _candidates(self, summed: torch.Tensor, count: int) -> torch.Tensor:
        """The index's ``count`` best entries for the query summed [B, Hkv, Dh]: [B, count], -1 for none."""
        batch = self.keys.shape[0]
        rows = torch.arange(batch, device=self.keys.device)
        if self.index is None:
            self.index = RowIndexes(self.index_kind, batch, self.keys.shape[1] * self.keys.shape[3])
        elif not torch.equal(self.index_rows, rows) or len(self.index.indexes) != batch:
            # The cache reordered its rows: row i now continues old row index_rows[i], whose entries it holds.
            self.index.continue_rows(self.index_rows.tolist())
        self.index_rows = rows
        if self.index.indexed < self.size:
            start = self.index.indexed
            self.index.add(self.keys[:, :, start : self.size], self.valid[:, start : self.size])
        return self.index.search(summed.flatten(1), count)
