"""Left-padded batches (prompts of different lengths, as ``generate`` and lm-evaluation-harness batch them): the
rows of each prompt length run together, unpadded, each group with its own decoding state.

A B'MOJO layer's memory blocks start at each sequence's first token, and its decoding state steps all rows of a
batch at one shared position, so rows whose prompts differ in length cannot step together without letting the
padding into the state (the SSM, the eidetic memory) or shifting one row's blocks against another's. Rows of one
length can. The padded batch keeps its layout outside the model: ``generate``'s loop, its stopping criteria,
logits processors and beam bookkeeping see ``[B, T]`` as usual, while inside each length group is run as its
prompts alone would be, so each row's tokens are exactly those of its prompt decoded by itself. The price is one
call per distinct prompt length for each step; tools that sort requests by length (the harness does) keep few.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bmojo.model.row_cache import RowCache

# run(embeddings [g, L, D], the group's cache or None, use_cache) -> (hidden [g, L, D], aux loss, the group's cache)
GroupRun = Callable[[torch.Tensor, RowCache | None, bool], tuple[torch.Tensor, torch.Tensor, RowCache | None]]


def left_padded_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """Prompt lengths [B] of a left-padded mask [B, T] (each row zeros, then ones); any other mask is refused."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, length], got shape {tuple(attention_mask.shape)}")
    lengths = attention_mask.long().sum(dim=1)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    left_padded = positions >= attention_mask.shape[1] - lengths[:, None]
    if not torch.equal(attention_mask.bool(), left_padded):
        raise ValueError(
            "padded batches must be left-padded (each row of attention_mask zeros, then ones): B'MOJO's recurrent "
            "state and eidetic memory would absorb padding anywhere else. Set tokenizer.padding_side = 'left', or "
            "pack training sequences to equal length"
        )
    if bool((lengths == 0).any()):
        raise ValueError("a sequence of the batch is empty (its attention_mask row is all zeros)")
    return lengths


class LengthGroupedCache(RowCache):
    """Decoding state of a left-padded batch: for each prompt length, its rows of the batch and their own cache.

    ``seen_tokens`` counts the padded batch's positions (what ``generate`` has fed), padding included.
    """

    def __init__(self, rows: list[torch.Tensor], caches: list[RowCache], seen_tokens: int):
        super().__init__(seen_tokens)
        self.rows, self.caches = rows, caches

    def __repr__(self) -> str:
        return f"LengthGroupedCache(seen_tokens={self.seen_tokens}, groups={len(self.caches)})"

    @property
    def is_linear(self) -> list[bool]:
        return self.caches[0].is_linear

    def batch_size(self) -> int:
        return sum(len(rows) for rows in self.rows)

    def _continue_rows(self, sources: torch.Tensor) -> None:
        """Row ``j`` of the new batch continues old row ``sources[j]``; each group keeps the rows that continue
        one of its own (a row's prompt length never changes), empty groups are dropped."""
        sources = sources.cpu()
        rows, caches = [], []
        for old_rows, cache in zip(self.rows, self.caches, strict=True):
            taken = torch.nonzero(torch.isin(sources, old_rows)).flatten()
            if len(taken):
                local = torch.searchsorted(old_rows, sources[taken])  # old_rows is sorted
                cache.batch_select_indices(local)
                rows.append(taken)
                caches.append(cache)
        self.rows, self.caches = rows, caches


def forward_by_prompt_length(
    run: GroupRun,
    x: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: LengthGroupedCache | None,
    use_cache: bool,
) -> tuple[torch.Tensor, torch.Tensor, LengthGroupedCache | None]:
    """A left-padded batch through ``run`` one prompt length at a time. x: [B, T, D] embeddings ->
    (hidden [B, T, D], zero at the padding; aux loss, the mean over groups weighted by rows; the grouped cache).

    Without ``cache`` x is the whole padded batch (``attention_mask`` [B, T] says where each row starts); with
    it, x continues every row by T new tokens, which cannot be padding.
    """
    batch, length, _ = x.shape
    hidden = torch.zeros_like(x)
    aux_total = x.new_zeros((), dtype=torch.float32)
    if cache is None:
        lengths = left_padded_lengths(attention_mask).cpu()
        groups = [(torch.nonzero(lengths == n).flatten(), n, None) for n in torch.unique(lengths).tolist()]
    else:
        if attention_mask is not None and not bool(attention_mask[:, -length:].all()):
            raise ValueError("tokens that continue a left-padded batch cannot be padding (attention_mask zeros)")
        groups = [(rows, length, group_cache) for rows, group_cache in zip(cache.rows, cache.caches, strict=True)]
    new_caches = []
    for rows, valid, group_cache in groups:
        device_rows = rows.to(x.device)
        out, aux, new_cache = run(x[device_rows, length - valid :], group_cache, use_cache)
        hidden[device_rows, length - valid :] = out
        aux_total = aux_total + aux * (len(rows) / batch)
        new_caches.append(new_cache)
    if cache is not None:
        cache.seen_tokens += length
    elif use_cache:
        cache = LengthGroupedCache([rows for rows, _, _ in groups], new_caches, length)
    return hidden, aux_total, cache
