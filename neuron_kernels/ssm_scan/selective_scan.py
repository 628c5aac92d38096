"""The VectorE-bound selective-scan design (forward only): the baseline the chunked kernels are measured against.

It is the structure of the public NKI Mamba kernels (the NKI fused-Mamba tutorial, nki-library's
``experimental/scan/selective_scan.py``): channels c = (h, p) on partitions in tiles of 128, time on the
free axis in tiles of up to 512, and for every state n one ``tensor_tensor_scan`` (S_t = a_t S_{t-1} + b_t)
per channel tile, with the B_n and C_n rows broadcast to the channel partitions on TensorE. Like those
kernels it takes channel-major inputs: x_cm [Bt, H*P, T], dt_cm [Bt, H, T], B_cm/C_cm [Bt, G, N, T]; A, D
[H]; initial_state [Bt, H, P, N] or None. Every channel tile must hold whole heads of a single group.
"""

from __future__ import annotations

from neuron_kernels.nki_compat import nisa, nki, nl
from neuron_kernels.ssm_scan.tiles import F32, Masks, combined, load, matmul, scaled

CHANNEL_TILE = 128
TIME_TILE = 512


def _head_blocks(head_dim: int):
    """E [128 / P, 128]: E[j, c] = 1 when channel c belongs to head j of the tile (a broadcast stationary)."""
    heads_per_tile = CHANNEL_TILE // head_dim
    ones = nl.ndarray((heads_per_tile, CHANNEL_TILE), dtype=F32, buffer=nl.sbuf)
    nisa.memset(dst=ones, value=1.0)
    from_start = nl.ndarray((heads_per_tile, CHANNEL_TILE), dtype=F32, buffer=nl.sbuf)
    nisa.affine_select(
        dst=from_start,
        pattern=[[1, CHANNEL_TILE]],
        offset=0,
        channel_multiplier=-head_dim,
        on_true_tile=ones,
        on_false_value=0.0,
        cmp_op=nl.greater_equal,
    )  # fmt: skip  (c - P j >= 0)
    blocks = nl.ndarray((heads_per_tile, CHANNEL_TILE), dtype=F32, buffer=nl.sbuf)
    nisa.affine_select(
        dst=blocks,
        pattern=[[-1, CHANNEL_TILE]],
        offset=head_dim - 1,
        channel_multiplier=head_dim,
        on_true_tile=from_start,
        on_false_value=0.0,
        cmp_op=nl.greater_equal,
    )  # fmt: skip  (P - 1 - c + P j >= 0)
    return blocks


def _per_channel(vector, first_head: int, blocks):
    """[128, 1] column: vector[h] for every channel of heads first_head ... of the tile."""
    heads_per_tile = blocks.shape[0]
    return matmul(blocks, load(vector[first_head : first_head + heads_per_tile], heads_per_tile, 1))


