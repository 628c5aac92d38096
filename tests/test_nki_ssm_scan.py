"""The NKI chunked-scan kernels through ``ssm_scan(..., backend="nki")`` with ``BMOJO_NKI_INTERPRET=1``: the
NumPy interpreter here, the official NKI simulator where the Neuron SDK is installed. Output, final state
and every gradient must match the naive fp32 recurrence."""

from __future__ import annotations

import pytest
import torch

from bmojo.ops import ssm_scan
from neuron_kernels import nki_compat
from neuron_kernels.interpreter import ShapeOnly, run_kernel
from neuron_kernels.ssm_scan.backward import ssm_scan_bwd
from neuron_kernels.ssm_scan.forward import SBUF_BYTES_PER_PARTITION, sbuf_bytes_per_partition, ssm_scan_fwd
from neuron_kernels.ssm_scan.selective_scan import selective_scan_fwd

# Largest allowed max|nki - naive| / max|naive| per compared tensor, by input dtype. fp32: summation-order
# noise over a few hundred steps. bf16: both sides compute in fp32 from the same bf16 inputs and round their
# results to bf16, so they may differ by one bf16 rounding step (2^-8 relative) of the largest values.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 8e-3}
NAMES = ("y", "final_state", "dx", "ddt", "dA", "dB", "dC", "dD", "d_initial_state")


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("BMOJO_NKI_INTERPRET", "1")


def make_inputs(batch, time, heads, groups, head_dim, state_dim, dtype, skip=True, initial=True, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    dt = (torch.rand(batch, time, heads, generator=generator) * 0.4 + 0.02).to(dtype)
    A = -(torch.rand(heads, generator=generator) * 3 + 0.1)
    return {
        "x": normal(batch, time, heads, head_dim),
        "dt": dt,
        "A": A,
        "B": normal(batch, time, groups, state_dim),
        "C": normal(batch, time, groups, state_dim),
        "D": normal(heads) if skip else None,
        "initial_state": torch.randn(batch, heads, head_dim, state_dim, generator=generator) if initial else None,
    }


def forward_backward(inputs: dict, chunk_size: int, backend: str) -> dict:
    """y, final state and the gradient of every input under fixed random cotangents."""
    leaves = {name: None if t is None else t.clone().requires_grad_() for name, t in inputs.items()}
    y, final_state = ssm_scan(**leaves, chunk_size=chunk_size, backend=backend)
    generator = torch.Generator().manual_seed(1)
    loss = (y.float() * torch.randn(y.shape, generator=generator)).sum()
    loss = loss + (final_state * torch.randn(final_state.shape, generator=generator)).sum()
    loss.backward()
    grads = [None if t is None else t.grad for t in leaves.values()]
    return dict(zip(NAMES, [y, final_state, *grads], strict=True))


def assert_matches_naive(inputs: dict, chunk_size: int, dtype: torch.dtype) -> None:
    got, want = forward_backward(inputs, chunk_size, "nki"), forward_backward(inputs, chunk_size, "naive")
    for name in NAMES:
        if want[name] is None:
            assert got[name] is None, f"{name} should have no gradient"
            continue
        assert got[name].dtype == want[name].dtype, name
        scale = want[name].float().abs().max().clamp_min(1e-6)
        error = (got[name].float() - want[name].float()).abs().max() / scale
        assert error <= TOLERANCE[dtype], f"{name}: relative max error {error:.2e} > {TOLERANCE[dtype]:.0e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("time", "chunk_size"),
    [(1, 64), (1, 128), (100, 64), (100, 128), pytest.param(300, 64, marks=pytest.mark.slow), (300, 128)],
)
def test_matches_naive_on_awkward_lengths(time, chunk_size, dtype):
    """P = 64, N = 128, two heads sharing one B/C group; T not a multiple of the chunk."""
    inputs = make_inputs(batch=1, time=time, heads=2, groups=1, head_dim=64, state_dim=128, dtype=dtype)
    assert_matches_naive(inputs, chunk_size, dtype)


def test_several_groups_and_batch_rows_without_skip_or_initial_state():
    inputs = make_inputs(
        2, 70, heads=4, groups=2, head_dim=16, state_dim=8, dtype=torch.float32, skip=False, initial=False
    )
    assert_matches_naive(inputs, 32, torch.float32)


@pytest.mark.skipif(not nki_compat.USING_INTERPRETER, reason="memory high-water marks come from the interpreter")
def test_kernels_fit_on_chip_memory():
    """One chunk of the largest tiles (Q = P = N = 128): PSUM banks and SBUF stay within NeuronCore-v2."""
    inputs = make_inputs(1, 128, heads=2, groups=1, head_dim=128, state_dim=128, dtype=torch.float32)
    host = [None if t is None else t.numpy() for t in inputs.values()]
    forward = run_kernel(ssm_scan_fwd, *host, 128)
    d_y, d_final = torch.ones(1, 128, 2, 128).numpy(), torch.ones(1, 2, 128, 128).numpy()
    backward = run_kernel(ssm_scan_bwd, *host, d_y, d_final, 128)
    for run in (forward, backward):
        assert run.peak_sbuf_bytes_per_partition <= 192 * 1024
        assert run.stats.engines["TensorE"].instructions > 0
    assert forward.peak_psum_banks <= 3
    assert backward.peak_psum_banks <= 6, "the backward keeps 2 of the 8 PSUM banks free"


