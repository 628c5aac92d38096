"""bmojo_attention: the fused torch backend against the dense naive reference, and the reference itself
against a per-query key list built by hand from the visibility rules."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from bmojo.model.layers import RotaryEmbedding
from bmojo.ops import attention_blockwise
from bmojo.ops.attention import bmojo_attention

FLOAT_INPUTS = ("q", "k", "v", "fading_q", "fading_k", "fading_v", "mem_q", "mem_k", "mem_v")


def make_inputs(
    *,
    length: int = 37,
    query_heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 8,
    window: int | None = 8,
    fading: bool = True,
    fading_query: bool = False,
    slots: int = 0,
    memory_query: bool = False,
    mem_block: int = 8,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    batch: int = 2,
) -> dict:
    """Random inputs; ``fading_query`` adds a query of the fading keys' own (untied fading projections), ``slots > 0``
    memory with random positions and ~70% valid entries, ``memory_query`` a query of the memory keys' own (memory
    keys without positional encoding)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    inputs = {
        "q": randn(batch, length, query_heads, head_dim),
        "k": randn(batch, length, kv_heads, head_dim),
        "v": randn(batch, length, kv_heads, head_dim),
        "window": window,
    }
    if fading:
        inputs |= {name: randn(batch, length, kv_heads, head_dim) for name in ("fading_k", "fading_v")}
    if fading_query:
        inputs["fading_q"] = randn(batch, length, query_heads, head_dim)
    if slots:
        num_blocks = math.ceil(length / mem_block)
        inputs |= {
            "mem_k": randn(batch, num_blocks, slots, kv_heads, head_dim),
            "mem_v": randn(batch, num_blocks, slots, kv_heads, head_dim),
            "mem_pos": torch.randint(0, length, (batch, num_blocks, slots), generator=generator),
            "mem_valid": torch.rand(batch, num_blocks, slots, generator=generator) < 0.7,
            "mem_block": mem_block,
        }
    if memory_query:
        inputs["mem_q"] = randn(batch, length, query_heads, head_dim)
    return inputs


