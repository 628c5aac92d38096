"""eidetic_gather: both backends against a one-hot matmul reference, forward and gradient."""

from __future__ import annotations

import pytest
import torch

from bmojo.ops.eidetic_gather import eidetic_gather

BACKENDS = ("naive", "torch")


def one_hot_reference(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out = onehot(index) @ src in fp64: src [B, T, F], index [B, S] → [B, S, F]."""
    selector = torch.nn.functional.one_hot(index, num_classes=src.shape[1]).double()  # [B, S, T]
    return selector @ src.double()


def make_case(dtype: torch.dtype, repeated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    src = torch.randn(3, 11, 5, generator=generator).to(dtype)
    index = torch.randint(0, 11, (3, 7), generator=generator)
    if repeated:
        index[:, :4] = torch.tensor([2, 2, 9, 2])
    return src, index


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("repeated", [False, True])
def test_forward_and_gradient_match_one_hot_matmul(backend: str, dtype: torch.dtype, repeated: bool) -> None:
    src, index = make_case(dtype, repeated)
    src.requires_grad_(True)
    out = eidetic_gather(src, index, backend=backend)
    assert out.shape == (3, 7, 5) and out.dtype == dtype
    # A gather copies values, so it is exact in any dtype.
    torch.testing.assert_close(out.double(), one_hot_reference(src.detach(), index), rtol=0, atol=0)

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    (grad_src,) = torch.autograd.grad(out, src, grad_out)
    selector = torch.nn.functional.one_hot(index, num_classes=src.shape[1]).double()
    expected = selector.transpose(1, 2) @ grad_out.double()  # [B, T, F]: scatter-add of grad_out
    tolerance = {"rtol": 0, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(grad_src.double(), expected, **tolerance)
    if repeated:
        # Position 2 is read three times in every row: its gradient must be the sum of all three.
        manual = grad_out[:, 0].double() + grad_out[:, 1].double() + grad_out[:, 3].double()
        manual += (grad_out[:, 4:].double() * (index[:, 4:, None] == 2)).sum(1)
        torch.testing.assert_close(grad_src[:, 2].double(), manual, **tolerance)


def test_backends_agree_on_larger_case() -> None:
    generator = torch.Generator().manual_seed(2)
    src = torch.randn(2, 300, 64, generator=generator, requires_grad=True)
    index = torch.randint(0, 300, (2, 128), generator=generator)
    grad_out = torch.randn(2, 128, 64, generator=generator)
    results = []
    for backend in BACKENDS:
        out = eidetic_gather(src, index, backend=backend)
        results.append((out, *torch.autograd.grad(out, src, grad_out)))
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-6)


def test_rejects_bad_input() -> None:
    src = torch.randn(2, 5, 3)
    with pytest.raises(IndexError, match=r"\[0, T=5\)"):
        eidetic_gather(src, torch.tensor([[0, 5], [1, 1]]))
    with pytest.raises(IndexError, match="range"):
        eidetic_gather(src, torch.tensor([[0, -1], [1, 1]]))
    with pytest.raises(TypeError, match="int64"):
        eidetic_gather(src, torch.tensor([[0, 1], [1, 1]], dtype=torch.int32))
    with pytest.raises(ValueError, match="batch sizes differ"):
        eidetic_gather(src, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match=r"\[B, T, F\]"):
        eidetic_gather(src[0], torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        eidetic_gather(src, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="floating"):
        eidetic_gather(src.long(), torch.tensor([[0, 1], [1, 1]]))
