"""Forward NKI kernel of the chunked SSM scan (DESIGN §2.1). Derivation and tiling: README.md here.

Per batch row the sequence is cut into chunks of Q <= 128 steps. Time sits on partitions for inputs and
outputs; the state of every head is kept transposed, Sᵀ [N, P], side by side in one SBUF tensor
[N, H*P] from chunk to chunk. Loops are NKI device loops: batch rows, groups and heads are
``affine_range`` (independent), the chunk loop a ``sequential_range`` (it carries the state), so the
program holds each loop body once. T must be a multiple of Q: the op wrapper pads the sequence with
dt = 0 steps, which leave the state unchanged and add nothing to any output or gradient.
"""

from __future__ import annotations

from neuron_kernels.nki_compat import nisa, nki, nl
from neuron_kernels.ssm_scan.tiles import (
    F32,
    Masks,
    broadcast_vector,
    combined,
    decay_and_add,
    exp_of_matmul,
    load,
    scaled,
    transpose,
)
from neuron_kernels.ssm_scan.tiles import matmul as matmul_to_sbuf

MAX_TILE = 128
SBUF_BYTES_PER_PARTITION = 192 * 1024  # NeuronCore-v2: 24 MiB over 128 partitions


def sbuf_bytes_per_partition(heads: int, head_dim: int, state_dim: int, chunk: int) -> tuple[int, int]:
    """Upper bounds of the SBUF bytes per partition the forward and the backward kernel hold at once (fp32).

    Per head: the forward's Sᵀ, x and y slices (P columns each) and 6 per-head columns ([Q, H] tiles such as
    dt and the decays); the backward's Γ (N columns), Γᵀ, x, dy, dx slices and 14 columns. Plus, independent
    of H: the 6 constant masks, then the largest working set of one group and one head, counted in tiles of
    Q, N and P columns. tests/test_nki_ssm_scan.py holds these against the interpreter's high-water marks.
    """
    masks_forward, masks_backward = max(chunk, state_dim), max(chunk, state_dim, head_dim)
    forward = heads * (3 * head_dim + 6) + 6 * masks_forward + 6 * chunk + 3 * state_dim + 2 * head_dim
    backward = heads * (state_dim + 4 * head_dim + 14) + 6 * masks_backward + 8 * chunk + 2 * state_dim + 7 * head_dim
    return 4 * forward, 4 * backward


def check_shapes(x, B, chunk_size: int) -> None:
    """Tile limits of the kernels, checked by the op wrapper before launching: Q, P, N <= 128 (partition
    dimension), G divides H, H <= 512, and the tiles held at once fit the SBUF of a partition."""
    time, heads, head_dim = x.shape[1], x.shape[2], x.shape[3]
    groups, state_dim = B.shape[2], B.shape[3]
    if not 1 <= chunk_size <= MAX_TILE:
        raise ValueError(f"ssm_scan nki kernel: chunk_size must be in [1, {MAX_TILE}], got {chunk_size}")
    if head_dim > MAX_TILE or state_dim > MAX_TILE:
        raise ValueError(
            f"ssm_scan nki kernel: head_dim P = {head_dim} and state N = {state_dim} must be <= {MAX_TILE}"
        )
    if heads % groups != 0:
        raise ValueError(f"ssm_scan nki kernel: groups G = {groups} must divide heads H = {heads}")
    if heads > 512:
        raise ValueError(f"ssm_scan nki kernel: at most 512 heads (one PSUM bank of per-head columns), got {heads}")
    forward, backward = sbuf_bytes_per_partition(heads, head_dim, state_dim, min(chunk_size, time))
    if max(forward, backward) > SBUF_BYTES_PER_PARTITION:
        raise ValueError(
            f"ssm_scan nki kernel: H = {heads}, P = {head_dim}, N = {state_dim} need {forward} (forward) and "
            f"{backward} (backward) SBUF bytes per partition; NeuronCore-v2 has {SBUF_BYTES_PER_PARTITION}: "
            "use fewer heads per call or a smaller head_dim"
        )


def load_states_transposed(initial_state, b: int, states, head_dim: int) -> None:
    """Fill ``states`` [N, H*P] with Sᵀ [N, P] of every head of batch row b: the initial state transposed, or 0."""
    if initial_state is None:
        nisa.memset(dst=states, value=0.0)
        return
    heads, state_dim = initial_state.shape[1], initial_state.shape[3]
    for h in nl.affine_range(heads):
        transposed = transpose(load(initial_state[b, h], head_dim, state_dim))
        nisa.tensor_copy(dst=states[:, h * head_dim : (h + 1) * head_dim], src=transposed)