def run(backend: str, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and the gradients of every float input for a fixed random output gradient."""
    leaves = {name: inputs[name].clone().requires_grad_(True) for name in FLOAT_INPUTS if name in inputs}
    out = bmojo_attention(**(inputs | leaves), backend=backend)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(123)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out, allow_unused=True, materialize_grads=True)
    return out, dict(zip(leaves, grads, strict=True))


def assert_relative_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str) -> None:
    """max |actual - expected| <= tolerance * max |expected| (scale-free, for low-precision comparisons)."""
    error = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert error <= tolerance * max(scale, 1e-6), f"{what}: max error {error:.3g} vs scale {scale:.3g}"


CASES = {
    "causal_full": dict(window=None, fading=False),
    "causal_full_mqa": dict(window=None, fading=False, kv_heads=1),
    "window_only": dict(fading=False),
    "window_1": dict(window=1),
    "fading": dict(),
    "fading_mqa": dict(kv_heads=1),
    "memory_no_fading": dict(fading=False, slots=6),
    "fading_memory_qe8": dict(slots=6, mem_block=8),
    "fading_memory_qe5_mqa": dict(slots=4, mem_block=5, kv_heads=1),
    "fading_memory_qe13": dict(slots=3, mem_block=13, window=5),
    "window_at_least_T": dict(window=40, slots=5, mem_block=16),
    "window_equals_T_minus_1": dict(window=36, slots=5, mem_block=16),
    # A query block of 16 straddles up to four memory blocks of 5.
    "query_block_spans_memory_rows": dict(window=16, slots=3, mem_block=5),
    # Full query blocks of 64 with a padded last one (T = 150), memory blocks of 64.
    "blocks_of_64_padded": dict(length=150, window=70, slots=4, mem_block=64),
    # Band blocks of 64 against memory blocks of 50: both paddings differ; several full bands of fading keys.
    "band_and_memory_blocks_differ": dict(length=203, window=40, slots=5, mem_block=50, kv_heads=1),
    # T a multiple of the band's blocks and of the memory's: nothing padded; three sequences.
    "unpadded_batch_of_3": dict(length=128, window=40, slots=4, mem_block=32, batch=3),
    # The fading keys' own query (untied fading projections): alone, with GQA/MQA, memory and awkward blocks.
    "fading_query": dict(fading_query=True),
    "fading_query_window_1": dict(window=1, fading_query=True),
    "fading_query_memory_qe5_mqa": dict(slots=4, mem_block=5, kv_heads=1, fading_query=True),
    "fading_query_window_equals_T_minus_1": dict(window=36, slots=5, mem_block=16, fading_query=True),
    "fading_query_window_at_least_T": dict(window=40, fading_query=True),
    "fading_query_band_and_memory_blocks_differ": dict(
        length=203, window=40, slots=5, mem_block=50, kv_heads=1, fading_query=True
    ),
    # The memory keys' own query (memory keys without positional encoding): alone, with a fading query, with
    # GQA/MQA and awkward blocks.
    "memory_query": dict(slots=6, memory_query=True),
    "memory_query_no_fading": dict(fading=False, slots=6, memory_query=True),
    "memory_query_window_at_least_T": dict(window=40, slots=5, mem_block=16, memory_query=True),
    "memory_query_fading_query_qe5_mqa": dict(slots=4, mem_block=5, kv_heads=1, fading_query=True, memory_query=True),
    "memory_query_band_and_memory_blocks_differ": dict(
        length=203, window=40, slots=5, mem_block=50, kv_heads=1, memory_query=True
    ),
}

# The torch backend's two windowed paths: banded (CPU) and gathered (other devices), both run here.
PATHS = ("banded", "gathered")


@pytest.fixture(params=PATHS)
def path(request, monkeypatch) -> SimpleNamespace:
    """Route the torch backend's windowed attention through one path (gathered: as without the CPU kernels);
    ``calls`` counts the banded path's calls."""
    calls = []
    if request.param == "gathered":
        monkeypatch.setattr(attention_blockwise, "FLASH_OPS", None)
    else:
        assert attention_blockwise.FLASH_OPS is not None, "this PyTorch lacks the CPU flash kernels"
        banded = attention_blockwise.banded_attention
        monkeypatch.setattr(attention_blockwise, "banded_attention", lambda *a: calls.append(1) or banded(*a))
    return SimpleNamespace(name=request.param, calls=calls)


def assert_path_ran(path: SimpleNamespace, inputs: dict) -> None:
    """A windowed call on the banded path went through it (and no other call did)."""
    banded = path.name == "banded" and inputs["window"] is not None
    assert bool(path.calls) == banded, f"banded path calls: {len(path.calls)} on the {path.name} path"


@pytest.mark.parametrize("case", CASES)
def test_torch_matches_naive_fp32(case: str, path: SimpleNamespace) -> None:
    inputs = make_inputs(**CASES[case])
    out, grads = run("torch", inputs)
    assert_path_ran(path, inputs)
    expected_out, expected_grads = run("naive", inputs)
    assert out.shape == inputs["q"].shape and out.dtype == torch.float32
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), f"non-finite gradient of {name}"
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-5, msg=f"gradient of {name}")


@pytest.mark.parametrize(
    "case",
    [
        "causal_full",
        "fading",
        "fading_memory_qe5_mqa",
        "band_and_memory_blocks_differ",
        "fading_query_memory_qe5_mqa",
        "fading_query_band_and_memory_blocks_differ",
        "memory_query_fading_query_qe5_mqa",
    ],
)
def test_torch_matches_naive_bf16(case: str, path: SimpleNamespace) -> None:
    # bf16 keeps 8 mantissa bits and the torch paths round scaled queries and softmax weights to bf16 before
    # their matmuls (the banded one also each key set's output before the merge): agreement to 2% of each
    # tensor's largest entry (measured: at most 1.1% gathered, its worst with a fading query; 1.0% banded).
    inputs = make_inputs(**CASES[case], dtype=torch.bfloat16)
    out, grads = run("torch", inputs)
    assert_path_ran(path, inputs)
    expected_out, expected_grads = run("naive", inputs)
    assert out.dtype == torch.bfloat16
    assert_relative_close(out, expected_out, 2e-2, "output")
    for name, grad in grads.items():
        assert grad.dtype == torch.bfloat16
        assert_relative_close(grad, expected_grads[name], 2e-2, f"gradient of {name}")


