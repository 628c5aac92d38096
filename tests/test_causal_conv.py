"""The Mamba-2 mixer's causal conv: the CPU fast backward against PyTorch's conv1d, outputs and every gradient."""

from __future__ import annotations

import pytest
import torch

from bmojo.ops import causal_conv as causal_conv_module
from bmojo.ops.causal_conv import causal_conv, causal_conv_naive

# (batch, T, channels, kernel); the third crosses blocks of the weight gradient (238 rows at 1100 channels).
SHAPES = [(3, 37, 7, 4), (1, 1, 5, 4), (2, 300, 1100, 4), (2, 19, 6, 2)]


def run(fn, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
    out = fn(*leaves)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    return (out, *torch.autograd.grad(out, leaves, grad_out))


def inputs(batch: int, length: int, channels: int, kernel: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, kernel - 1 + length, channels, generator=generator).to(dtype)
    return x, torch.randn(channels, kernel, generator=generator), torch.randn(channels, generator=generator)


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_conv1d_fp32(shape) -> None:
    got = run(causal_conv, *inputs(*shape, torch.float32))
    expected = run(causal_conv_naive, *inputs(*shape, torch.float32))
    assert got[0].shape == (shape[0], shape[1], shape[2])
    for name, a, b in zip(("output", "grad x", "grad weight", "grad bias"), got, expected, strict=True):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4, msg=name)


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_matches_conv1d_bf16(shape) -> None:
    # bf16 inputs and weights rounded to bf16 before the conv: agreement to 2% of each tensor's largest entry.
    got = run(causal_conv, *inputs(*shape, torch.bfloat16))
    expected = run(causal_conv_naive, *inputs(*shape, torch.bfloat16))
    assert got[0].dtype == got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    for name, a, b in zip(("output", "grad x", "grad weight", "grad bias"), got, expected, strict=True):
        error = (a.double() - b.double()).abs().max().item()
        assert error <= 2e-2 * b.double().abs().max().item(), f"{name}: max error {error:.3g}"


def test_cpu_eager_uses_the_fast_backward(monkeypatch) -> None:
    calls = []
    original = causal_conv_module._weight_grad
    monkeypatch.setattr(causal_conv_module, "_weight_grad", lambda *a: calls.append(1) or original(*a))
    run(causal_conv, *inputs(2, 16, 4, 4, torch.float32))
    assert calls == [1]
