"""The cache protocol of ``transformers`` generation for caches whose rows follow the batch's sequences."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


class RowCache(Cache):
    """A recurrent cache (nothing to crop, no compiled static layout) counting the positions fed so far.

    Generation strategies that reorder or repeat the sequences of a batch (beam search, contrastive search,
    assisted decoding) call the three row methods; all of them come down to :meth:`_continue_rows`.
    """

    is_compileable = False

    def __init__(self, seen_tokens: int = 0):
        super().__init__(layers=[])
        self.seen_tokens = seen_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    @property
    def is_croppable(self) -> bool:
        return False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row ``i`` of the batch continues the sequence that was row ``beam_idx[i]``."""
        self._continue_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices`` of the batch, in that order."""
        self._continue_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row of the batch ``repeats`` times in place (row ``i`` becomes rows ``i*repeats...``)."""
        self._continue_rows(torch.arange(self.batch_size()).repeat_interleave(repeats))

    def batch_size(self) -> int:
        """Rows of the batch the cache holds (0 before its first forward)."""
        raise NotImplementedError

    def _continue_rows(self, sources: torch.Tensor) -> None:
        """Row ``j`` of the new batch continues old row ``sources[j]`` ([B'] int64)."""
        raise NotImplementedError
