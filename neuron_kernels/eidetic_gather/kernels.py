"""Gather of selected rows out of a sequence, and the duplicate-combining scatter that is its backward.

Both kernels take the selected rows as ``rows`` [B, S] int32: the row of the flattened [B*T, F] tensor,
``b*T + index[b, s]``, so every access pattern starts at offset 0 and the batch row enters only through the
index values (no loop index in an address). S is a whole number of 128-row tiles (the op wrapper pads), so
every device-loop iteration moves one full tile.

Forward: one indirect DMA per tile of 128 selected rows. The row indices sit in SBUF as an int32 column (one
per partition) and are the ``vector_offset`` of an access pattern over the flattened source; on
NeuronCore-v2 indirect DMA needs software descriptor generation (``dge_mode.swdge``, run by GpSimd).

Backward: a token kept in memory by several blocks is gathered several times, so its gradient is the sum of
several output rows. Software-DGE scatter takes "a list of **unique** dynamic indices" (``nki.isa.dma_copy``
docstring, SDK 2.28), so duplicates are combined on chip first: for each output tile t of a batch row, with
``same[s', s] = (rows[s'] == rows[s])`` over all selected rows s' of the row (an equality mask built on
VectorE), TensorE computes ``combined[s] = sum_s' same[s', s] * d_out[s']`` and
``earlier[s] = sum_s' same[s', s] * (s' < s)``. Every duplicate then holds the full sum, and only the first
occurrence (``earlier == 0``) keeps its row index; the others are moved past the end of the tensor and the
plain (non-accumulating) scatter skips them with ``oob_mode.skip``. No DMA read-modify-write is needed, so
the scatter writes each row of ``d_src`` at most once over the whole kernel. The price is O(S^2 F) TensorE
work per batch row (every tile compared with every tile).
"""

from __future__ import annotations

from neuron_kernels.nki_compat import nisa, nki, nl

ROWS_PER_TILE = 128
MOVING_COLUMNS = 512  # fp32 columns of one PSUM bank: the moving free size of one matmul
PSUM_BANK_BYTES = 2048
PSUM_BANKS = 8
EXACT_FP32_INTEGERS = 2**24  # row indices are compared and shifted in fp32, exact below this


