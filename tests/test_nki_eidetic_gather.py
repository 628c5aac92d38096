"""The NKI gather / scatter-add kernels through ``eidetic_gather(..., backend="nki")`` with
``BMOJO_NKI_INTERPRET=1``, against the naive per-row gather and its scatter-add backward."""

from __future__ import annotations

import pytest
import torch

from bmojo.ops import eidetic_gather


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("BMOJO_NKI_INTERPRET", "1")


def gather_and_grad(src: torch.Tensor, index: torch.Tensor, backend: str):
    leaf = src.clone().requires_grad_()
    out = eidetic_gather(leaf, index, backend=backend)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out.float() * cotangent).sum().backward()
    return out, leaf.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_naive_with_repeated_indices_and_several_tiles(dtype):
    generator = torch.Generator().manual_seed(0)
    src = torch.randn(2, 90, 24, generator=generator).to(dtype)
    index = torch.randint(0, 90, (2, 150), generator=generator)  # 150 rows: two DMA tiles per batch row
    index[1, :40] = 5  # a token kept by many memory blocks collects all their gradients
    out, grad = gather_and_grad(src, index, "nki")
    want_out, want_grad = gather_and_grad(src, index, "naive")
    assert out.dtype == want_out.dtype and grad.dtype == want_grad.dtype == dtype
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    # Both accumulate in fp32 and round once; summation order may differ by float rounding only.
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(grad.float(), want_grad.float(), rtol=tolerance, atol=tolerance)


def test_untouched_rows_get_zero_gradient():
    src = torch.randn(1, 10, 3)
    _, grad = gather_and_grad(src, torch.tensor([[2, 7]]), "nki")
    untouched = [t for t in range(10) if t not in (2, 7)]
    assert torch.count_nonzero(grad[0, untouched]) == 0
    assert torch.count_nonzero(grad[0, [2, 7]]) == 6


def test_nki_needs_the_interpreter_switch_on_cpu(monkeypatch):
    monkeypatch.delenv("BMOJO_NKI_INTERPRET")
    with pytest.raises(RuntimeError, match="BMOJO_NKI_INTERPRET=1"):
        eidetic_gather(torch.randn(1, 4, 2), torch.tensor([[0, 3]]), backend="nki")