@nki.jit
def ssm_scan_fwd(x, dt, A, B, C, D, initial_state, chunk_size):
    """y, final_state of the scan.

    x [Bt, T, H, P], dt [Bt, T, H], A [H], B/C [Bt, T, G, N], D [H] or None, initial_state [Bt, H, P, N] or
    None, T a multiple of chunk_size -> y [Bt, T, H, P] (x's dtype), final_state [Bt, H, P, N] fp32.
    """
    batch, time, heads, head_dim = x.shape
    state_dim = B.shape[3]
    assert max(chunk_size, head_dim, state_dim) <= MAX_TILE, "Q, P and N must be <= 128 (see check_shapes)"
    assert time % chunk_size == 0, "T must be a multiple of chunk_size (the op wrapper pads it)"
    y = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    final_state = nl.ndarray((batch, heads, head_dim, state_dim), dtype=F32, buffer=nl.shared_hbm)
    masks = Masks(max(chunk_size, state_dim))
    a_columns = broadcast_vector(A, chunk_size, masks)
    d_columns = None if D is None else broadcast_vector(D, chunk_size, masks)
    for b in nl.affine_range(batch):
        states = nl.ndarray((state_dim, heads * head_dim), dtype=F32, buffer=nl.sbuf)
        load_states_transposed(initial_state, b, states, head_dim)
        for c in nl.sequential_range(0, time // chunk_size, 1):
            _forward_chunk(x, dt, B, C, y, b, c * chunk_size, chunk_size, states, d_columns, a_columns, masks)
        for h in nl.affine_range(heads):
            state_h = transpose(states[:, h * head_dim : (h + 1) * head_dim])
            nisa.dma_copy(dst=final_state[b, h], src=state_h)
    return y, final_state


def chunk_decays(dt_all, a_columns, length: int, partitions: int, masks: Masks):
    """Per chunk, all heads at once: log decays a [Q_c, H], exp(l_t) [Q_c, H], exp(l_end) [partitions, H].

    l_t = Σ_{u <= t} a_u is an upper-triangular ones matmul (no cumulative-sum instruction needed);
    l_end lands on every partition through a ones stationary, ready to scale Sᵀ [N, P] or S [P, N].
    """
    log_decay = combined(dt_all, a_columns[0:length, :], nl.multiply)
    decay_in = exp_of_matmul(masks.upper[0:length, 0:length], log_decay)
    decay_total = exp_of_matmul(masks.ones[0:length, 0:partitions], log_decay)
    return log_decay, decay_in, decay_total


def intra_chunk_decay(log_decay_column, length: int, masks: Masks):
    """L[s, t] = exp(Σ_{s < u <= t} a_u) for t >= s, 0 above: [Q_c, Q_c] with source s on partitions.

    The segment sums come from one matmul, Σ_u [u > s] (a_u [u <= t]), so no difference of two large
    cumulative sums loses precision; exp sees only values <= 0 on the kept triangle.
    """
    weighted_upper = scaled(masks.upper[0:length, 0:length], log_decay_column)
    decay = exp_of_matmul(masks.strict_lower[0:length, 0:length], weighted_upper)
    masked = nl.ndarray((length, length), dtype=F32, buffer=nl.sbuf)
    nisa.affine_select(
        dst=masked,
        pattern=[[1, length]],
        offset=0,
        channel_multiplier=-1,
        on_true_tile=decay,
        on_false_value=0.0,
        cmp_op=nl.greater_equal,
    )
    return masked


class ChunkInputs(nl.NKIObject):
    """The tiles of one chunk shared by all heads: x [Q_c, H*P], dt [Q_c, H] and their decays."""

    def __init__(self, x, dt, b: int, start: int, length: int, a_columns, decay_partitions: int, masks: Masks):
        heads, head_dim = x.shape[2], x.shape[3]
        self.length, self.head_dim = length, head_dim
        self.x = load(x[b, start : start + length], length, heads * head_dim)
        self.dt = load(dt[b, start : start + length], length, heads)
        self.log_decay, self.decay_in, self.decay_total = chunk_decays(
            self.dt, a_columns, length, decay_partitions, masks
        )

    def x_head(self, h: int):
        return self.x[:, h * self.head_dim : (h + 1) * self.head_dim]

    def decay_to_end(self, masks: Masks):
        """exp(l_end - l_s) = exp(Σ_{u > s} a_u) [Q_c, H], the weight of step s in the chunk's end state."""
        return exp_of_matmul(masks.strict_lower[0 : self.length, 0 : self.length], self.log_decay)


class GroupInputs(nl.NKIObject):
    """B, C [Q_c, N], their transposes [N, Q_c] and the scores B_s·C_t [s, t] of group g, shared by its heads."""

    def __init__(self, B, C, b: int, start: int, length: int, g: int) -> None:
        state_dim = B.shape[3]
        self.b = load(B[b, start : start + length, g], length, state_dim)
        self.c = load(C[b, start : start + length, g], length, state_dim)
        self.b_transposed = transpose(self.b)
        self.c_transposed = transpose(self.c)
        self.scores = matmul_to_sbuf(self.b_transposed, self.c_transposed)


def _forward_chunk(x, dt, B, C, y, b, start, length, states, d_columns, a_columns, masks):
    """Advance every head of batch row b over steps [start, start + length); writes y, updates ``states``."""
    heads, head_dim = x.shape[2], x.shape[3]
    groups, state_dim = B.shape[2], B.shape[3]
    per_group = heads // groups
    chunk = ChunkInputs(x, dt, b, start, length, a_columns, state_dim, masks)
    y_all = nl.ndarray((length, heads * head_dim), dtype=y.dtype, buffer=nl.sbuf)
    for g in nl.affine_range(groups):
        group = GroupInputs(B, C, b, start, length, g)
        for j in nl.affine_range(per_group):
            h = g * per_group + j
            columns = slice(h * head_dim, (h + 1) * head_dim)
            _forward_head(chunk, group, h, d_columns, states[:, columns], y_all[:, columns], masks)
    nisa.dma_copy(dst=y[b, start : start + length], src=y_all)


def _forward_head(chunk: ChunkInputs, group: GroupInputs, h, d_columns, state, y_h, masks):
    """One head of one chunk: y_h [Q, P] <- diagonal + off-diagonal + skip terms; Sᵀ_h ``state`` [N, P] advanced."""
    length, head_dim, state_dim = chunk.length, chunk.head_dim, group.b.shape[1]
    x_h = chunk.x_head(h)
    decay = intra_chunk_decay(chunk.log_decay[:, h : h + 1], length, masks)
    mixing = combined(decay, group.scores, nl.multiply)  # M[s, t] = L[s, t] B_s·C_t
    u_h = scaled(x_h, chunk.dt[:, h : h + 1])  # u_s = dt_s x_s
    y_psum = nl.ndarray((length, head_dim), dtype=F32, buffer=nl.psum)
    nisa.nc_matmul(dst=y_psum, stationary=mixing, moving=u_h)  # Σ_s M[s, t] u_s
    if d_columns is not None:
        skip = scaled(masks.identity[0:length, 0:length], d_columns[:, h : h + 1])  # D_h I
        nisa.nc_matmul(dst=y_psum, stationary=skip, moving=x_h)  # + D_h x_t, same accumulation group
    off_psum = nl.ndarray((length, head_dim), dtype=F32, buffer=nl.psum)
    nisa.nc_matmul(dst=off_psum, stationary=group.c_transposed, moving=state)  # C_t · S_prev rows
    nisa.tensor_tensor(dst=y_h, data1=scaled(off_psum, chunk.decay_in[:, h : h + 1]), data2=y_psum, op=nl.add)
    # Sᵀ_new = exp(l_end) Sᵀ_prev + Σ_s exp(l_end - l_s) B_s u_sᵀ; the last column of L is exp(l_end - l_s).
    weighted_b = nl.ndarray((length, state_dim), dtype=F32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=weighted_b, data=group.b, op0=nl.multiply, operand0=decay[:, length - 1 : length])
    state_psum = nl.ndarray((state_dim, head_dim), dtype=F32, buffer=nl.psum)
    nisa.nc_matmul(dst=state_psum, stationary=weighted_b, moving=u_h)
    decay_and_add(state, chunk.decay_total[0:state_dim, h : h + 1], state_psum)
