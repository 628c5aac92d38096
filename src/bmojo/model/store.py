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
    storable: torch.Tensor | None,
    memory_positions: torch.Tensor,
    memory_valid: torch.Tensor,
    *,
    block: int,
    window: int,
    topk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What each query retrieves from the store, in the parallel form.

    query: [B, T, Hq, Dh] (as the memory keys are scored); keys: [B, T, Hkv, Dh] the memory keys of every
    position; storable: [B, T] bool, the tokens the store keeps (None: all); memory_positions, memory_valid:
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
        if storable is not None:
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


@dataclass
class TokenStore:
    """The decoding form of the store: every stored token's key, value and position, in position order.

    keys, values: [B, Hkv, N, Dh]; positions: [B, N] int64; valid: [B, N] bool (rows keep the same N: a token a
    row's rule did not keep is an invalid entry). N grows by one memory block each time a block finishes.
    From ``index_from`` entries on, ``index_kind`` ``flat`` or ``hnsw`` finds the candidates with a faiss index
    (:mod:`bmojo.model.store_index`); ``index_rows`` [B] (the batch rows it was built for) follows the rows when a
    cache reorders them, which tells the index to build itself again.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
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
        positions = torch.zeros(batch, 0, dtype=torch.long, device=like.device)
        valid = torch.zeros_like(positions, dtype=torch.bool)
        return cls(keys, torch.zeros_like(keys), positions, valid, index_kind, index_from)

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> None:
        """Add tokens: keys, values [B, Hkv, n, Dh]; positions [n] or [B, n]; valid [B, n]."""
        self.keys = torch.cat([self.keys, keys], dim=2)
        self.values = torch.cat([self.values, values], dim=2)
        self.positions = torch.cat([self.positions, positions.expand_as(valid)], dim=1)
        self.valid = torch.cat([self.valid, valid], dim=1)

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
        batch, kv_heads, stored, head_dim = self.keys.shape
        if stored == 0:
            empty = self.keys.new_zeros(batch, kv_heads, topk, head_dim)
            return empty, torch.zeros_like(empty), torch.zeros(batch, topk, dtype=torch.bool, device=empty.device)
        summed = query.float().sum(2)  # [B, Hkv, Dh]
        if self.index_kind != "dense" and stored >= self.index_from:
            # Entries the rule leaves out (in the memory, inside the window) can outrank the ones it keeps, so
            # the index is asked for that many more; the store then scores and filters them exactly.
            candidates = self._candidates(summed, topk + memory_positions.shape[1] + window)
            found = candidates >= 0
            entries = candidates.clamp(min=0)
            keys = self.keys.gather(2, entries[:, None, :, None].expand(-1, kv_heads, -1, head_dim))
            scores = torch.einsum("bhd,bhnd->bn", summed, keys.float())
            # The index holds kept entries only, so the store's own validity is already applied.
            at = self.positions.gather(1, entries)
            allowed = found & self._allowed(at, position, window, memory_positions, memory_valid)
        else:
            entries = None
            scores = torch.einsum("bhd,bhnd->bn", summed, self.keys.float())
            allowed = self.valid & self._allowed(self.positions, position, window, memory_positions, memory_valid)
        best, valid = _top(scores.masked_fill(~allowed, float("-inf")), topk)
        if entries is not None:
            best = entries.gather(1, best)
        gather = best[:, None, :, None].expand(-1, kv_heads, -1, head_dim)
        return self.keys.gather(2, gather), self.values.gather(2, gather), valid

    @staticmethod
    def _allowed(
        positions: torch.Tensor, position: int, window: int, memory_positions: torch.Tensor, memory_valid: torch.Tensor
    ) -> torch.Tensor:
        """Which entries at ``positions`` [B, n] the query at ``position`` may read: behind its window and not in
        the in-context memory (memory_positions, memory_valid: [B, M]) -> [B, n] bool."""
        held = (positions[:, :, None] == memory_positions[:, None, :]) & memory_valid[:, None, :]
        return (positions < position - window + 1) & ~held.any(-1)

    def _candidates(self, summed: torch.Tensor, count: int) -> torch.Tensor:
        """The index's ``count`` best entries for the query summed [B, Hkv, Dh]: [B, count], -1 for none."""
        batch = self.keys.shape[0]
        rows = torch.arange(batch, device=self.keys.device)
        if self.index is None or self.index_rows is None or not torch.equal(self.index_rows, rows):
            self.index = RowIndexes(self.index_kind, batch, self.keys.shape[1] * self.keys.shape[3])
            self.index_rows = rows
        if self.index.indexed < self.keys.shape[2]:
            start = self.index.indexed
            self.index.add(self.keys[:, :, start:], self.valid[:, start:])
        return self.index.search(summed.flatten(1), count)