@nki.jit
def selective_scan_fwd(x_cm, dt_cm, A, B_cm, C_cm, D, initial_state):
    """y_cm [Bt, H*P, T] (x's dtype) and final_state [Bt, H, P, N] fp32 of the scan of DESIGN §2.1."""
    batch, channels, time = x_cm.shape
    heads = dt_cm.shape[1]
    head_dim = channels // heads
    groups, state_dim = B_cm.shape[1], B_cm.shape[2]
    heads_per_tile = CHANNEL_TILE // head_dim
    assert CHANNEL_TILE % head_dim == 0 and (heads // groups) % heads_per_tile == 0, (
        "tiles hold whole heads of one group"
    )
    y_cm = nl.ndarray(x_cm.shape, dtype=x_cm.dtype, buffer=nl.shared_hbm)
    final_state = nl.ndarray((batch, heads, head_dim, state_dim), dtype=F32, buffer=nl.shared_hbm)
    final_rows = final_state.reshape((batch * channels, state_dim))
    blocks = _head_blocks(head_dim)
    masks = Masks(CHANNEL_TILE)
    for b in range(batch):
        for first in range(0, channels, CHANNEL_TILE):
            rows = slice(b * channels + first, b * channels + first + CHANNEL_TILE)
            if initial_state is None:
                carry = nl.ndarray((CHANNEL_TILE, state_dim), dtype=F32, buffer=nl.sbuf)
                nisa.memset(dst=carry, value=0.0)
            else:
                carry = load(initial_state.reshape((batch * channels, state_dim))[rows], CHANNEL_TILE, state_dim)
            first_head = first // head_dim
            tile = (x_cm, dt_cm, B_cm, C_cm, b, first, first_head * groups // heads)
            columns = (_per_channel(A, first_head, blocks), _per_channel(D, first_head, blocks))
            for start in range(0, time, TIME_TILE):
                _time_tile(tile, columns, start, min(TIME_TILE, time - start), carry, blocks, masks, y_cm)
            nisa.dma_copy(dst=final_rows[rows], src=carry)
    return y_cm, final_state


def _time_tile(tile, columns, start, length, carry, blocks, masks, y_cm):
    """One [128 channels, length] block: N scans, each carried from the previous time tile through ``carry``."""
    x_cm, dt_cm, B_cm, C_cm, b, first, g = tile
    a_column, d_column = columns
    heads_per_tile, state_dim = blocks.shape[0], B_cm.shape[2]
    stop = start + length
    x_tile = load(x_cm[b, first : first + CHANNEL_TILE, start:stop], CHANNEL_TILE, length)
    first_head = first * heads_per_tile // CHANNEL_TILE
    dt_tile = matmul(
        blocks, load(dt_cm[b, first_head : first_head + heads_per_tile, start:stop], heads_per_tile, length)
    )
    decay = nl.ndarray((CHANNEL_TILE, length), dtype=F32, buffer=nl.sbuf)
    nisa.activation(dst=decay, op=nl.exp, data=dt_tile, scale=a_column)  # a_t = exp(dt_t A_h)
    drive_base = combined(dt_tile, x_tile, nl.multiply)  # dt_t x_t
    b_rows = load(B_cm[b, g, :, start:stop], state_dim, length)
    c_rows = load(C_cm[b, g, :, start:stop], state_dim, length)
    y_tile = scaled(x_tile, d_column)  # D_h x_t
    for n in range(state_dim):
        pick = nl.ndarray((state_dim, CHANNEL_TILE), dtype=F32, buffer=nl.sbuf)  # row n of ones: broadcasts row n
        nisa.affine_select(
            dst=pick, pattern=[[0, CHANNEL_TILE]], offset=-n, channel_multiplier=1,
            on_true_tile=masks.ones[0:state_dim, :], on_false_value=0.0, cmp_op=nl.equal,
        )  # fmt: skip
        b_broadcast = nl.ndarray((CHANNEL_TILE, length), dtype=F32, buffer=nl.psum)
        nisa.nc_matmul(dst=b_broadcast, stationary=pick, moving=b_rows)
        states = nl.ndarray((CHANNEL_TILE, length), dtype=F32, buffer=nl.sbuf)
        nisa.tensor_tensor_scan(
            dst=states, data0=decay, data1=combined(drive_base, b_broadcast, nl.multiply),
            initial=carry[:, n : n + 1], op0=nl.multiply, op1=nl.add,
        )  # fmt: skip
        nisa.tensor_copy(dst=carry[:, n : n + 1], src=states[:, length - 1 : length])
        c_broadcast = nl.ndarray((CHANNEL_TILE, length), dtype=F32, buffer=nl.psum)
        nisa.nc_matmul(dst=c_broadcast, stationary=pick, moving=c_rows)
        y_tile = combined(y_tile, combined(states, c_broadcast, nl.multiply), nl.add)
    nisa.dma_copy(dst=y_cm[b, first : first + CHANNEL_TILE, start:stop], src=y_tile)
