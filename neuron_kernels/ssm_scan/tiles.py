"""Tile helpers shared by the scan kernels: constant masks, transposes, PSUM evacuation, broadcasts.

Helpers allocate their PSUM tiles locally, so the banks are released as soon as they return (PSUM has
only 8 banks per partition). All tiles are fp32.
"""

from __future__ import annotations

from neuron_kernels.nki_compat import nisa, nl

F32 = nl.float32


class Masks(nl.NKIObject):
    """Constant [size, size] fp32 0/1 tiles, built once per kernel with ``affine_select``.

    For row r (partition) and column c (free index):
    ``identity`` [r == c], ``upper`` [r <= c], ``strict_upper`` [r < c], ``lower`` [r >= c],
    ``strict_lower`` [r > c], and ``ones``.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.ones = nl.ndarray((size, size), dtype=F32, buffer=nl.sbuf)
        nisa.memset(dst=self.ones, value=1.0)
        # affine value = c - r with pattern [[1, size]] and channel_multiplier -1; r - c with the signs flipped.
        self.identity = self._select(-1, 1, nl.equal)
        self.upper = self._select(-1, 1, nl.greater_equal)
        self.strict_upper = self._select(-1, 1, nl.greater)
        self.lower = self._select(1, -1, nl.greater_equal)
        self.strict_lower = self._select(1, -1, nl.greater)

    def _select(self, channel_multiplier: int, step: int, cmp_op):
        tile = nl.ndarray((self.size, self.size), dtype=F32, buffer=nl.sbuf)
        nisa.affine_select(
            dst=tile,
            pattern=[[step, self.size]],
            offset=0,
            channel_multiplier=channel_multiplier,
            on_true_tile=self.ones,
            on_false_value=0.0,
            cmp_op=cmp_op,
        )
        return tile


def evacuate(psum_tile, on_scalar_engine: bool = True):
    """Copy a PSUM tile to a new SBUF tile (ScalarE or VectorE), so matmuls and DMA can read it."""
    sbuf_tile = nl.ndarray(psum_tile.shape, dtype=F32, buffer=nl.sbuf)
    if on_scalar_engine:
        nisa.activation(dst=sbuf_tile, op=nl.copy, data=psum_tile)
    else:
        nisa.tensor_copy(dst=sbuf_tile, src=psum_tile)
    return sbuf_tile


def transpose(tile, on_scalar_engine: bool = True):
    """[p, f] SBUF tile -> new [f, p] SBUF tile, through a TensorE transpose (p, f <= 128)."""
    partitions, free = tile.shape
    psum_tile = nl.ndarray((free, partitions), dtype=F32, buffer=nl.psum)
    nisa.nc_transpose(dst=psum_tile, data=tile)
    return evacuate(psum_tile, on_scalar_engine)


def matmul(stationary, moving, on_scalar_engine: bool = True, onezero_stationary: bool = False):
    """``stationary.T @ moving`` as a new SBUF tile [stationary free, moving free] (``onezero_stationary``: it
    holds only 0 and 1, which TensorE is told through ``is_stationary_onezero``)."""
    psum_tile = nl.ndarray((stationary.shape[1], moving.shape[1]), dtype=F32, buffer=nl.psum)
    nisa.nc_matmul(dst=psum_tile, stationary=stationary, moving=moving, is_stationary_onezero=onezero_stationary)
    return evacuate(psum_tile, on_scalar_engine)


def exp_of_matmul(mask, moving):
    """``exp(mask.T @ moving)`` as a new SBUF tile for a 0/1 ``mask`` stationary (the exp reads PSUM on ScalarE)."""
    psum_tile = nl.ndarray((mask.shape[1], moving.shape[1]), dtype=F32, buffer=nl.psum)
    nisa.nc_matmul(dst=psum_tile, stationary=mask, moving=moving, is_stationary_onezero=True)
    result = nl.ndarray(psum_tile.shape, dtype=F32, buffer=nl.sbuf)
    nisa.activation(dst=result, op=nl.exp, data=psum_tile)
    return result


def broadcast_vector(vector, partitions: int, masks: Masks):
    """HBM [n] -> SBUF [partitions, n] fp32, every partition a copy (a ones-matmul broadcast on TensorE)."""
    length = vector.shape[0]
    row = nl.ndarray((1, length), dtype=F32, buffer=nl.sbuf)
    nisa.dma_copy(dst=row, src=vector)
    return matmul(masks.ones[0:1, 0:partitions], row, onezero_stationary=True)


def load(src, rows: int, columns: int, dtype=F32):
    """An HBM view with rows * columns elements -> new SBUF tile [rows, columns] (DMA casts to ``dtype``)."""
    tile = nl.ndarray((rows, columns), dtype=dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=tile, src=src)
    return tile


def scaled(tile, column):
    """ScalarE: a new SBUF tile ``tile * column`` (``column`` a [partitions, 1] fp32 tile)."""
    result = nl.ndarray(tile.shape, dtype=F32, buffer=nl.sbuf)
    nisa.activation(dst=result, op=nl.copy, data=tile, scale=column)
    return result


def decay_and_add(dst, column, addend) -> None:
    """``dst = dst * column + addend`` in place (ScalarE scale, VectorE add): a carried state advanced."""
    nisa.tensor_tensor(dst=dst, data1=scaled(dst, column), data2=addend, op=nl.add)


def combined(first, second, op, dtype=F32):
    """VectorE: a new SBUF tile ``op(first, second)``."""
    result = nl.ndarray(first.shape, dtype=dtype, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=result, data1=first, data2=second, op=op)
    return result


def row_sum(tile, out_column, scale=1.0):
    """ScalarE: ``out_column[p] = Σ_f scale[p] * tile[p, f]``, through the activation reduce registers."""
    discard = nl.ndarray(tile.shape, dtype=F32, buffer=nl.sbuf)
    nisa.activation(
        dst=discard,
        op=nl.copy,
        data=tile,
        scale=scale,
        reduce_op=nl.add,
        reduce_res=out_column,
        reduce_cmd=nisa.reduce_cmd.reset_reduce,
    )


def row_dot(first, second, out_column, scale=1.0):
    """``out_column[p] = scale[p] * Σ_f first[p, f] * second[p, f]`` (VectorE product, ScalarE row sum)."""
    row_sum(combined(first, second, nl.multiply), out_column, scale)