@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.parametrize("invisible", ["all_invalid", "inside_window"])
def test_invisible_memory_changes_nothing(backend: str, invisible: str, path: SimpleNamespace) -> None:
    if backend == "naive" and path.name == "gathered":
        pytest.skip("the naive backend has one path: run once")
    inputs = make_inputs(slots=4, mem_block=8)
    if invisible == "all_invalid":
        inputs["mem_valid"] = torch.zeros_like(inputs["mem_valid"])
    else:
        # Every entry of block c sits at the block's last position: inside the window (w = Q_e) of its queries.
        block_ends = (torch.arange(inputs["mem_pos"].shape[1]) * 8 + 7).clamp(max=36)
        inputs["mem_pos"] = block_ends[None, :, None].expand_as(inputs["mem_pos"]).clone()
    without_memory = {name: inputs[name] for name in ("q", "k", "v", "window", "fading_k", "fading_v")}
    out, grads = run(backend, inputs)
    if backend == "torch":
        assert_path_ran(path, inputs)
    expected_out, expected_grads = run("naive", without_memory)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    for name, expected in expected_grads.items():
        torch.testing.assert_close(grads[name], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(grads["mem_k"], torch.zeros_like(grads["mem_k"]))
    assert torch.equal(grads["mem_v"], torch.zeros_like(grads["mem_v"]))


@pytest.mark.parametrize("fading_query", [False, True])
def test_a_non_finite_sequence_leaves_the_others_alone(path: SimpleNamespace, fading_query: bool) -> None:
    # An overflow in one sequence of a batch (its last value) must not reach another through a masked score.
    inputs = make_inputs(length=150, window=40, slots=4, mem_block=32, batch=3, fading_query=fading_query)
    inputs["v"][0, -1] = float("nan")
    inputs["k"][0, -2] = float("inf")
    out = bmojo_attention(**inputs, backend="torch")
    assert_path_ran(path, inputs)
    assert not torch.isfinite(out[0]).all()
    alone = {name: value[1:] if isinstance(value, torch.Tensor) else value for name, value in inputs.items()}
    torch.testing.assert_close(out[1:], bmojo_attention(**alone, backend="naive"), rtol=1e-5, atol=1e-5)


def test_recomputed_under_activation_checkpointing(path: SimpleNamespace) -> None:
    # A checkpointed backward lets each saved tensor be unpacked only once.
    inputs = make_inputs(slots=4, mem_block=8, fading_query=True, memory_query=True)
    leaves = {name: inputs[name].clone().requires_grad_(True) for name in FLOAT_INPUTS}

    def attend(*tensors: torch.Tensor) -> torch.Tensor:
        return bmojo_attention(**(inputs | dict(zip(FLOAT_INPUTS, tensors, strict=True))), backend="torch")

    out = torch.utils.checkpoint.checkpoint(attend, *leaves.values(), use_reentrant=False)
    grads = torch.autograd.grad(out.square().sum(), list(leaves.values()))
    assert_path_ran(path, inputs)
    expected = torch.autograd.grad(attend(*leaves.values()).square().sum(), list(leaves.values()))
    for name, grad, reference in zip(leaves, grads, expected, strict=True):
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-5, msg=f"gradient of {name}")


