"""Mamba-2 mixer (DESIGN §2.1): in_proj -> causal conv + SiLU -> ssm_scan -> gated RMSNorm -> out_proj."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bmojo.config import BmojoConfig
from bmojo.model.layers import GatedRMSNorm, InitRole, mark_init
from bmojo.ops import ssm_scan
from bmojo.ops.causal_conv import causal_conv


@dataclass
class SSMState:
    """Recurrent state of one Mamba-2 mixer: conv inputs ``conv [B, C, K-1]``, scan state ``ssm [B, H, P, N]``."""

    conv: torch.Tensor
    ssm: torch.Tensor


class Mamba2Mixer(nn.Module):
    def __init__(self, config: BmojoConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.inner_size = config.ssm_inner_size
        self.num_heads = config.ssm_num_heads
        self.head_dim = config.ssm_head_dim
        self.num_groups = config.ssm_num_groups
        self.state_size = config.ssm_state_size
        self.conv_kernel = config.ssm_conv_kernel
        self.chunk_size = config.ssm_chunk_size
        self.dt_range = (config.ssm_dt_min, config.ssm_dt_max)
        self.conv_dim = self.inner_size + 2 * self.num_groups * self.state_size
        # Segments of in_proj, in order: z (gate), x, B, C, dt. Tensor parallelism shards each by head.
        self.in_proj_segments = (
            self.inner_size,
            self.inner_size,
            self.num_groups * self.state_size,
            self.num_groups * self.state_size,
            self.num_heads,
        )
        self.in_proj = nn.Linear(self.hidden_size, sum(self.in_proj_segments), bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.conv_kernel, groups=self.conv_dim, bias=True)
        # Usable values for a mixer built on its own; a model's _init_weights draws dt at random instead.
        dt = torch.exp(torch.linspace(math.log(config.ssm_dt_min), math.log(config.ssm_dt_max), self.num_heads))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.A_log = nn.Parameter(torch.log(torch.linspace(1, 16, self.num_heads)))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = GatedRMSNorm(self.inner_size, self.inner_size // self.num_groups, eps=config.rms_norm_eps)
        # A residual-branch output as an M layer; an F/B layer re-marks it (its output feeds keys and values).
        self.out_proj = mark_init(nn.Linear(self.inner_size, self.hidden_size, bias=False), InitRole.residual_output)

    def empty_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> SSMState:
        return SSMState(
            conv=torch.zeros(batch_size, self.conv_dim, self.conv_kernel - 1, device=device, dtype=dtype),
            ssm=torch.zeros(
                batch_size, self.num_heads, self.head_dim, self.state_size, device=device, dtype=torch.float32
            ),
        )

    def forward(self, h: torch.Tensor, state: SSMState | None = None) -> tuple[torch.Tensor, SSMState]:
        """h: [B, T, D] -> (s: [B, T, D], state after the last token).

        ``state`` continues a sequence (decoding or chunked prefill); ``None`` starts from zeros.
        """
        batch, length, _ = h.shape
        z, xbc, dt_raw = self.in_proj(h).split([self.inner_size, self.conv_dim, self.num_heads], dim=-1)
        if state is None:
            state = self.empty_state(batch, h.device, h.dtype)
        if length == 1:
            y, new_state = self._step(xbc[:, 0], dt_raw[:, 0], state)
            return self.out_proj(self.norm(y.unsqueeze(1).to(h.dtype), z)), new_state
        # Prepending the previous K-1 conv inputs makes the conv causal and continuous across calls.
        conv_in = torch.cat([state.conv.transpose(1, 2).to(xbc.dtype), xbc], dim=1)  # [B, K-1+T, C]
        new_conv = conv_in[:, conv_in.shape[1] - (self.conv_kernel - 1) :].transpose(1, 2).contiguous()
        xbc = F.silu(self._causal_conv(conv_in))
        x, b, c = xbc.split(
            [self.inner_size, self.num_groups * self.state_size, self.num_groups * self.state_size], dim=-1
        )
        dt = F.softplus(dt_raw.float() + self.dt_bias.float())
        y, final = ssm_scan(
            x.unflatten(-1, (self.num_heads, self.head_dim)),
            dt,
            -torch.exp(self.A_log.float()),
            b.unflatten(-1, (self.num_groups, self.state_size)),
            c.unflatten(-1, (self.num_groups, self.state_size)),
            D=self.D,
            initial_state=state.ssm,
            chunk_size=self.chunk_size,
        )
        s = self.out_proj(self.norm(y.flatten(-2).to(h.dtype), z))
        return s, SSMState(conv=new_conv, ssm=final)

    def _step(self, xbc: torch.Tensor, dt_raw: torch.Tensor, state: SSMState) -> tuple[torch.Tensor, SSMState]:
        """One token, directly: xbc [B, C], dt_raw [B, H] -> (y [B, H·P] before the norm, the next state).

        The conv is a dot product with the K-1 stored inputs and the scan one step of its recurrence,
        S = exp(dt A) S + dt x Bᵀ and y = S C + D x, instead of a conv and a scan over a chunk of length 1.
        Decoding is bound by the number of small operations, so heads read their group's B and C through
        broadcast views (no copy per head) and the updates are fused multiply-adds.
        """
        batch, groups, state_size = xbc.shape[0], self.num_groups, self.state_size
        window = torch.cat([state.conv.to(xbc.dtype), xbc.unsqueeze(-1)], dim=-1)  # [B, C, K]
        conv = (window * self.conv1d.weight.squeeze(1)).sum(-1).add_(self.conv1d.bias)
        x, b, c = F.silu(conv).float().split([self.inner_size, groups * state_size, groups * state_size], dim=-1)
        dt = F.softplus(dt_raw.float() + self.dt_bias)  # [B, H]
        decay = torch.exp(dt * self.A_log.float().exp().neg())
        grouped = (batch, groups, self.num_heads // groups)  # [B, G, R, ...]: head g·R + r reads group g
        x = x.view(*grouped, self.head_dim)
        ssm = state.ssm.view(*grouped, self.head_dim, state_size) * decay.view(*grouped, 1, 1)
        ssm.addcmul_((x * dt.view(*grouped, 1)).unsqueeze(-1), b.view(batch, groups, 1, 1, state_size))
        y = (ssm @ c.view(batch, groups, 1, state_size, 1)).view(batch, self.num_heads, self.head_dim)
        y = torch.addcmul(y, self.D.view(-1, 1), x.view(batch, self.num_heads, self.head_dim))
        # Contiguous like the prefill's conv state, so a compiled step sees one layout.
        return y.flatten(1).to(xbc.dtype), SSMState(conv=window[..., 1:].contiguous(), ssm=ssm.flatten(1, 2))

    def _causal_conv(self, conv_in: torch.Tensor) -> torch.Tensor:
        """Depthwise conv over time without padding: conv_in [B, K-1+T, C] -> [B, T, C]."""
        return causal_conv(conv_in, self.conv1d.weight.squeeze(1), self.conv1d.bias)
