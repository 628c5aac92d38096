"""Backward NKI kernel of the chunked SSM scan: gradients of every input (derivation in README.md here).

Two passes per batch row. The first recomputes the state entering every chunk (only the state
recurrence, no outputs) into an HBM scratch tensor. The second walks the chunks backwards carrying the
state gradient Γ = dL/dS in SBUF, in both layouts [P, N] and [N, P] (each feeds a different matmul;
every head's side by side: [P, H*N] and [N, H*P]), and produces dx, ddt, dB, dC of the chunk plus the
chunk's share of dA and dD, added to SBUF sums. The chunk loops are ``sequential_range``; the batch loop
too, since the dA/dD sums carry across rows; groups and heads are ``affine_range``. As in the forward,
T is a multiple of Q (the op wrapper pads with dt = 0 steps).
"""

from __future__ import annotations

from neuron_kernels.nki_compat import nisa, nki, nl
from neuron_kernels.ssm_scan.forward import (
    MAX_TILE,
    ChunkInputs,
    GroupInputs,
    intra_chunk_decay,
    load_states_transposed,
)
from neuron_kernels.ssm_scan.tiles import (
    F32,
    Masks,
    broadcast_vector,
    combined,
    decay_and_add,
    evacuate,
    load,
    row_dot,
    row_sum,
    scaled,
    transpose,
)


@nki.jit
def ssm_scan_bwd(x, dt, A, B, C, D, initial_state, d_y, d_final_state, chunk_size):
    """Gradients of :func:`ssm_scan_fwd` given d_y [Bt, T, H, P] and d_final_state [Bt, H, P, N].

    Returns dx (x's dtype), ddt (dt's dtype), dA [H] fp32, dB, dC (B's and C's dtypes), then dD [H] fp32
    only when D is given, and d_initial_state [Bt, H, P, N] fp32.
    """
    batch, time, heads, head_dim = x.shape
    state_dim = B.shape[3]
    assert max(chunk_size, head_dim, state_dim) <= MAX_TILE, "Q, P and N must be <= 128 (see check_shapes)"
    assert time % chunk_size == 0, "T must be a multiple of chunk_size (the op wrapper pads it)"
    chunks = time // chunk_size
    dx = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    ddt = nl.ndarray(dt.shape, dtype=dt.dtype, buffer=nl.shared_hbm)
    dB = nl.ndarray(B.shape, dtype=B.dtype, buffer=nl.shared_hbm)
    dC = nl.ndarray(C.shape, dtype=C.dtype, buffer=nl.shared_hbm)
    dA = nl.ndarray((heads,), dtype=F32, buffer=nl.shared_hbm)
    d_initial_state = nl.ndarray((batch, heads, head_dim, state_dim), dtype=F32, buffer=nl.shared_hbm)
    masks = Masks(max(chunk_size, state_dim, head_dim))
    a_columns = broadcast_vector(A, chunk_size, masks)
    d_columns = None if D is None else broadcast_vector(D, chunk_size, masks)
    # dA and dD sum over every step of every batch row: SBUF rows each chunk adds its PSUM result to.
    sums = {"dA": nl.ndarray((1, heads), dtype=F32, buffer=nl.sbuf)}
    if D is not None:
        sums["dD"] = nl.ndarray((1, heads), dtype=F32, buffer=nl.sbuf)
    for total in sums.values():
        nisa.memset(dst=total, value=0.0)
    for b in nl.sequential_range(0, batch, 1):
        chunk_states = nl.ndarray((chunks, heads, state_dim, head_dim), dtype=F32, buffer=nl.hbm)
        _recompute_states(x, dt, B, initial_state, b, chunk_size, a_columns, chunk_states, masks)
        grads = nl.ndarray((head_dim, heads * state_dim), dtype=F32, buffer=nl.sbuf)  # Γ [P, N] per head
        grads_t = nl.ndarray((state_dim, heads * head_dim), dtype=F32, buffer=nl.sbuf)  # Γᵀ [N, P] per head
        for h in nl.affine_range(heads):
            grad = grads[:, h * state_dim : (h + 1) * state_dim]
            nisa.dma_copy(dst=grad, src=d_final_state[b, h])
            nisa.tensor_copy(dst=grads_t[:, h * head_dim : (h + 1) * head_dim], src=transpose(grad))
        for step in nl.sequential_range(0, chunks, 1):
            index = chunks - 1 - step
            inputs = (x, dt, B, C, d_y, b, index * chunk_size, chunk_size, a_columns, d_columns)
            outputs = (dx, ddt, dB, dC, sums)
            _backward_chunk(inputs, outputs, chunk_states[index], grads, grads_t, masks)
        for h in nl.affine_range(heads):
            nisa.dma_copy(dst=d_initial_state[b, h], src=grads[:, h * state_dim : (h + 1) * state_dim])
    nisa.dma_copy(dst=dA, src=sums["dA"])
    if D is None:
        return dx, ddt, dA, dB, dC, d_initial_state
    dD = nl.ndarray((heads,), dtype=F32, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=dD, src=sums["dD"])
    return dx, ddt, dA, dB, dC, dD, d_initial_state