def check_shapes(batch: int, length: int, selected: int, features: int) -> None:
    """Raise ValueError unless the kernels can run on src [B, T, F] with S selected rows per batch row."""
    if selected % ROWS_PER_TILE:
        raise ValueError(f"eidetic gather kernels: S={selected} must be a multiple of {ROWS_PER_TILE} (pad it)")
    if 2 * batch * length > EXACT_FP32_INTEGERS:
        raise ValueError(
            f"eidetic gather backward: 2*B*T={2 * batch * length} row numbers exceed fp32's exact integers (2^24)"
        )
    # The backward holds the combined rows (whole banks) and the earlier-count in PSUM, and keeps a bank for the
    # broadcast of the tile's rows.
    combined_banks = -(-features * 4 // PSUM_BANK_BYTES)
    if combined_banks + 2 > PSUM_BANKS:
        limit = (PSUM_BANKS - 2) * PSUM_BANK_BYTES // 4
        raise ValueError(f"eidetic gather backward: F={features} needs {combined_banks} PSUM banks; F <= {limit}")


def _row_column(rows, b, tile):
    """SBUF [128, 1] int32: rows[b, 128*tile : 128*(tile + 1)], one row index per partition."""
    column = nl.ndarray((ROWS_PER_TILE, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=column, src=rows[b, tile * ROWS_PER_TILE : (tile + 1) * ROWS_PER_TILE])
    return column


def _selected_rows(flat, column):
    """Access pattern over ``flat`` [B*T, F] reaching rows column[i] for the 128 partitions i."""
    features = flat.shape[1]
    return flat.ap(pattern=[[features, ROWS_PER_TILE], [1, features]], offset=0, vector_offset=column, indirect_dim=0)


@nki.jit
def eidetic_gather_fwd(src, rows):
    """out[b, s] = src.reshape(B*T, F)[rows[b, s]]: src [B, T, F], rows [B, S] int32 -> out [B, S, F] (src dtype).

    rows[b, s] = b*T + index[b, s] with index in [0, T); S a multiple of 128.
    """
    batch, length, features = src.shape
    selected = rows.shape[1]
    out = nl.ndarray((batch, selected, features), dtype=src.dtype, buffer=nl.shared_hbm)
    flat = src.reshape((batch * length, features))
    for b in nl.affine_range(batch):
        for tile in nl.affine_range(selected // ROWS_PER_TILE):
            _gather_tile(flat, rows, out, b, tile)
    return out


def _gather_tile(flat, rows, out, b, tile):
    """out[b, 128*tile : 128*(tile + 1)] = the rows of ``flat`` [B*T, F] that rows[b] names there."""
    column = _row_column(rows, b, tile)
    gathered = nl.ndarray((ROWS_PER_TILE, flat.shape[1]), dtype=flat.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=gathered, src=_selected_rows(flat, column), dge_mode=nisa.dge_mode.swdge)
    nisa.dma_copy(dst=out[b, tile * ROWS_PER_TILE : (tile + 1) * ROWS_PER_TILE], src=gathered)


@nki.jit
def eidetic_gather_bwd(d_out, rows, length):
    """d_src [B, T=length, F] fp32: zeros, plus every d_out[b, s] added into row rows[b, s] of d_src.reshape(B*T, F).

    d_out [B, S, F] (fp32 or bf16), rows [B, S] int32 as for :func:`eidetic_gather_fwd`. Duplicate rows
    within a batch row are summed on TensorE and scattered once (module docstring).
    """
    batch, selected, features = d_out.shape
    d_src = nl.ndarray((batch, length, features), dtype=nl.float32, buffer=nl.shared_hbm)
    flat = d_src.reshape((batch * length, features))
    _fill_zeros(flat)
    constants = _Constants(selected, d_out.dtype)
    for b in nl.affine_range(batch):
        _scatter_batch_row(d_out, rows, b, flat, constants)
    return d_src


def _fill_zeros(flat):
    """Write 0 into every row of the HBM tensor ``flat`` [R, F]: whole 128-row blocks in a loop, then the rest."""
    total_rows, features = flat.shape
    zeros = nl.ndarray((ROWS_PER_TILE, features), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=zeros, value=0.0)
    blocks = total_rows // ROWS_PER_TILE
    if blocks > 0:
        for block in nl.affine_range(blocks):
            nisa.dma_copy(dst=flat[block * ROWS_PER_TILE : (block + 1) * ROWS_PER_TILE], src=zeros)
    rest = total_rows - blocks * ROWS_PER_TILE
    if rest > 0:
        nisa.dma_copy(dst=flat[blocks * ROWS_PER_TILE : total_rows], src=zeros[0:rest])


class _Constants(nl.NKIObject):
    """Tiles the backward builds once for S selected rows per batch row.

    ``positions_along`` [128, S] fp32: [p, s] = s; ``positions_down`` [128, S/128] fp32: [p, j] = 128 j + p;
    ``ones_row`` [1, 128] fp32 (stationary of a partition broadcast); ``ones_column`` [128, 1] in the mask
    dtype (moving operand that counts a mask's columns). Masks take d_out's dtype: 0/1 is exact in bf16, and
    a bf16 moving operand needs a bf16 stationary.
    """

    def __init__(self, selected: int, mask_dtype) -> None:
        self.tiles = selected // ROWS_PER_TILE
        self.mask_dtype = mask_dtype
        self.positions_along = nl.ndarray((ROWS_PER_TILE, selected), dtype=nl.float32, buffer=nl.sbuf)
        nisa.iota(dst=self.positions_along, pattern=[[1, selected]], offset=0, channel_multiplier=0)
        self.positions_down = nl.ndarray((ROWS_PER_TILE, self.tiles), dtype=nl.float32, buffer=nl.sbuf)
        nisa.iota(dst=self.positions_down, pattern=[[ROWS_PER_TILE, self.tiles]], offset=0, channel_multiplier=1)
        self.ones_row = nl.ndarray((1, ROWS_PER_TILE), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=self.ones_row, value=1.0)
        self.ones_column = nl.ndarray((ROWS_PER_TILE, 1), dtype=mask_dtype, buffer=nl.sbuf)
        nisa.memset(dst=self.ones_column, value=1.0)


class _Selection(nl.NKIObject):
    """One batch row's selected rows as fp32 (exact below 2^24): ``along`` [1, S] on one partition, and
    ``down`` [128, S/128] with [p, j] = rows[b, 128 j + p]."""

    def __init__(self, rows, b, tiles: int) -> None:
        selected = rows.shape[1]
        self.along = nl.ndarray((1, selected), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=self.along, src=rows[b])
        self.down = nl.ndarray((ROWS_PER_TILE, tiles), dtype=nl.float32, buffer=nl.sbuf)
        for tile in nl.affine_range(tiles):
            nisa.dma_copy(
                dst=self.down[:, tile : tile + 1], src=rows[b, tile * ROWS_PER_TILE : (tile + 1) * ROWS_PER_TILE]
            )


def _scatter_batch_row(d_out, rows, b, flat, constants: _Constants):
    """Scatter batch row b's gradients d_out[b] [S, F], duplicates combined, into ``flat`` [B*T, F]."""
    selection = _Selection(rows, b, constants.tiles)
    for tile in nl.affine_range(constants.tiles):
        _scatter_tile(d_out, b, tile, selection, flat, constants)


def _broadcast_down(row, ones_row):
    """SBUF [128, 128] fp32 with every partition holding ``row`` [1, 128] (a TensorE ones-matmul, exact)."""
    spread = nl.ndarray((ROWS_PER_TILE, ROWS_PER_TILE), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=spread, stationary=ones_row, moving=row, is_stationary_onezero=True)
    broadcast = nl.ndarray((ROWS_PER_TILE, ROWS_PER_TILE), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=broadcast, src=spread)
    return broadcast


def _scatter_tile(d_out, b, tile, selection: _Selection, flat, constants: _Constants):
    """Sum every gradient of batch row b onto the selected rows of ``tile`` [128 of S] that name the same row,
    then write each sum to ``flat`` from the row's first occurrence only."""
    features = d_out.shape[2]
    first = tile * ROWS_PER_TILE
    tile_rows = _broadcast_down(selection.along[:, first : first + ROWS_PER_TILE], constants.ones_row)
    combined = nl.ndarray((ROWS_PER_TILE, features), dtype=nl.float32, buffer=nl.psum)
    earlier = nl.ndarray((ROWS_PER_TILE, 1), dtype=nl.float32, buffer=nl.psum)
    # Matmuls accumulating into one PSUM tile are the one reduction affine_range allows across iterations.
    for other in nl.affine_range(constants.tiles):
        _accumulate_duplicates(d_out, b, first, other, tile_rows, selection, constants, combined, earlier)
    summed = nl.ndarray((ROWS_PER_TILE, features), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=summed, src=combined)
    # A later duplicate's row moves past the end of flat: min(earlier, 1) * (B*T) + row.
    shift = nl.ndarray((ROWS_PER_TILE, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(
        dst=shift, data=earlier, op0=nl.minimum, operand0=1.0, op1=nl.multiply, operand1=flat.shape[0] * 1.0
    )
    targets = nl.ndarray((ROWS_PER_TILE, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=targets, data1=shift, data2=selection.down[:, tile : tile + 1], op=nl.add)
    nisa.dma_copy(
        dst=_selected_rows(flat, targets), src=summed, oob_mode=nisa.oob_mode.skip, dge_mode=nisa.dge_mode.swdge
    )


def _accumulate_duplicates(
    d_out, b, first, other, tile_rows, selection: _Selection, constants: _Constants, combined, earlier
):
    """Add the selected rows of tile ``other`` to ``combined`` [128, F] (PSUM) where they name the same row as
    selected row first + f, and count in ``earlier`` [128, 1] (PSUM) those that come before it."""
    mask_dtype = constants.mask_dtype
    # same[p, f] = (row of selected 128*other + p) == (row of selected first + f)
    same = nl.ndarray((ROWS_PER_TILE, ROWS_PER_TILE), dtype=mask_dtype, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=same, data=tile_rows, op0=nl.equal, operand0=selection.down[:, other : other + 1])
    # before[p, f] = (first + f) > (128*other + p): the other selected row comes earlier
    before = nl.ndarray((ROWS_PER_TILE, ROWS_PER_TILE), dtype=mask_dtype, buffer=nl.sbuf)
    nisa.tensor_scalar(
        dst=before,
        data=constants.positions_along[:, first : first + ROWS_PER_TILE],
        op0=nl.greater,
        operand0=constants.positions_down[:, other : other + 1],
    )
    same_before = nl.ndarray((ROWS_PER_TILE, ROWS_PER_TILE), dtype=mask_dtype, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=same_before, data1=same, data2=before, op=nl.multiply)
    features = d_out.shape[2]
    grads = nl.ndarray((ROWS_PER_TILE, features), dtype=d_out.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=grads, src=d_out[b, other * ROWS_PER_TILE : (other + 1) * ROWS_PER_TILE])
    for low in nl.static_range(0, features, MOVING_COLUMNS):
        high = min(low + MOVING_COLUMNS, features)
        nisa.nc_matmul(
            dst=combined[:, low:high], stationary=same, moving=grads[:, low:high], is_stationary_onezero=True
        )
    nisa.nc_matmul(dst=earlier, stationary=same_before, moving=constants.ones_column, is_stationary_onezero=True)
