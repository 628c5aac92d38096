"""Chunked state-space-duality scan with an explicit chunked backward (DESIGN §2.1, backend ``torch``).

The sequence is cut into chunks of length Q. With ``a_t = dt_t A_h <= 0`` (log of the decay), its running sum
within the chunk ``P_t = a_1 + ... + a_t`` and ``u_t = dt_t x_t`` (the scaled input), per head and chunk:

    L[t, s]   = exp(P_t - P_s) for t >= s, else 0     decay from step s to step t
    Y_diag    = (L ∘ C Bᵀ) u                          intra-chunk, one [Q, Q] matmul per head
    S_c       = uᵀ (exp(P_end - P) ∘ B)               what the chunk adds to the state, [P, N]
    H_c       = exp(P_end) H_{c-1} + S_c              short scan over chunks, H_{-1} = initial state
    Y_off     = (exp(P) ∘ C) H_{c-1}ᵀ                 the state entering the chunk, read out

The running sums P are taken in fp64 (and split into fp32 high and low parts), so a difference P_t - P_s is
about as precise as its own sum rounded to fp32: long chunks with strong decay lose no precision to cancellation.
Every exponent is clamped to [-60, 0]: a decay below e^-60 ≈ 1e-26 is far under the fp32 rounding of the unit
decay of the current step, while x86 CPUs evaluate exp of -inf, or with a result under 1e-38, and arithmetic on
such denormals 10-100× slower.

The backward runs the same pieces in reverse (the chunk scan backwards, every matmul transposed), so it is as
matmul-heavy as the forward; it is also the template of the NKI kernels. Heads of a group share B and C: C Bᵀ is
computed once per group, the decay-weighted B and C (small, [Q, N]) per head.

Everything here is fp32 and in chunked layouts: heads ``[Bt, H, nc, Q, ·]``, groups ``[Bt, G, nc, Q, N]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Exponents below this are raised to it (see the module docstring): exp(-60) ≈ 8.8e-27.
MIN_LOG_DECAY = -60.0


def _exp(log_decay: Tensor) -> Tensor:
    """fp32 ``exp`` of a log-decay <= 0 (fp32 or fp64), clamped to [MIN_LOG_DECAY, 0]."""
    return log_decay.clamp(MIN_LOG_DECAY, 0.0).float().exp_()


def decay_matrix(prefix: Tensor) -> Tensor:
    """``exp(P_t - P_s)`` for ``t >= s`` and **1** above the diagonal, where the caller masks C Bᵀ instead.

    prefix: [..., Q] running sums P in fp64 -> [..., Q, Q] fp32. P is split into fp32 high and low parts, so the
    differences are as precise as fp64 ones rounded to fp32 while every [Q, Q] operation stays in fp32.
    """
    high = prefix.float()
    low = (prefix - high.double()).float()
    seg = torch.sub(high.unsqueeze(-1), high.unsqueeze(-2))
    seg.add_(low.unsqueeze(-1)).sub_(low.unsqueeze(-2))
    return seg.clamp_(MIN_LOG_DECAY, 0.0).exp_()  # above the diagonal P_t - P_s >= 0 becomes exp(0)


def _segment_sums_backward(grad_seg: Tensor, by_matmul: bool | None = None) -> Tensor:
    """Adjoint of ``seg[t, s] = P_t - P_s`` as a function of the a_k: ``Σ_{t >= k > s} grad_seg[t, s]``.

    grad_seg: [..., Q, Q], zero on and above the diagonal, **overwritten** on the CPU (a fresh [Q, Q] buffer per
    head costs more than the arithmetic) -> [..., Q]. Summed directly, no difference of larger sums, so the
    gradient of weak decays stays exact next to strong ones. The running sums along each row are a cumsum on
    the CPU and, by default on CUDA (``by_matmul``), a product with a triangle of ones: CUDA's scan along a
    short innermost dimension took a quarter of a Mamba-2 training step on an H100.
    """
    q = grad_seg.shape[-1]
    ones = torch.ones(q, q, dtype=grad_seg.dtype, device=grad_seg.device)
    if by_matmul is None:
        by_matmul = grad_seg.is_cuda
    if by_matmul:
        row_prefix = grad_seg @ ones.triu()  # [t, j] = Σ_{s <= j} grad_seg[t, s]
    else:
        row_prefix = grad_seg.cumsum_(dim=-1)
    below = row_prefix.mul_(ones.tril(-1)).sum(dim=-2)  # [j] = Σ_{t > j} Σ_{s <= j}: the sum for k = j + 1
    return torch.nn.functional.pad(below[..., :-1], (1, 0))


def _exclusive_cumsum(values: Tensor) -> Tensor:
    """``out[..., k] = Σ_{j < k} values[..., j]``; values: [..., Q]."""
    return torch.nn.functional.pad(values[..., :-1], (1, 0)).cumsum(dim=-1)


def _per_group(heads: Tensor, groups: int) -> Tensor:
    """View a head tensor [Bt, H, ...] as [Bt, G, R, ...], R = H / G heads sharing one B/C group."""
    return heads.view(heads.shape[0], groups, heads.shape[1] // groups, *heads.shape[2:])


def _weight_groups(values: Tensor, weights: Tensor) -> Tensor:
    """Per-head copies of a group tensor: values [Bt, G, nc, Q, N] ∘ weights [Bt, H, nc, Q] -> [Bt, H, nc, Q, N]."""
    return (values.unsqueeze(2) * _per_group(weights, values.shape[1]).unsqueeze(-1)).flatten(1, 2)


def _sum_groups(heads: Tensor, weights: Tensor, groups: int) -> Tensor:
    """Adjoint of :func:`_weight_groups` in ``values``: Σ over the heads of a group of heads ∘ weights."""
    return (_per_group(heads, groups) * _per_group(weights, groups).unsqueeze(-1)).sum(dim=2)


def _flat(chunked: Tensor) -> Tensor:
    """[Bt, H, nc, X, Y] -> [Bt·H·nc, X, Y], the batch of one bmm (a view)."""
    return chunked.flatten(0, 2)


class ChunkedScan(torch.autograd.Function):
    """The chunked scan on prepared fp32 inputs.

    Forward inputs: u [Bt, H, nc, Q, P] (dt·x), log_decay [Bt, H, nc, Q] (dt·A, <= 0), B and C [Bt, G, nc, Q, N],
    initial_state [Bt, H, P, N]. Returns y [Bt, H, nc, Q, P] (without the D skip) and
    final_state [Bt, H, P, N].
    """

    @staticmethod
    def forward(ctx, u: Tensor, log_decay: Tensor, B: Tensor, C: Tensor, initial_state: Tensor):
        # The scan is defined in fp32; an enclosing autocast must not turn its matmuls into bf16.
        with torch.autocast(u.device.type, enabled=False):
            return ChunkedScan._forward(ctx, u, log_decay, B, C, initial_state)

    @staticmethod
    def backward(ctx, grad_y: Tensor, grad_final: Tensor):
        with torch.autocast(grad_y.device.type, enabled=False):
            return ChunkedScan._backward(ctx, grad_y.float(), grad_final.float())

    @staticmethod
    def _forward(ctx, u: Tensor, log_decay: Tensor, B: Tensor, C: Tensor, initial_state: Tensor):
        groups = B.shape[1]
        prefix = log_decay.double().cumsum(dim=-1)  # [Bt, H, nc, Q]: P_t
        total = prefix[..., -1:]  # P_end
        decay = decay_matrix(prefix)  # [Bt, H, nc, Q, Q]
        scores = (C @ B.transpose(-1, -2)).tril_()  # [Bt, G, nc, Q, Q]; zero above the diagonal, as L is
        mixer = (_per_group(decay, groups) * scores.unsqueeze(2)).flatten(1, 2)

        to_end = _exp(total - prefix)  # [Bt, H, nc, Q]
        from_start = _exp(prefix)
        B_to_end = _weight_groups(B, to_end)  # [Bt, H, nc, Q, N]
        C_from_start = _weight_groups(C, from_start)
        chunk_states = u.transpose(-1, -2) @ B_to_end  # [Bt, H, nc, P, N]

        chunk_decay = _exp(total.squeeze(-1))  # [Bt, H, nc]
        entering = torch.empty_like(chunk_states)  # [Bt, H, nc, P, N]: H_{c-1} for every chunk c
        state = initial_state
        for c in range(u.shape[2]):
            entering[:, :, c] = state
            state = chunk_decay[:, :, c, None, None] * state + chunk_states[:, :, c]

        # y = Y_diag + Y_off, the second accumulated onto the first by the same batched matmul.
        y = (_flat(mixer) @ _flat(u)).baddbmm_(_flat(C_from_start), _flat(entering).transpose(-1, -2))
        ctx.save_for_backward(
            u, B, C, decay, scores, mixer, to_end, from_start, B_to_end, C_from_start, chunk_decay, entering
        )
        return y.view_as(u), state

    @staticmethod
    def _backward(ctx, grad_y: Tensor, grad_final: Tensor):
        u, B, C, decay, scores, mixer, to_end, from_start, B_to_end, C_from_start, chunk_decay, entering = (
            ctx.saved_tensors
        )
        groups = B.shape[1]
        grad_y = grad_y.contiguous()

        # Y_off = C_from_start H_{c-1}ᵀ
        grad_C_from_start = grad_y @ entering  # [Bt, H, nc, Q, N]
        grad_entering = grad_y.transpose(-1, -2) @ C_from_start  # [Bt, H, nc, P, N]

        # The chunk scan, backwards: state_grad is dL/dH_c.
        grad_chunk_states = torch.empty_like(entering)
        grad_chunk_log_decay = torch.empty_like(chunk_decay)
        state_grad = grad_final
        for c in reversed(range(u.shape[2])):
            grad_chunk_states[:, :, c] = state_grad
            decayed = chunk_decay[:, :, c, None, None] * state_grad
            grad_chunk_log_decay[:, :, c] = (decayed * entering[:, :, c]).sum(dim=(-1, -2))
            state_grad = grad_entering[:, :, c] + decayed
        grad_initial_state = state_grad

        # S_c = uᵀ B_to_end and Y_diag = mixer u, both into grad_u.
        grad_B_to_end = u @ grad_chunk_states  # [Bt, H, nc, Q, N]
        grad_u = (_flat(B_to_end) @ _flat(grad_chunk_states).transpose(-1, -2)).baddbmm_(
            _flat(mixer).transpose(-1, -2), _flat(grad_y)
        )
        grad_u = grad_u.view_as(u)
        grad_decay = (grad_y @ u.transpose(-1, -2)).mul_(decay)  # dL/dmixer ∘ L: [Bt, H, nc, Q, Q]
        grad_scores = _per_group(grad_decay, groups).sum(dim=2).tril_()
        grad_C = _sum_groups(grad_C_from_start, from_start, groups) + grad_scores @ B
        grad_B = _sum_groups(grad_B_to_end, to_end, groups) + grad_scores.transpose(-1, -2) @ C
        grad_seg = _per_group(grad_decay, groups).mul_(scores.tril(-1).unsqueeze(2)).flatten(1, 2)  # reused buffer

        # The log-decays enter through L (segments), exp(P_t) in C_from_start, exp(P_end - P_s) in B_to_end and the
        # chunk's total decay exp(P_end).
        grad_prefix = (grad_C_from_start * C_from_start).sum(dim=-1)  # dL/dP_t
        grad_to_end = (grad_B_to_end * B_to_end).sum(dim=-1)  # dL/d(Σ_{k > s} a_k)
        grad_log_decay = (
            _segment_sums_backward(grad_seg)
            + grad_prefix.flip(-1).cumsum(dim=-1).flip(-1)  # P_t = Σ_{k <= t} a_k
            + _exclusive_cumsum(grad_to_end)
            + grad_chunk_log_decay.unsqueeze(-1)  # the chunk's total decay involves every a_k
        )
        return grad_u, grad_log_decay, grad_B, grad_C, grad_initial_state
