"""Chunked state-space-duality scan with an explicit chunked backward (DESIGN §2.1, backend ``torch``).

The sequence is cut into chunks of length Q. With ``a_t = dt_t A_h`` (log of the decay) and
``u_t = dt_t x_t`` (the scaled input), per head and chunk:

    seg[t, s] = a_{s+1} + ... + a_t           (t >= s, -inf above the diagonal)
    Y_diag    = (exp(seg) ∘ C Bᵀ) u           intra-chunk, one [Q, Q] matmul per head
    S_c       = Σ_s exp(a_{s+1} + ... + a_end) u_s B_sᵀ    what the chunk adds to the state
    H_c       = exp(a_1 + ... + a_end) H_{c-1} + S_c       short scan over chunks, H_{-1} = initial state
    Y_off[t]  = exp(a_1 + ... + a_t) H_{c-1} C_t          the state entering the chunk, read out

The backward runs the same pieces in reverse (the chunk scan backwards, every matmul transposed), so it is
as matmul-heavy as the forward; it is also the template of the NKI kernels. Heads of a group share B and C:
the group's products are computed once and the R = H/G heads of a group are folded into one matmul
dimension instead of repeating B and C per head.

Everything here is fp32 and in chunked layouts: heads ``[Bt, H, nc, Q, ·]``, groups ``[Bt, G, nc, Q, N]``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def segment_sums(log_decay: Tensor) -> Tensor:
    """``seg[..., t, s] = Σ_{s < k <= t} log_decay[..., k]`` for ``t >= s``, ``-inf`` above the diagonal.

    log_decay: [..., Q] -> [..., Q, Q]. Summed directly rather than as a difference of cumulative sums, so
    long chunks with strong decay lose no precision, and the -inf mask means ``exp`` never sees a positive.
    """
    q = log_decay.shape[-1]
    ones = torch.ones(q, q, dtype=torch.bool, device=log_decay.device)
    rows = log_decay.unsqueeze(-1).expand(*log_decay.shape, q).masked_fill(~ones.tril(-1), 0.0)
    return rows.cumsum(dim=-2).masked_fill(~ones.tril(), float("-inf"))


def _segment_sums_backward(grad_seg: Tensor) -> Tensor:
    """Adjoint of :func:`segment_sums`: grad_seg [..., Q, Q] (zero above the diagonal) -> [..., Q]."""
    q = grad_seg.shape[-1]
    strictly_lower = torch.ones(q, q, dtype=torch.bool, device=grad_seg.device).tril(-1)
    from_row_on = grad_seg.flip(-2).cumsum(dim=-2).flip(-2)
    return from_row_on.masked_fill(~strictly_lower, 0.0).sum(dim=-1)


def _exclusive_cumsum(values: Tensor) -> Tensor:
    """``out[..., k] = Σ_{j < k} values[..., j]``; values: [..., Q]."""
    return torch.nn.functional.pad(values[..., :-1], (1, 0)).cumsum(dim=-1)


def _decay_to_chunk_end(log_decay: Tensor) -> Tensor:
    """``exp(Σ_{k > s} log_decay[..., k])`` for every s; log_decay: [..., Q] -> [..., Q]."""
    return torch.exp(_exclusive_cumsum(log_decay.flip(-1)).flip(-1))


def _per_group(heads: Tensor, groups: int) -> Tensor:
    """View a head tensor [Bt, H, ...] as [Bt, G, R, ...], R = H / G heads sharing one B/C group."""
    return heads.view(heads.shape[0], groups, heads.shape[1] // groups, *heads.shape[2:])


class ChunkedScan(torch.autograd.Function):
    """The chunked scan on prepared fp32 inputs.

    Forward inputs: u [Bt, H, nc, Q, P] (dt·x), log_decay [Bt, H, nc, Q] (dt·A), B and C [Bt, G, nc, Q, N],
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
        prefix = log_decay.cumsum(dim=-1)  # [Bt, H, nc, Q]: Σ_{k <= t} a_k
        intra_decay = torch.exp(segment_sums(log_decay))  # [Bt, H, nc, Q, Q]
        scores = C @ B.transpose(-1, -2)  # [Bt, G, nc, Q, Q]
        mixer = (_per_group(intra_decay, groups) * scores.unsqueeze(2)).flatten(1, 2)
        y = mixer @ u

        to_end = _decay_to_chunk_end(log_decay)
        weighted_u = u * to_end.unsqueeze(-1)
        chunk_states = torch.einsum("bgrcqp,bgcqn->bgrcpn", _per_group(weighted_u, groups), B).flatten(1, 2)

        chunk_decay = torch.exp(prefix[..., -1])  # [Bt, H, nc]
        entering = torch.empty_like(chunk_states)  # [Bt, H, nc, P, N]: H_{c-1} for every chunk c
        state = initial_state
        for c in range(u.shape[2]):
            entering[:, :, c] = state
            state = chunk_decay[:, :, c, None, None] * state + chunk_states[:, :, c]

        read_out = torch.einsum("bgcqn,bgrcpn->bgrcqp", C, _per_group(entering, groups)).flatten(1, 2)
        y_off = read_out * torch.exp(prefix).unsqueeze(-1)
        ctx.save_for_backward(u, log_decay, B, C, prefix, intra_decay, scores, mixer, entering, y_off)
        return y + y_off, state

    @staticmethod
    def _backward(ctx, grad_y: Tensor, grad_final: Tensor):
        u, log_decay, B, C, prefix, intra_decay, scores, mixer, entering, y_off = ctx.saved_tensors
        groups = B.shape[1]
        grad_y = grad_y.contiguous()

        # Y_off = exp(prefix) · C H_{c-1}ᵀ
        grad_read_out = grad_y * torch.exp(prefix).unsqueeze(-1)
        grad_entering = torch.einsum("bgrcqp,bgcqn->bgrcpn", _per_group(grad_read_out, groups), C)
        grad_entering = grad_entering.flatten(1, 2)
        grad_C = torch.einsum("bgrcqp,bgrcpn->bgcqn", _per_group(grad_read_out, groups), _per_group(entering, groups))
        grad_prefix = (grad_y * y_off).sum(dim=-1)

        # The chunk scan, backwards: state_grad is dL/dH_c.
        chunk_decay = torch.exp(prefix[..., -1])
        grad_chunk_states = torch.empty_like(entering)
        grad_chunk_log_decay = torch.empty_like(chunk_decay)
        state_grad = grad_final
        for c in reversed(range(u.shape[2])):
            grad_chunk_states[:, :, c] = state_grad
            decayed = chunk_decay[:, :, c, None, None] * state_grad
            grad_chunk_log_decay[:, :, c] = (decayed * entering[:, :, c]).sum(dim=(-1, -2))
            state_grad = grad_entering[:, :, c] + decayed
        grad_initial_state = state_grad

        # S_c = Σ_s to_end_s u_s B_sᵀ
        to_end = _decay_to_chunk_end(log_decay)
        weighted_u = u * to_end.unsqueeze(-1)
        grad_weighted_u = torch.einsum("bgcqn,bgrcpn->bgrcqp", B, _per_group(grad_chunk_states, groups))
        grad_weighted_u = grad_weighted_u.flatten(1, 2)
        grad_B = torch.einsum(
            "bgrcqp,bgrcpn->bgcqn", _per_group(weighted_u, groups), _per_group(grad_chunk_states, groups)
        )
        grad_to_end = (weighted_u * grad_weighted_u).sum(dim=-1)
        grad_u = grad_weighted_u * to_end.unsqueeze(-1)

        # Y_diag = (exp(seg) ∘ C Bᵀ) u
        grad_mixer = grad_y @ u.transpose(-1, -2)
        grad_u = grad_u + mixer.transpose(-1, -2) @ grad_y
        grad_scores = (_per_group(grad_mixer * intra_decay, groups)).sum(dim=2)
        grad_C = grad_C + grad_scores @ B
        grad_B = grad_B + grad_scores.transpose(-1, -2) @ C
        grad_seg = mixer * grad_mixer  # zero above the diagonal, where the mixer is

        grad_log_decay = (
            _segment_sums_backward(grad_seg)
            + grad_prefix.flip(-1).cumsum(dim=-1).flip(-1)  # prefix_t = Σ_{k <= t} a_k
            + grad_chunk_log_decay.unsqueeze(-1)  # the chunk's total decay involves every a_k
            + _exclusive_cumsum(grad_to_end)  # to_end_s = Σ_{k > s} a_k
        )
        return grad_u, grad_log_decay, grad_B, grad_C, grad_initial_state