def _recompute_states(x, dt, B, initial_state, b, chunk, a_columns, chunk_states, masks):
    """Write Sᵀ [N, P] entering every chunk of batch row b to ``chunk_states`` [chunks, H, N, P]."""
    time, heads, head_dim = x.shape[1], x.shape[2], x.shape[3]
    groups, state_dim = B.shape[2], B.shape[3]
    chunks = time // chunk
    states = nl.ndarray((state_dim, heads * head_dim), dtype=F32, buffer=nl.sbuf)
    load_states_transposed(initial_state, b, states, head_dim)
    # The state entering the last chunk is stored after the loop, so no iteration ends early.
    for c in nl.sequential_range(0, chunks - 1, 1):
        _store_states(states, chunk_states[c], head_dim)
        inputs = ChunkInputs(x, dt, b, c * chunk, chunk, a_columns, state_dim, masks)
        to_end = inputs.decay_to_end(masks)
        for g in nl.affine_range(groups):
            b_tile = load(B[b, c * chunk : (c + 1) * chunk, g], chunk, state_dim)
            _advance_group_states(inputs, to_end, b_tile, g, heads // groups, states)
    _store_states(states, chunk_states[chunks - 1], head_dim)


def _store_states(states, chunk_states_row, head_dim: int) -> None:
    """``states`` [N, H*P] -> ``chunk_states_row`` [H, N, P] (one DMA per head)."""
    for h in nl.affine_range(chunk_states_row.shape[0]):
        nisa.dma_copy(dst=chunk_states_row[h], src=states[:, h * head_dim : (h + 1) * head_dim])


def _advance_group_states(inputs: ChunkInputs, to_end, b_tile, g: int, per_group: int, states) -> None:
    """Sᵀ_h <- exp(l_end) Sᵀ_h + Σ_s w_s B_s u_sᵀ for every head h of group g (``to_end`` w [Q, H])."""
    length, head_dim, state_dim = inputs.length, inputs.head_dim, b_tile.shape[1]
    for j in nl.affine_range(per_group):
        h = g * per_group + j
        weighted_b = nl.ndarray((length, state_dim), dtype=F32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=weighted_b, data=b_tile, op0=nl.multiply, operand0=to_end[:, h : h + 1])
        state_psum = nl.ndarray((state_dim, head_dim), dtype=F32, buffer=nl.psum)
        nisa.nc_matmul(dst=state_psum, stationary=weighted_b, moving=scaled(inputs.x_head(h), inputs.dt[:, h : h + 1]))
        state = states[:, h * head_dim : (h + 1) * head_dim]
        decay_and_add(state, inputs.decay_total[:, h : h + 1], state_psum)


class _ChunkGradients(nl.NKIObject):
    """Per-chunk [partitions, H] columns the heads fill in, reduced over the chunk once all heads are done.

    ``log_decay`` dl'_t (terms with a fixed t), ``to_end`` q_s (weight of step s in the end state),
    ``state`` K_n (exp(l_end) Γ·S_prev per state row), ``dt_direct`` x_s·du_s, ``skip`` g_t·x_t.
    """

    def __init__(self, length: int, heads: int, state_dim: int, with_skip: bool) -> None:
        self.log_decay = nl.ndarray((length, heads), dtype=F32, buffer=nl.sbuf)
        self.to_end = nl.ndarray((length, heads), dtype=F32, buffer=nl.sbuf)
        self.state = nl.ndarray((state_dim, heads), dtype=F32, buffer=nl.sbuf)
        self.dt_direct = nl.ndarray((length, heads), dtype=F32, buffer=nl.sbuf)
        self.skip = nl.ndarray((length, heads), dtype=F32, buffer=nl.sbuf) if with_skip else None


def _backward_chunk(inputs, outputs, chunk_states, grads, grads_t, masks):
    """One chunk, all heads: writes dx, ddt, dB, dC of the chunk, adds to dA/dD, carries Γ to the chunk start."""
    x, dt, B, C, d_y, b, start, length, a_columns, d_columns = inputs
    dx, ddt, dB, dC, sums = outputs
    heads, head_dim = x.shape[2], x.shape[3]
    groups, state_dim = B.shape[2], B.shape[3]
    stop = start + length
    chunk = ChunkInputs(x, dt, b, start, length, a_columns, max(state_dim, head_dim), masks)
    to_end = chunk.decay_to_end(masks)
    dy_all = load(d_y[b, start:stop], length, heads * head_dim)
    dx_all = nl.ndarray((length, heads * head_dim), dtype=F32, buffer=nl.sbuf)
    columns = _ChunkGradients(length, heads, state_dim, d_columns is not None)
    for g in nl.affine_range(groups):
        group = GroupInputs(B, C, b, start, length, g)
        carried = (chunk_states, grads, grads_t)
        rows = (dy_all, dx_all, to_end, d_columns)
        d_b, d_c = _backward_group(chunk, group, g, heads // groups, rows, carried, columns, masks)
        nisa.dma_copy(dst=dB[b, start:stop, g], src=d_b)
        nisa.dma_copy(dst=dC[b, start:stop, g], src=d_c)
    nisa.dma_copy(dst=dx[b, start:stop], src=dx_all)
    _log_decay_gradients(chunk, columns, a_columns, ddt[b, start:stop], sums, masks)


def _backward_group(chunk, group, g: int, per_group: int, rows, carried, columns, masks):
    """Every head of group g; returns dB, dC of the group [Q, N] (SBUF), summed over its heads in PSUM.

    The PSUM tiles live only inside this call, so the chunk's later steps find their banks free.
    """
    dy_all, dx_all, to_end, d_columns = rows
    chunk_states, grads, grads_t = carried
    head_dim, state_dim = chunk.head_dim, group.b.shape[1]
    db_psum = nl.ndarray((chunk.length, state_dim), dtype=F32, buffer=nl.psum)
    dc_psum = nl.ndarray((chunk.length, state_dim), dtype=F32, buffer=nl.psum)
    for j in nl.affine_range(per_group):
        h = g * per_group + j
        head_columns = slice(h * head_dim, (h + 1) * head_dim)
        state_columns = slice(h * state_dim, (h + 1) * state_dim)
        head = _Head(chunk, group, h, dy_all[:, head_columns], to_end, d_columns, masks)
        state_prev = load(chunk_states[h], state_dim, head_dim)
        head.score_gradients(state_prev, columns)
        head.input_gradients(grads_t[:, head_columns], dx_all[:, head_columns], columns)
        head.add_projection_gradients(db_psum, dc_psum, state_prev, grads[:, state_columns])
        head.carry_state_gradient(grads[:, state_columns], grads_t[:, head_columns], state_prev, columns)
    return evacuate(db_psum), evacuate(dc_psum)


def _log_decay_gradients(chunk: ChunkInputs, columns: _ChunkGradients, a_columns, ddt_rows, sums, masks):
    """dla_u = Σ_{t >= u} dl'_t + Σ_{s < u} q_s + Σ_n K_n (three matmuls, one accumulation group); then
    ddt = x·du + A dla, dA += Σ_u dt_u dla_u and dD += Σ_t g_t·x_t."""
    length, state_dim = chunk.length, columns.state.shape[0]
    dla_psum = nl.ndarray(chunk.dt.shape, dtype=F32, buffer=nl.psum)
    nisa.nc_matmul(
        dst=dla_psum, stationary=masks.lower[0:length, 0:length], moving=columns.log_decay, is_stationary_onezero=True
    )
    nisa.nc_matmul(
        dst=dla_psum,
        stationary=masks.strict_upper[0:length, 0:length],
        moving=columns.to_end,
        is_stationary_onezero=True,
    )
    nisa.nc_matmul(
        dst=dla_psum, stationary=masks.ones[0:state_dim, 0:length], moving=columns.state, is_stationary_onezero=True
    )
    through_decay = combined(a_columns[0:length, :], dla_psum, nl.multiply)
    nisa.dma_copy(dst=ddt_rows, src=combined(through_decay, columns.dt_direct, nl.add))
    ones_column = masks.ones[0:length, 0:1]
    _add_column_sums(sums["dA"], ones_column, combined(chunk.dt, dla_psum, nl.multiply))
    if columns.skip is not None:
        _add_column_sums(sums["dD"], ones_column, columns.skip)


def _add_column_sums(total, ones_column, tile) -> None:
    """``total`` [1, H] (SBUF) += Σ_t tile[t, :]: a ones matmul whose PSUM group closes within the chunk."""
    sums_psum = nl.ndarray(total.shape, dtype=F32, buffer=nl.psum)
    nisa.nc_matmul(dst=sums_psum, stationary=ones_column, moving=tile, is_stationary_onezero=True)
    nisa.tensor_tensor(dst=total, data1=total, data2=sums_psum, op=nl.add)


class _Head(nl.NKIObject):
    """The backward of one head in one chunk; each step keeps its PSUM tiles local (8 banks in all).

    Notation (README): s, t steps of the chunk, u_s = dt_s x_s, g_t = dy_t, L the intra-chunk decay,
    M = L ∘ (B Cᵀ), w_s = exp(l_end - l_s), e_t = exp(l_t), Γ = dL/dS_end.
    """

    def __init__(self, chunk: ChunkInputs, group: GroupInputs, h: int, dy_h, to_end, d_columns, masks) -> None:
        self.chunk, self.group, self.h, self.masks = chunk, group, h, masks
        self.length = chunk.length
        self.x = chunk.x_head(h)
        self.dy = dy_h
        self.dt = chunk.dt[:, h : h + 1]
        self.decay_in = chunk.decay_in[:, h : h + 1]
        self.to_end = to_end[:, h : h + 1]
        self.skip = None if d_columns is None else d_columns[0 : self.length, h : h + 1]
        self.decay = intra_chunk_decay(chunk.log_decay[:, h : h + 1], self.length, masks)
        self.mixing = combined(self.decay, group.scores, nl.multiply)
        self.u = scaled(self.x, self.dt)
        self.dy_decayed = scaled(self.dy, self.decay_in)  # e_t g_t

    def score_gradients(self, state_prev, columns: _ChunkGradients) -> None:
        """dScores = L ∘ (u_s·g_t) [s, t]; dl'_t = g_t·y_off_t + Σ_s R[s, t] - Σ_t' R[t, t'], R = M ∘ (u_s·g_t)."""
        length, h = self.length, self.h
        ug_psum = nl.ndarray((length, length), dtype=F32, buffer=nl.psum)
        nisa.nc_matmul(dst=ug_psum, stationary=transpose(self.u), moving=transpose(self.dy))
        self.d_scores = combined(self.decay, ug_psum, nl.multiply)
        sensitivity = combined(self.d_scores, self.group.scores, nl.multiply)  # R
        outgoing = nl.ndarray((length, 1), dtype=F32, buffer=nl.sbuf)
        row_sum(sensitivity, outgoing)
        incoming_psum = nl.ndarray((length, 1), dtype=F32, buffer=nl.psum)
        nisa.nc_matmul(dst=incoming_psum, stationary=sensitivity, moving=self.masks.ones[0:length, 0:1])
        off_psum = nl.ndarray((length, self.x.shape[1]), dtype=F32, buffer=nl.psum)
        nisa.nc_matmul(dst=off_psum, stationary=self.group.c_transposed, moving=state_prev)
        through_state = nl.ndarray((length, 1), dtype=F32, buffer=nl.sbuf)
        row_dot(self.dy, off_psum, through_state, scale=self.decay_in)
        net = combined(incoming_psum, outgoing, nl.subtract)
        nisa.tensor_tensor(dst=columns.log_decay[:, h : h + 1], data1=net, data2=through_state, op=nl.add)

    def input_gradients(self, grad_t, dx_h, columns: _ChunkGradients) -> None:
        """du_s = Σ_t M[s, t] g_t + w_s Γ B_s; dx = dt du + D g; q_s = u_s·(w_s Γ B_s); x·du and g·x."""
        h, head_dim = self.h, self.x.shape[1]
        within_psum = nl.ndarray((self.length, head_dim), dtype=F32, buffer=nl.psum)
        nisa.nc_matmul(dst=within_psum, stationary=transpose(self.mixing), moving=self.dy)
        from_state_psum = nl.ndarray((self.length, head_dim), dtype=F32, buffer=nl.psum)
        nisa.nc_matmul(dst=from_state_psum, stationary=self.group.b_transposed, moving=grad_t)
        from_state = scaled(from_state_psum, self.to_end)
        du = combined(from_state, within_psum, nl.add)
        row_dot(self.u, from_state, columns.to_end[:, h : h + 1])
        row_dot(self.x, du, columns.dt_direct[:, h : h + 1])
        if self.skip is None:
            nisa.activation(dst=dx_h, op=nl.copy, data=du, scale=self.dt)
            return
        nisa.tensor_tensor(dst=dx_h, data1=scaled(du, self.dt), data2=scaled(self.dy, self.skip), op=nl.add)
        row_dot(self.dy, self.x, columns.skip[:, h : h + 1])

    def add_projection_gradients(self, db_psum, dc_psum, state_prev, grad) -> None:
        """dC_t += Σ_s dScores[s, t] B_s + e_t S_prevᵀ g_t;  dB_s += Σ_t dScores[s, t] C_t + w_s Γᵀ u_s."""
        nisa.nc_matmul(dst=dc_psum, stationary=self.d_scores, moving=self.group.b)
        # One evacuation on VectorE keeps ScalarE, the busier engine of this kernel, from bounding it alone.
        state_prev_rows = transpose(state_prev, on_scalar_engine=False)
        nisa.nc_matmul(dst=dc_psum, stationary=transpose(self.dy_decayed), moving=state_prev_rows)
        nisa.nc_matmul(dst=db_psum, stationary=transpose(self.d_scores), moving=self.group.c)
        nisa.nc_matmul(dst=db_psum, stationary=transpose(scaled(self.u, self.to_end)), moving=grad)

    def carry_state_gradient(self, grad, grad_t, state_prev, columns: _ChunkGradients) -> None:
        """Γ, Γᵀ in place to the chunk start: exp(l_end) Γ + Σ_t e_t g_t C_tᵀ; also K_n = exp(l_end) Γᵀ·S_prev."""
        h, head_dim, state_dim = self.h, self.x.shape[1], self.group.b.shape[1]
        decay_total = self.chunk.decay_total
        row_dot(grad_t, state_prev, columns.state[:, h : h + 1], scale=decay_total[0:state_dim, h : h + 1])
        grad_psum = nl.ndarray((head_dim, state_dim), dtype=F32, buffer=nl.psum)
        nisa.nc_matmul(dst=grad_psum, stationary=self.dy_decayed, moving=self.group.c)
        grad_t_psum = nl.ndarray((state_dim, head_dim), dtype=F32, buffer=nl.psum)
        nisa.nc_matmul(dst=grad_t_psum, stationary=self.group.c, moving=self.dy_decayed)
        decay_and_add(grad, decay_total[0:head_dim, h : h + 1], grad_psum)
        decay_and_add(grad_t, decay_total[0:state_dim, h : h + 1], grad_t_psum)