def test_memory_of_no_slots_is_no_memory() -> None:
    inputs = make_inputs(slots=4, mem_block=8)
    batch, num_blocks, _, kv_heads, head_dim = inputs["mem_k"].shape
    inputs |= {
        "mem_k": torch.zeros(batch, num_blocks, 0, kv_heads, head_dim),
        "mem_v": torch.zeros(batch, num_blocks, 0, kv_heads, head_dim),
        "mem_pos": torch.zeros(batch, num_blocks, 0, dtype=torch.long),
        "mem_valid": torch.zeros(batch, num_blocks, 0, dtype=torch.bool),
    }
    without_memory = {name: inputs[name] for name in ("q", "k", "v", "window", "fading_k", "fading_v")}
    torch.testing.assert_close(
        bmojo_attention(**inputs, backend="torch"), bmojo_attention(**without_memory, backend="naive")
    )


@pytest.mark.parametrize("memory_query", [False, True])
@pytest.mark.parametrize("fading_query", [False, True])
def test_naive_matches_hand_built_key_list(fading_query: bool, memory_query: bool) -> None:
    length, window, mem_block, scale = 21, 4, 5, 0.3
    inputs = make_inputs(
        length=length, window=window, slots=3, mem_block=mem_block, seed=7, fading_query=fading_query,
        memory_query=memory_query,
    )  # fmt: skip
    out = bmojo_attention(**inputs, scale=scale, backend="naive")
    group = 2  # query heads per kv head
    for batch, t, head in [(0, 0, 0), (1, 3, 1), (0, 9, 2), (1, 14, 3), (0, 20, 0), (1, 17, 2)]:
        kv_head = head // group
        query = inputs["q"][batch, t, head]
        fading_query_row = inputs["fading_q"][batch, t, head] if fading_query else query
        memory_query_row = inputs["mem_q"][batch, t, head] if memory_query else query
        keys, values = [], []  # (query, key) pairs, and their values
        for j in range(length):
            if t - window + 1 <= j <= t:
                keys.append((query, inputs["k"][batch, j, kv_head]))
                values.append(inputs["v"][batch, j, kv_head])
            if t - 2 * window + 1 <= j <= t - window:
                keys.append((fading_query_row, inputs["fading_k"][batch, j, kv_head]))
                values.append(inputs["fading_v"][batch, j, kv_head])
        block = t // mem_block
        for slot in range(3):
            valid = bool(inputs["mem_valid"][batch, block, slot])
            if valid and int(inputs["mem_pos"][batch, block, slot]) < t - window + 1:
                keys.append((memory_query_row, inputs["mem_k"][batch, block, slot, kv_head]))
                values.append(inputs["mem_v"][batch, block, slot, kv_head])
        logits = [scale * float(row.double() @ key.double()) for row, key in keys]
        top = max(logits)
        weights = [math.exp(logit - top) for logit in logits]
        expected = sum(w * value.double() for w, value in zip(weights, values, strict=True)) / sum(weights)
        torch.testing.assert_close(out[batch, t, head].double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_memory_query_scores_memory_keys_by_content_only(backend: str, path: SimpleNamespace) -> None:
    # Queries and keys rotated to their positions, memory keys stored without RoPE; with w = 1 a query sees only
    # itself and its memory. Scored with mem_q, the query before RoPE, a memory score is q · mem_k of un-rotated
    # vectors, and the self score depends on no position: shifting every position by 100 changes no output.
    # Scored with the rotated query (no mem_q), the memory scores depend on the query's absolute position.
    if backend == "naive" and path.name == "gathered":
        pytest.skip("the naive backend has one path: run once")
    length, scale = 21, 0.5
    inputs = make_inputs(length=length, window=1, fading=False, slots=3, mem_block=5, seed=3)
    # Every entry valid and from position 0: every query t >= 1 sees all three of its block.
    inputs["mem_valid"] = torch.ones_like(inputs["mem_valid"])
    inputs["mem_pos"] = torch.zeros_like(inputs["mem_pos"])
    unrotated_q, unrotated_k = inputs["q"], inputs["k"]
    rope = RotaryEmbedding(unrotated_q.shape[-1], 10_000.0)

    def attend(shift: int, memory_query: bool) -> torch.Tensor:
        tables = rope.tables(torch.arange(length) + shift)
        rotated = dict(q=rope(unrotated_q, tables), k=rope(unrotated_k, tables))
        with_query = dict(mem_q=unrotated_q) if memory_query else {}
        return bmojo_attention(**(inputs | rotated | with_query), scale=scale, backend=backend)

    out = attend(0, memory_query=True)
    torch.testing.assert_close(attend(100, memory_query=True), out, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(attend(100, memory_query=False), attend(0, memory_query=False), atol=1e-3)
    group, mem_block = 2, 5  # query heads per kv head; positions per memory block
    for batch, t, head in [(0, 6, 0), (1, 13, 3), (0, 20, 1)]:
        kv_head = head // group
        query = unrotated_q[batch, t, head].double()
        logits = [scale * float(query @ unrotated_k[batch, t, kv_head].double())]  # RoPE keeps q_t · k_t
        values = [inputs["v"][batch, t, kv_head].double()]
        for slot in range(3):
            logits.append(scale * float(query @ inputs["mem_k"][batch, t // mem_block, slot, kv_head].double()))
            values.append(inputs["mem_v"][batch, t // mem_block, slot, kv_head].double())
        weights = torch.softmax(torch.tensor(logits, dtype=torch.float64), dim=0)
        expected = sum(weight * value for weight, value in zip(weights, values, strict=True))
        torch.testing.assert_close(out[batch, t, head].double(), expected, rtol=1e-5, atol=1e-6)
    if backend == "torch":
        assert_path_ran(path, inputs)


def test_auto_backend_matches_explicit_torch() -> None:
    inputs = make_inputs(slots=2)
    torch.testing.assert_close(bmojo_attention(**inputs), bmojo_attention(**inputs, backend="torch"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(window=None), "fading keys need a window"),
        (dict(fading_v=None), "fading_k and fading_v together"),
        (dict(fading_q=torch.zeros(2, 37, 4, 8), fading_k=None, fading_v=None), "pass fading_k and fading_v with it"),
        (dict(fading_q=torch.zeros(2, 37, 2, 8)), r"fading_q must be \[B, T, Hq, D\]"),
        (
            dict(mem_q=torch.zeros(2, 37, 4, 8), mem_k=None, mem_v=None, mem_pos=None, mem_valid=None, mem_block=None),
            "pass the memory",
        ),
        (dict(mem_q=torch.zeros(2, 37, 2, 8)), r"mem_q must be \[B, T, Hq, D\]"),
        (dict(window=0), "window must be a positive int"),
        (dict(k=torch.zeros(2, 37, 3, 8)), "multiple of key/value heads"),
        (dict(v=torch.zeros(2, 36, 2, 8)), r"v must be \[B, T, Hkv, D\]"),
        (dict(q=torch.zeros(2, 37, 4)), r"q must be \[B, T, Hq, D\]"),
        (dict(fading_k=torch.zeros(2, 37, 2, 8, dtype=torch.float64)), "has dtype torch.float64"),
        (dict(mem_block=5), r"NB=ceil\(T/mem_block\)=8"),
        (dict(mem_pos=None), "missing \\['mem_pos'\\]"),
        (dict(mem_pos=torch.zeros(2, 5, 2, dtype=torch.int32)), "mem_pos must be int64"),
        (dict(mem_valid=torch.ones(2, 5, 2, dtype=torch.uint8)), "mem_valid must be bool"),
        (dict(mem_valid=torch.ones(2, 5, 3, dtype=torch.bool)), r"mem_valid must be \[B, NB, M\]"),
    ],
)
def test_rejects_bad_input(change: dict, message: str) -> None:
    inputs = make_inputs(slots=2) | change
    with pytest.raises((ValueError, TypeError), match=message):
        bmojo_attention(**inputs)
