"""``ssm_scan``: the chunked ``torch`` backend against the ``naive`` recurrence, and input checking."""

from __future__ import annotations

import pytest
import torch

from bmojo.ops.ssm_scan import ssm_scan
from bmojo.ops.ssm_scan_chunked import _segment_sums_backward

# Relative error max|a - b| / max|b| allowed against the fp32 naive reference. bf16 inputs are computed in
# fp32 inside, so the error is the final rounding of y and of the gradients to bf16 (2^-8 relative).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
INPUT_NAMES = ("x", "dt", "A", "B", "C", "D", "initial_state")


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return ((actual.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def make_inputs(
    batch=2,
    time=64,
    heads=4,
    head_dim=8,
    state_dim=16,
    groups=2,
    dtype=torch.float32,
    seed=0,
    decay_scale=1.0,
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    inputs = {
        "x": randn(batch, time, heads, head_dim),
        "dt": torch.nn.functional.softplus(randn(batch, time, heads) - 1.0) * decay_scale,
        "A": -(torch.rand(heads, generator=generator) * 2 + 0.1),
        "B": randn(batch, time, groups, state_dim),
        "C": randn(batch, time, groups, state_dim),
        "D": randn(heads),
        "initial_state": randn(batch, heads, head_dim, state_dim),
    }
    return {name: tensor.to(dtype) for name, tensor in inputs.items()}


def run_with_grads(inputs: dict, backend: str, chunk_size: int = 64, seed: int = 1) -> dict[str, torch.Tensor]:
    """y, final_state and the gradient of every tensor input under random cotangents of y and final_state."""
    leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items() if t is not None}
    kwargs = {name: leaves.get(name) for name in INPUT_NAMES}
    y, final_state = ssm_scan(**kwargs, chunk_size=chunk_size, backend=backend)
    generator = torch.Generator().manual_seed(seed)
    grad_y = torch.randn(y.shape, generator=generator).to(y.device, y.dtype)
    grad_state = torch.randn(final_state.shape, generator=generator).to(final_state.device)
    grads = torch.autograd.grad((y, final_state), list(leaves.values()), (grad_y, grad_state))
    return {"y": y, "final_state": final_state} | {f"grad_{name}": g for name, g in zip(leaves, grads, strict=True)}


def assert_all_close(actual: dict, reference: dict, tolerance: float) -> None:
    assert actual.keys() == reference.keys()
    errors = {name: relative_error(actual[name], reference[name]) for name in reference}
    assert all(error <= tolerance for error in errors.values()), f"relative errors above {tolerance}: {errors}"


@pytest.mark.parametrize("heads,groups", [(4, 2), (4, 1)], ids=["G<H", "G=1"])
@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("time", [1, 63, 100, 256])
def test_torch_matches_naive(time, chunk_size, heads, groups):
    inputs = make_inputs(time=time, heads=heads, groups=groups)
    reference = run_with_grads(inputs, "naive")
    actual = run_with_grads(inputs, "torch", chunk_size=chunk_size)
    assert actual["y"].dtype == torch.float32 and actual["final_state"].dtype == torch.float32
    assert_all_close(actual, reference, TOLERANCE[torch.float32])


@pytest.mark.parametrize("with_skip", [True, False], ids=["D", "noD"])
@pytest.mark.parametrize("with_initial_state", [True, False], ids=["h0", "noh0"])
def test_optional_inputs(with_skip, with_initial_state):
    inputs = make_inputs(time=37, groups=4)
    inputs["D"] = inputs["D"] if with_skip else None
    inputs["initial_state"] = inputs["initial_state"] if with_initial_state else None
    reference = run_with_grads(inputs, "naive")
    assert_all_close(run_with_grads(inputs, "torch", chunk_size=16), reference, TOLERANCE[torch.float32])


def test_bf16_inputs_against_fp32_reference():
    inputs = make_inputs(time=100, dtype=torch.bfloat16)
    reference = run_with_grads({name: t.float() for name, t in inputs.items()}, "naive")
    actual = run_with_grads(inputs, "torch", chunk_size=16)
    assert actual["y"].dtype == torch.bfloat16 and actual["grad_B"].dtype == torch.bfloat16
    assert actual["final_state"].dtype == torch.float32
    assert_all_close(actual, reference, TOLERANCE[torch.bfloat16])


def test_strong_decay_stays_finite_and_exact():
    # dt·A down to about -60 per step: the state forgets within a step or two; exp must never overflow.
    inputs = make_inputs(time=80, decay_scale=30.0)
    reference = run_with_grads(inputs, "naive")
    actual = run_with_grads(inputs, "torch", chunk_size=64)
    assert all(torch.isfinite(t).all() for t in actual.values())
    assert_all_close(actual, reference, TOLERANCE[torch.float32])


def test_naive_matches_two_steps_by_hand():
    inputs = make_inputs(batch=1, time=2, heads=2, head_dim=3, state_dim=4, groups=1)
    x, dt, A, B, C, D, h0 = (inputs[name][0] if name not in ("A", "D") else inputs[name] for name in INPUT_NAMES)
    y, final_state = ssm_scan(**inputs, backend="naive")
    for h in range(2):
        state = h0[h]
        for t in range(2):
            state = torch.exp(dt[t, h] * A[h]) * state + dt[t, h] * torch.outer(x[t, h], B[t, 0])
            expected_y = state @ C[t, 0] + D[h] * x[t, h]
            torch.testing.assert_close(y[0, t, h], expected_y, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(final_state[0, h], state, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_split_sequence_carries_state(backend):
    inputs = make_inputs(time=90)
    whole_y, whole_state = ssm_scan(**inputs, chunk_size=16, backend=backend)
    split = 41
    first = {name: t[:, :split] if t.dim() >= 3 and name != "initial_state" else t for name, t in inputs.items()}
    second = {name: t[:, split:] if t.dim() >= 3 and name != "initial_state" else t for name, t in inputs.items()}
    first_y, carried = ssm_scan(**first, chunk_size=16, backend=backend)
    second_y, final_state = ssm_scan(**(second | {"initial_state": carried}), chunk_size=16, backend=backend)
    torch.testing.assert_close(torch.cat([first_y, second_y], dim=1), whole_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final_state, whole_state, rtol=1e-5, atol=1e-5)


def test_unknown_or_unrunnable_backend_raises(monkeypatch):
    inputs = make_inputs(time=4)
    with pytest.raises(ValueError, match="unknown backend 'cuda_magic'"):
        ssm_scan(**inputs, backend="cuda_magic")
    monkeypatch.delenv("BMOJO_NKI_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="backend 'nki' cannot run on cpu"):
        ssm_scan(**inputs, backend="nki")


def _replace(name: str, make):
    def mutate(inputs: dict) -> dict:
        return inputs | {name: make(inputs[name])}

    return mutate


def _with_three_groups(inputs: dict) -> dict:
    return inputs | {name: inputs[name][:, :, :1].expand(-1, -1, 3, -1) for name in ("B", "C")}


@pytest.mark.parametrize(
    "mutate,message",
    [
        (_replace("x", lambda t: t[0]), "x must be"),
        (_replace("x", lambda t: t[:, :0]), "no time steps"),
        (_replace("dt", lambda t: t[:, :-1]), "dt must be"),
        (_replace("A", lambda t: t[:-1]), "A must be"),
        (_replace("B", lambda t: t[:1]), "B must be"),
        (_replace("C", lambda t: t[..., :-1]), "C must have B's shape"),
        (_with_three_groups, "must divide"),
        (_replace("D", lambda t: t[:2]), "D must be"),
        (_replace("initial_state", lambda t: t[..., :-1]), "initial_state must be"),
        (_replace("x", lambda t: t.long()), "x must be a floating-point tensor"),
        (lambda i: i | {"chunk_size": 0}, "chunk_size must be a positive int"),
    ],
    ids=["x-rank", "empty", "dt", "A", "B-batch", "C", "groups", "D", "state", "int-x", "chunk"],
)
def test_bad_inputs_raise(mutate, message):
    with pytest.raises(ValueError, match=message):
        ssm_scan(**mutate(make_inputs(time=8)), backend="torch")


def test_torch_path_ignores_an_enclosing_bf16_autocast():
    inputs = make_inputs(time=40, heads=4, groups=2)
    plain = run_with_grads(inputs, backend="torch", chunk_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = run_with_grads(inputs, backend="torch", chunk_size=16)
    for name, value in plain.items():
        torch.testing.assert_close(autocast[name], value, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("by_matmul", [False, True], ids=["cumsum", "matmul"])
def test_segment_sums_backward_matches_its_definition(by_matmul):
    grad_seg = torch.randn(3, 9, 9, generator=torch.Generator().manual_seed(0)).tril(-1)
    # out[k] = Σ over t >= k > s of grad_seg[t, s], written as loops.
    expected = torch.tensor(
        [[sum(float(g[t, s]) for t in range(9) for s in range(9) if t >= k > s) for k in range(9)] for g in grad_seg]
    )
    actual = _segment_sums_backward(grad_seg.clone(), by_matmul=by_matmul)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
