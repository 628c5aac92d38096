"""Gather of selected rows out of a sequence, and the scatter-add that is its backward.

Both are pure data movement: one indirect DMA per tile of up to 128 selected rows. The row indices are
loaded into SBUF as an int32 column (one index per partition) and passed as the ``vector_offset`` of an
access pattern over the flattened [B*T, F] tensor; the batch row enters as the static ``offset`` b*T*F.
On NeuronCore-v2 indirect DMA needs software descriptor generation (``dge_mode.swdge``, run by GpSimd).
The backward accumulates with the DMA read-modify-write ``dst_rmw_op=nl.add`` and ``unique_indices=False``,
because a token kept in memory by several blocks is gathered several times.
"""

from __future__ import annotations

from neuron_kernels.nki_compat import nisa, nki, nl

ROWS_PER_TILE = 128


def _index_column(index, b: int, first: int, count: int):
    """SBUF [count, 1] int32: index[b, first:first + count], one row index per partition."""
    column = nl.ndarray((count, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=column, src=index[b, first : first + count])
    return column


def _selected_rows(flat, b: int, length: int, column, count: int):
    """Access pattern over ``flat`` [B*T, F] reaching rows b*T + column[i], i < count."""
    features = flat.shape[1]
    return flat.ap(
        pattern=[[features, count], [1, features]], offset=b * length * features, vector_offset=column, indirect_dim=0
    )


@nki.jit
def eidetic_gather_fwd(src, index):
    """out[b, s] = src[b, index[b, s]]: src [B, T, F], index [B, S] int32 in [0, T) -> out [B, S, F] (src dtype)."""
    batch, length, features = src.shape
    selected = index.shape[1]
    out = nl.ndarray((batch, selected, features), dtype=src.dtype, buffer=nl.shared_hbm)
    flat = src.reshape((batch * length, features))
    for b in range(batch):
        for first in range(0, selected, ROWS_PER_TILE):
            count = min(ROWS_PER_TILE, selected - first)
            column = _index_column(index, b, first, count)
            rows = nl.ndarray((count, features), dtype=src.dtype, buffer=nl.sbuf)
            source = _selected_rows(flat, b, length, column, count)
            nisa.dma_copy(dst=rows, src=source, dge_mode=nisa.dge_mode.swdge)
            nisa.dma_copy(dst=out[b, first : first + count], src=rows)
    return out


@nki.jit
def eidetic_gather_bwd(d_out, index, length):
    """d_src [B, T=length, F] fp32: zeros, plus every d_out[b, s] added into row index[b, s] of batch row b.

    d_out [B, S, F], index [B, S] int32 in [0, T).
    """
    batch, selected, features = d_out.shape
    d_src = nl.ndarray((batch, length, features), dtype=nl.float32, buffer=nl.shared_hbm)
    flat = d_src.reshape((batch * length, features))
    zeros = nl.ndarray((ROWS_PER_TILE, features), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=zeros, value=0.0)
    for first in range(0, batch * length, ROWS_PER_TILE):
        count = min(ROWS_PER_TILE, batch * length - first)
        nisa.dma_copy(dst=flat[first : first + count], src=zeros[0:count])
    for b in range(batch):
        for first in range(0, selected, ROWS_PER_TILE):
            count = min(ROWS_PER_TILE, selected - first)
            column = _index_column(index, b, first, count)
            grads = nl.ndarray((count, features), dtype=nl.float32, buffer=nl.sbuf)
            nisa.dma_copy(dst=grads, src=d_out[b, first : first + count])
            nisa.dma_copy(
                dst=_selected_rows(flat, b, length, column, count),
                src=grads,
                dst_rmw_op=nl.add,
                unique_indices=False,
                dge_mode=nisa.dge_mode.swdge,
            )
    return d_src
