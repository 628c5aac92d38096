"""Building blocks shared by every mixer: RMSNorm, gated RMSNorm, SwiGLU MLP, rotary embeddings."""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn


class InitRole(Enum):
    """How a model's initialisation draws a Linear's weight (``BmojoPreTrainedModel._init_weights``)."""

    default = "default"  # normal(0, initializer_range)
    residual_output = "residual_output"  # writes into the residual stream: scaled by depth
    fading_output = "fading_output"  # the inner SSM of F/B: its output becomes keys/values, like the layer input


def mark_init(linear: nn.Linear, role: InitRole) -> nn.Linear:
    """Tag ``linear`` with the init ``role`` the model applies to it, when transformers runs the init hook on the
    Linear itself: a module that owns no parameters directly (``SwiGLU``, ``AttentionMixer``) is marked
    initialised without its hook running, so a rule kept there would never apply."""
    linear.init_role = role
    return linear


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, computed in fp32 and cast back.

    Without autograd (inference) this norm and :class:`GatedRMSNorm` are PyTorch's one-op ``rms_norm``, since
    decoding a token is bound by the number of operations it launches. Under autograd the composite form is
    kept: on the CPU its backward is faster than ``rms_norm``'s. Both compute the same fp32 normalisation.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # inference: one op (see the docstring)
            return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm: ``RMSNorm(y * silu(z))``, normalised per group of ``group_size`` channels.

    Per-group statistics (one group per B/C group) keep the norm local to a tensor-parallel shard of heads.
    """

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y, z: [B, T, dim] -> [B, T, dim]."""
        if not torch.is_grad_enabled():  # inference: one-op rms_norm, as in RMSNorm
            gated = F.silu(z.float()).mul_(y.float()).unflatten(-1, (-1, self.group_size))
            return (F.rms_norm(gated, (self.group_size,), eps=self.eps).flatten(-2) * self.weight).to(y.dtype)
        gated = y.float() * F.silu(z.float())
        grouped = gated.unflatten(-1, (-1, self.group_size))
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return (grouped.flatten(-2) * self.weight.float()).to(y.dtype)


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = mark_init(nn.Linear(intermediate_size, hidden_size, bias=False), InitRole.residual_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RotaryEmbedding(nn.Module):
    """RoPE (rotate-half convention) at absolute positions."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self.frequencies(), persistent=False)

    def frequencies(self) -> torch.Tensor:
        """[D/2] inverse frequencies; also used to rebuild the (unsaved) buffer after loading on meta."""
        return 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] (int) -> (cos, signed sin), each [1, T, 1, D]; computed once per layer call and shared
        by queries, keys and fading keys at the same positions. The sin table carries the sign of rotate-half
        (``[-x2, x1]`` is ``roll(x, D/2)`` with its first half negated), so :meth:`forward` is three ops."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # [T, D/2]
        sin = angles.sin()
        signed_sin = torch.cat([-sin, sin], dim=-1)[None, :, None, :]
        return torch.cat([angles, angles], dim=-1).cos()[None, :, None, :], signed_sin

    def forward(self, x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: [B, T, H, D], tables: :meth:`tables` of its positions (or rows of them that broadcast) -> x rotated
        by its position, same dtype."""
        cos, signed_sin = tables
        x32 = x.float()
        return torch.addcmul(x32 * cos, x32.roll(x32.shape[-1] // 2, dims=-1), signed_sin).to(x.dtype)
