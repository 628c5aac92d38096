"""The selective state-space scan ``ssm_scan`` (DESIGN §2.1) and its ``naive`` and ``torch`` backends.

Per head h, with group g = h // (H / G) supplying B and C:

    S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_tᵀ        S in R^{P x N}
    y_t = S_t C_t + D_h x_t
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from bmojo.ops.registry import OpRegistry
from bmojo.ops.ssm_scan_chunked import ChunkedScan

SSM_SCAN = OpRegistry("ssm_scan")


def ssm_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Run the scan; differentiable in every tensor input.

    Args:
        x: [Bt, T, H, P] inputs.
        dt: [Bt, T, H] step sizes, already positive (after softplus).
        A: [H] decay rates, negative.
        B: [Bt, T, G, N] input projections; G divides H and head h uses group h // (H / G).
        C: [Bt, T, G, N] output projections.
        D: [H] skip weights, or None for no skip.
        initial_state: [Bt, H, P, N] state before the first step, or None for zeros.
        chunk_size: chunk length Q of the chunked backends (the naive one ignores it).
        backend: ``auto``, ``naive``, ``torch`` or ``nki`` (DESIGN §4).

    Returns:
        y: [Bt, T, H, P] in x's dtype, and final_state: [Bt, H, P, N] in fp32.
    """
    _check_inputs(x, dt, A, B, C, D, initial_state, chunk_size)
    return SSM_SCAN.resolve(backend, x.device)(x, dt, A, B, C, D, initial_state, chunk_size)


def _check_inputs(x, dt, A, B, C, D, initial_state, chunk_size) -> None:
    def fail(problem: str) -> None:
        raise ValueError(f"ssm_scan: {problem}")

    tensors = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "initial_state": initial_state}
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if not isinstance(tensor, Tensor):
            fail(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            fail(f"{name} must be a floating-point tensor, got {tensor.dtype}; cast it with .float()")
        if tensor.device != x.device:
            fail(f"{name} is on {tensor.device} but x is on {x.device}; move all inputs to one device")
    if x.dim() != 4:
        fail(f"x must be [batch, time, heads, head_dim], got shape {tuple(x.shape)}")
    batch, time, heads, head_dim = x.shape
    if time == 0:
        fail("x has no time steps (T = 0); pass a sequence of length >= 1")
    if dt.shape != (batch, time, heads):
        fail(f"dt must be [batch, time, heads] = {(batch, time, heads)} to match x, got {tuple(dt.shape)}")
    if A.shape != (heads,):
        fail(f"A must be [heads] = ({heads},), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (batch, time):
        fail(f"B must be [batch, time, groups, state] with batch, time = {(batch, time)}, got {tuple(B.shape)}")
    if C.shape != B.shape:
        fail(f"C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}")
    groups, state_dim = B.shape[2:]
    if groups == 0 or heads % groups != 0:
        fail(f"the number of groups G = {groups} of B and C must divide the number of heads H = {heads}")
    if D is not None and D.shape != (heads,):
        fail(f"D must be [heads] = ({heads},) or None, got {tuple(D.shape)}")
    expected_state = (batch, heads, head_dim, state_dim)
    if initial_state is not None and initial_state.shape != expected_state:
        got = tuple(initial_state.shape)
        fail(f"initial_state must be [batch, heads, head_dim, state] = {expected_state}, got {got}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        fail(f"chunk_size must be a positive int, got {chunk_size!r}")


def _zero_state(x: Tensor, B: Tensor) -> Tensor:
    """[Bt, H, P, N] fp32 zeros."""
    return x.new_zeros(x.shape[0], x.shape[2], x.shape[3], B.shape[3], dtype=torch.float32)


@SSM_SCAN.register("naive")
def ssm_scan_naive(x, dt, A, B, C, D, initial_state, chunk_size):
    """The recurrence one time step at a time, in fp32: the ground truth (shapes as in :func:`ssm_scan`)."""
    heads_per_group = x.shape[2] // B.shape[2]
    x32, dt32, A32 = x.float(), dt.float(), A.float()
    B_heads = B.float().repeat_interleave(heads_per_group, dim=2)  # [Bt, T, H, N]
    C_heads = C.float().repeat_interleave(heads_per_group, dim=2)
    state = _zero_state(x, B) if initial_state is None else initial_state.float()
    outputs = []
    for t in range(x.shape[1]):
        decay = torch.exp(dt32[:, t] * A32)[..., None, None]  # [Bt, H, 1, 1]
        scaled_input = (dt32[:, t, :, None] * x32[:, t]).unsqueeze(-1)  # [Bt, H, P, 1]
        state = decay * state + scaled_input * B_heads[:, t].unsqueeze(-2)
        outputs.append((state @ C_heads[:, t].unsqueeze(-1)).squeeze(-1))  # [Bt, H, P]
    y = torch.stack(outputs, dim=1)
    if D is not None:
        y = y + D.float()[:, None] * x32
    return y.to(x.dtype), state


@SSM_SCAN.register("torch")
def ssm_scan_torch(x, dt, A, B, C, D, initial_state, chunk_size):
    """The chunked state-space-duality form (:class:`ChunkedScan`) in fp32; shapes as in :func:`ssm_scan`.

    The last chunk is padded with dt = 0: padding neither decays the state nor adds to it.
    """
    batch, time, heads, head_dim = x.shape
    groups, state_dim = B.shape[2:]
    chunk = min(chunk_size, time)
    padding = -time % chunk
    num_chunks = (time + padding) // chunk
    x32, dt32 = x.float(), dt.float()

    def to_chunks(values: Tensor, width: int) -> Tensor:
        """[Bt, T, K, width] -> [Bt, K, nc, Q, width], padded with zeros at the end of time."""
        padded = F.pad(values, (0, 0, 0, 0, 0, padding)) if padding else values  # F.pad copies even when by 0
        return padded.view(batch, num_chunks, chunk, -1, width).permute(0, 3, 1, 2, 4).contiguous()

    u = to_chunks(x32 * dt32.unsqueeze(-1), head_dim)
    log_decay = to_chunks((dt32 * A.float()).unsqueeze(-1), 1).squeeze(-1)
    state = _zero_state(x, B) if initial_state is None else initial_state.float()
    y, final_state = ChunkedScan.apply(
        u, log_decay, to_chunks(B.float(), state_dim), to_chunks(C.float(), state_dim), state
    )
    y = y.permute(0, 2, 3, 1, 4).reshape(batch, num_chunks * chunk, heads, head_dim)[:, :time]
    if D is not None:
        y = y + D.float()[:, None] * x32
    return y.to(x.dtype), final_state