@pytest.mark.skipif(not nki_compat.USING_INTERPRETER, reason="memory high-water marks come from the interpreter")
@pytest.mark.parametrize(
    ("heads", "head_dim", "state_dim", "chunk"),
    [(32, 64, 128, 128), (2, 64, 128, 128), (32, 32, 128, 128), (16, 128, 128, 128), (8, 16, 16, 32), (3, 8, 4, 16)],
)
def test_sbuf_bound_of_check_shapes_covers_the_kernels_high_water_marks(heads, head_dim, state_dim, chunk):
    """Traced over two chunks with D and an initial state: the bound is at most 1 KiB above what the kernels hold."""
    time, f32 = 2 * chunk, "float32"
    args = [
        ShapeOnly((1, time, heads, head_dim), f32),
        ShapeOnly((1, time, heads), f32),
        ShapeOnly((heads,), f32),
        ShapeOnly((1, time, 1, state_dim), f32),
        ShapeOnly((1, time, 1, state_dim), f32),
        ShapeOnly((heads,), f32),
        ShapeOnly((1, heads, head_dim, state_dim), f32),
    ]
    cotangents = [ShapeOnly((1, time, heads, head_dim), f32), ShapeOnly((1, heads, head_dim, state_dim), f32)]
    measured = (
        run_kernel(ssm_scan_fwd, *args, chunk, execute=False).peak_sbuf_bytes_per_partition,
        run_kernel(ssm_scan_bwd, *args, *cotangents, chunk, execute=False).peak_sbuf_bytes_per_partition,
    )
    for bound, peak in zip(sbuf_bytes_per_partition(heads, head_dim, state_dim, chunk), measured, strict=True):
        assert peak <= bound <= peak + 1024


def test_rejects_heads_whose_tiles_overflow_sbuf():
    inputs = make_inputs(1, 4, heads=128, groups=1, head_dim=128, state_dim=128, dtype=torch.float32)
    assert sbuf_bytes_per_partition(128, 128, 128, 4)[1] > SBUF_BYTES_PER_PARTITION
    with pytest.raises(ValueError, match="SBUF bytes per partition"):
        ssm_scan(**inputs, chunk_size=4, backend="nki")


@pytest.mark.skipif(not nki_compat.USING_INTERPRETER, reason="runs the kernel through the interpreter directly")
def test_vector_engine_baseline_design_computes_the_same_scan():
    """The selective-scan kernel of the cost comparison (channel-major layout), over two 512-step time tiles."""
    inputs = make_inputs(1, 600, heads=4, groups=1, head_dim=64, state_dim=8, dtype=torch.float32)
    y_ref, state_ref = ssm_scan(**inputs, backend="naive")

    def channel_major(t: torch.Tensor) -> torch.Tensor:  # [Bt, T, K, W] -> [Bt, K*W, T]
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, t.shape[1]).contiguous()

    host = [
        channel_major(inputs["x"]),
        inputs["dt"].permute(0, 2, 1).contiguous(),
        inputs["A"],
        inputs["B"].permute(0, 2, 3, 1).contiguous(),
        inputs["C"].permute(0, 2, 3, 1).contiguous(),
        inputs["D"],
        inputs["initial_state"],
    ]
    y_cm, final_state = run_kernel(selective_scan_fwd, *[t.numpy() for t in host]).outputs
    scale = y_ref.abs().max()
    assert (torch.from_numpy(y_cm) - channel_major(y_ref)).abs().max() <= TOLERANCE[torch.float32] * scale
    assert (torch.from_numpy(final_state) - state_ref).abs().max() <= TOLERANCE[torch.float32] * state_ref.abs().max()


def test_nki_needs_the_interpreter_switch_on_cpu(monkeypatch):
    monkeypatch.delenv("BMOJO_NKI_INTERPRET")
    inputs = make_inputs(1, 4, heads=1, groups=1, head_dim=4, state_dim=4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="BMOJO_NKI_INTERPRET=1"):
        ssm_scan(**inputs, backend="nki")


@pytest.mark.parametrize(("head_dim", "chunk_size", "message"), [(4, 129, "chunk_size"), (129, 64, "head_dim")])
def test_rejects_tiles_over_128(head_dim, chunk_size, message):
    inputs = make_inputs(1, 4, heads=1, groups=1, head_dim=head_dim, state_dim=4, dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        ssm_scan(**inputs, chunk_size=chunk_size, backend="nki")


@pytest.mark.neuron
@pytest.mark.skipif(nki_compat.USING_INTERPRETER, reason="needs the Neuron SDK (nki, torch-xla) and a Trainium device")
def test_on_a_neuron_device_matches_naive():
    import torch_xla.core.xla_model as xm

    device = xm.xla_device()
    inputs = make_inputs(1, 300, heads=2, groups=1, head_dim=64, state_dim=128, dtype=torch.float32)
    want = forward_backward(inputs, 128, "naive")
    leaves = {name: t.to(device).requires_grad_() for name, t in inputs.items()}
    y, final_state = ssm_scan(**leaves, chunk_size=128, backend="nki")
    generator = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(y.shape, generator=generator), torch.randn(final_state.shape, generator=generator)]
    loss = (y * cotangents[0].to(device)).sum() + (final_state * cotangents[1].to(device)).sum()
    loss.backward()
    xm.mark_step()
    got = [y, final_state] + [leaf.grad for leaf in leaves.values()]
    for name, value in zip(NAMES, got, strict=True):
        scale = want[name].abs().max().clamp_min(1e-6)
        assert (value.cpu() - want[name]).abs().max() / scale <= TOLERANCE[torch.float32], name
