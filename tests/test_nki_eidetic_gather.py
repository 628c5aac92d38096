"""The NKI gather kernels through ``eidetic_gather(..., backend="nki")`` with ``BMOJO_NKI_INTERPRET=1``, against
the naive per-row gather and its scatter-add backward; and the kernels themselves through the interpreter (the
backward combines duplicate rows before a scatter the interpreter refuses to see repeat)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bmojo.ops import eidetic_gather
from neuron_kernels.eidetic_gather.kernels import ROWS_PER_TILE, check_shapes, eidetic_gather_bwd
from neuron_kernels.interpreter import run_kernel


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_duplicates_across_tiles_sum_into_few_rows(dtype):
    generator = torch.Generator().manual_seed(1)
    src = torch.randn(2, 40, 8, generator=generator).to(dtype)
    index = torch.randint(0, 3, (2, 300), generator=generator)  # 300 rows over 3 tiles name only 3 tokens
    index[0] = 7  # one token, gathered 300 times
    out, grad = gather_and_grad(src, index, "nki")
    want_out, want_grad = gather_and_grad(src, index, "naive")
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(grad.float(), want_grad.float(), rtol=tolerance, atol=tolerance)
    assert torch.count_nonzero(grad[0].float().abs().sum(-1)) == 1


@pytest.mark.parametrize(
    ("batch", "length", "selected", "features"),
    [(3, 5, 1, 1), (1, 130, 129, 3), (2, 70, 128, 600)],  # one row; one past a tile; two matmul column chunks
)
def test_awkward_shapes_match_naive(batch, length, selected, features):
    generator = torch.Generator().manual_seed(2)
    src = torch.randn(batch, length, features, generator=generator)
    index = torch.randint(0, length, (batch, selected), generator=generator)
    out, grad = gather_and_grad(src, index, "nki")
    want_out, want_grad = gather_and_grad(src, index, "naive")
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-5)


def test_backward_kernel_is_independent_of_the_affine_loop_order():
    """Every affine_range loop of the backward runs in another order per seed; the gradient must not change."""
    rng = np.random.default_rng(4)
    batch, length, selected, features = 2, 50, 2 * ROWS_PER_TILE, 5
    index = rng.integers(0, 6, (batch, selected))
    rows = (index + np.arange(batch)[:, None] * length).astype(np.int32)
    d_out = rng.standard_normal((batch, selected, features)).astype(np.float32)
    want = np.zeros((batch, length, features), dtype=np.float32)
    for b in range(batch):
        np.add.at(want[b], index[b], d_out[b])
    for seed in range(3):
        got = run_kernel(eidetic_gather_bwd, d_out, rows, length, loop_seed=seed).outputs
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_check_shapes_refuses_partial_tiles_and_too_many_features():
    check_shapes(batch=1, length=8192, selected=1152, features=3072)
    with pytest.raises(ValueError, match="multiple of 128"):
        check_shapes(batch=1, length=10, selected=150, features=4)
    with pytest.raises(ValueError, match="PSUM banks"):
        check_shapes(batch=1, length=10, selected=128, features=3073)
    with pytest.raises(ValueError, match="2\\^24"):
        check_shapes(batch=1025, length=8192, selected=128, features=4)


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
