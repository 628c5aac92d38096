"""Building blocks: RoPE against its complex-number statement; the norms' one-op inference path equals the
composite autograd trains through; a Mamba-2 mixer built on its own (outside a model's weight initialisation)
is usable."""

from __future__ import annotations

import pytest
import torch

from bmojo import BmojoConfig
from bmojo.model.layers import GatedRMSNorm, RMSNorm, RotaryEmbedding
from bmojo.model.mamba2 import Mamba2Mixer


def test_rope_rotates_each_pair_of_channels_by_its_position_times_its_frequency() -> None:
    rope = RotaryEmbedding(8, theta=100.0)
    x, positions = torch.randn(2, 5, 3, 8), torch.tensor([0, 1, 7, 30, 1000])
    rotated = rope(x, rope.tables(positions))
    # Rotate-half pairs channel i with channel i + D/2: the pair is the complex number x_i + j x_{i+D/2},
    # multiplied by exp(j p theta^(-2i/D)).
    frequencies = 100.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    phase = torch.polar(torch.ones(5, 4, dtype=torch.float64), positions[:, None].double() * frequencies)
    pairs = torch.complex(x[..., :4].double(), x[..., 4:].double()) * phase[None, :, None, :]
    torch.testing.assert_close(rotated.double(), torch.cat([pairs.real, pairs.imag], dim=-1), rtol=1e-5, atol=1e-4)
    # Rows of the tables broadcast, as the one-token decode step uses them.
    cos, sin = rope.tables(positions)
    torch.testing.assert_close(rope(x[:, 3:4], (cos[0, 3], sin[0, 3])), rotated[:, 3:4])


def plain_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, group: int) -> torch.Tensor:
    """RMSNorm over groups of ``group`` channels, written out in float64."""
    grouped = x.double().unflatten(-1, (-1, group))
    normed = grouped / torch.sqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return normed.flatten(-2) * weight.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_inference_and_training_forms_agree(dtype: torch.dtype) -> None:
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 64).to(dtype)
    with torch.no_grad():
        inference = norm(x)
    training = norm(x.requires_grad_())
    assert inference.dtype == training.dtype == dtype
    torch.testing.assert_close(inference, training)
    expected = plain_rms_norm(x.detach(), norm.weight.detach(), norm.eps, 64)
    torch.testing.assert_close(inference.double(), expected, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)


@pytest.mark.parametrize("group", [32, 64])
def test_gated_rms_norm_inference_and_training_forms_agree(group: int) -> None:
    norm = GatedRMSNorm(64, group)
    with torch.no_grad():
        norm.weight.normal_()
    y, z = torch.randn(3, 5, 64), torch.randn(3, 5, 64)
    with torch.no_grad():
        inference = norm(y, z)
    training = norm(y.requires_grad_(), z)
    torch.testing.assert_close(inference, training)
    gated = y.detach().double() * torch.nn.functional.silu(z.double())
    expected = plain_rms_norm(gated, norm.weight.detach(), norm.eps, group)
    torch.testing.assert_close(inference.double(), expected, rtol=1e-5, atol=1e-5)


def test_a_mamba2_mixer_built_on_its_own_is_usable() -> None:
    config = BmojoConfig(hidden_size=64, ssm_head_dim=16, ssm_state_size=8)
    mixer = Mamba2Mixer(config)
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert (dt >= config.ssm_dt_min * 0.999).all() and (dt <= config.ssm_dt_max * 1.001).all()
    assert (mixer.A_log.exp() >= 1).all() and (mixer.D == 1).all()
    out, state = mixer(torch.randn(2, 40, 64))
    assert torch.isfinite(out).all() and torch.isfinite(state.ssm).all()
