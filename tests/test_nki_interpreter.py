"""The NKI interpreter: every instruction against the semantics its API reference entry states (aws-neuron-sdk
v2.28.1 ``nki/api/nki/isa/__init__.py``, re-implemented here from the pseudo-code), the hardware rules it
must reject, and its instruction counting."""

from __future__ import annotations

import numpy as np
import pytest

from neuron_kernels.interpreter import (
    CapacityError,
    HardwareRuleError,
    Machine,
    OutOfBoundsError,
    ShapeOnly,
    TypedArray,
    UninitializedReadError,
    cost,
    run_kernel,
)
from neuron_kernels.interpreter import isa as nisa
from neuron_kernels.interpreter import language as nl
from neuron_kernels.interpreter.memory import Allocation, read

RNG = np.random.default_rng(7)


def hbm(values: np.ndarray, dtype: str = "float32"):
    return Allocation(values.shape, dtype, "hbm", "input", np.asarray(values), read_only=True).view()


def tile(values: np.ndarray):
    """An SBUF tile holding ``values`` (int32 or float32, loaded by DMA)."""
    dtype = "int32" if values.dtype.kind == "i" else "float32"
    result = nl.ndarray(values.shape, dtype=dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=result, src=hbm(values, dtype))
    return result


def empty(shape, buffer=nl.sbuf, dtype=nl.float32):
    return nl.ndarray(shape, dtype=dtype, buffer=buffer)


@pytest.fixture
def machine():
    with Machine() as running:
        yield running


def random(*shape) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


# Data movement -------------------------------------------------------------------------------------------


def test_dma_copy_moves_and_casts_through_fp32(machine):
    values = random(4, 6)
    narrow = empty((4, 6), dtype=nl.bfloat16)
    nisa.dma_copy(dst=narrow, src=hbm(values))
    expected = (values.view(np.uint32) + 0x7FFF + ((values.view(np.uint32) >> 16) & 1)) & 0xFFFF0000
    np.testing.assert_array_equal(read(narrow), expected.view(np.float32))
    flat = empty((1, 24))
    nisa.dma_copy(dst=flat, src=hbm(values))  # only element counts must match
    np.testing.assert_array_equal(read(flat).reshape(4, 6), values)


def test_dma_indirect_gather_reads_rows_by_vector_offset(machine):
    table = random(10, 5)
    rows = np.array([[3], [0], [9], [3]], dtype=np.int32)
    out = empty((4, 5))
    source = hbm(table).ap(pattern=[[5, 4], [1, 5]], offset=0, vector_offset=tile(rows), indirect_dim=0)
    nisa.dma_copy(dst=out, src=source, dge_mode=nisa.dge_mode.swdge)
    np.testing.assert_array_equal(read(out), table[rows[:, 0]])


def test_dma_scatter_add_accumulates_onto_unique_rows(machine):
    target = nl.ndarray((6, 3), dtype=nl.float32, buffer=nl.shared_hbm)
    start = random(6, 3)
    nisa.dma_copy(dst=target, src=hbm(start))
    rows = np.array([[1], [4], [0]], dtype=np.int32)
    updates = random(3, 3)
    view = target.ap(pattern=[[3, 3], [1, 3]], offset=0, vector_offset=tile(rows), indirect_dim=0)
    nisa.dma_copy(dst=view, src=tile(updates), dst_rmw_op=nl.add)
    expected = start.copy()
    expected[rows[:, 0]] += updates
    np.testing.assert_allclose(read(target), expected, rtol=1e-6)


@pytest.mark.parametrize("accumulate", [False, True])
def test_dma_scatter_refuses_repeated_rows_citing_the_stub(machine, accumulate):
    target = nl.ndarray((6, 3), dtype=nl.float32, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=target, src=hbm(np.zeros((6, 3), dtype=np.float32)))
    rows = tile(np.array([[1], [4], [1]], dtype=np.int32))
    view = target.ap(pattern=[[3, 3], [1, 3]], offset=0, vector_offset=rows, indirect_dim=0)
    rmw = {"dst_rmw_op": nl.add, "unique_indices": False} if accumulate else {}
    with pytest.raises(HardwareRuleError, match=r"rows \[1\] more than once.*\*\*unique\*\* dynamic indices"):
        nisa.dma_copy(dst=view, src=tile(random(3, 3)), **rmw)


def test_dma_scatter_checks_only_the_rows_it_does_not_skip(machine):
    target = nl.ndarray((6, 3), dtype=nl.float32, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=target, src=hbm(np.zeros((6, 3), dtype=np.float32)))
    rows = np.array([[2], [9], [9]], dtype=np.int32)  # the repeated 9 lies past the end: skipped, not a repeat
    updates = random(3, 3)
    view = target.ap(pattern=[[3, 3], [1, 3]], offset=0, vector_offset=tile(rows), indirect_dim=0)
    nisa.dma_copy(dst=view, src=tile(updates), oob_mode=nisa.oob_mode.skip)
    expected = np.zeros((6, 3), dtype=np.float32)
    expected[2] = updates[0]
    np.testing.assert_array_equal(read(target), expected)


def test_dma_out_of_bounds_index_errors_or_is_skipped(machine):
    table = random(4, 2)
    rows = tile(np.array([[1], [7]], dtype=np.int32))
    out = empty((2, 2))
    nisa.memset(dst=out, value=-1.0)
    source = hbm(table).ap(pattern=[[2, 2], [1, 2]], offset=0, vector_offset=rows, indirect_dim=0)
    with pytest.raises(OutOfBoundsError, match=r"\[7\]"):
        nisa.dma_copy(dst=out, src=source)
    nisa.dma_copy(dst=out, src=source, oob_mode=nisa.oob_mode.skip)
    np.testing.assert_array_equal(read(out), np.stack([table[1], [-1.0, -1.0]]))


def test_tensor_copy_and_memset(machine):
    source = tile(random(8, 4))
    copied = empty((8, 4))
    nisa.tensor_copy(dst=copied, src=source)
    np.testing.assert_array_equal(read(copied), read(source))
    filled = empty((8, 4), dtype=nl.int32)
    nisa.memset(dst=filled, value=5)
    assert (read(filled) == 5).all()


# TensorE ---------------------------------------------------------------------------------------------------


def test_nc_matmul_is_stationary_transpose_times_moving_and_accumulates(machine):
    stationary, moving = random(16, 8), random(16, 32)
    out = empty((8, 32), buffer=nl.psum)
    nisa.nc_matmul(dst=out, stationary=tile(stationary), moving=tile(moving))
    np.testing.assert_allclose(read(out), stationary.T @ moving, rtol=1e-5, atol=1e-5)
    extra = random(16, 32)
    nisa.nc_matmul(dst=out, stationary=tile(stationary), moving=tile(extra))  # same group: accumulates
    np.testing.assert_allclose(read(out), stationary.T @ (moving + extra), rtol=1e-5, atol=1e-5)


def test_nc_transpose_on_tensor_engine(machine):
    data = random(12, 20)
    out = empty((20, 12), buffer=nl.psum)
    nisa.nc_transpose(dst=out, data=tile(data))
    np.testing.assert_array_equal(read(out), data.T)
    assert machine.stats.engines["TensorE"].by_instruction["nc_transpose"] == 1


# VectorE / ScalarE / GpSimd -----------------------------------------------------------------------------


def test_tensor_tensor_elementwise(machine):
    a, b = random(5, 7), random(5, 7)
    out = empty((5, 7))
    nisa.tensor_tensor(dst=out, data1=tile(a), data2=tile(b), op=nl.subtract)
    np.testing.assert_allclose(read(out), a - b, rtol=1e-6)
    nisa.tensor_tensor(dst=out, data1=tile(a), data2=tile(b), op=nl.maximum)
    np.testing.assert_array_equal(read(out), np.maximum(a, b))


def test_tensor_scalar_two_stages_with_reversal(machine):
    data, column = random(6, 9), random(6, 1)
    out = empty((6, 9))
    # reverse0: operand0 is the lhs of op0; reverse1=False: operand1 is the rhs of op1.
    nisa.tensor_scalar(
        dst=out, data=tile(data), op0=nl.subtract, operand0=tile(column), reverse0=True, op1=nl.multiply, operand1=3.0
    )
    np.testing.assert_allclose(read(out), (column - data) * 3.0, rtol=1e-6)


def test_activation_scale_bias_and_reduce_registers(machine):
    data, scale, bias = random(4, 10), random(4, 1), random(4, 1)
    out, sums = empty((4, 10)), empty((4, 1))
    nisa.activation(
        dst=out,
        op=nl.exp,
        data=tile(data),
        bias=tile(bias),
        scale=tile(scale),
        reduce_op=nl.add,
        reduce_res=sums,
        reduce_cmd=nisa.reduce_cmd.reset_reduce,
    )
    expected = np.exp(data * scale + bias)
    np.testing.assert_allclose(read(out), expected, rtol=1e-5)
    np.testing.assert_allclose(read(sums)[:, 0], expected.sum(axis=1), rtol=1e-5)
    # reduce keeps accumulating onto the registers; idle only reads them out.
    nisa.activation(dst=out, op=nl.copy, data=tile(data), reduce_op=nl.add, reduce_cmd=nisa.reduce_cmd.reduce)
    nisa.activation(dst=out, op=nl.copy, data=tile(data), reduce_res=sums)
    np.testing.assert_allclose(read(sums)[:, 0], expected.sum(axis=1) + data.sum(axis=1), rtol=1e-5)


def test_activation_rejects_inputs_outside_the_valid_range(machine):
    with pytest.raises(HardwareRuleError, match="valid range"):
        nisa.activation(dst=empty((2, 2)), op=nl.log, data=tile(np.zeros((2, 2), dtype=np.float32)))


def test_tensor_tensor_scan_follows_the_recurrence(machine):
    data0, data1, initial = random(3, 12), random(3, 12), random(3, 1)
    out = empty((3, 12))
    nisa.tensor_tensor_scan(
        dst=out, data0=tile(data0), data1=tile(data1), initial=tile(initial), op0=nl.multiply, op1=nl.add
    )
    expected = np.empty_like(data0)
    previous = initial[:, 0]
    for i in range(12):  # result[:, i] = op1(op0(data0[:, i], result[:, i-1]), data1[:, i])
        previous = data0[:, i] * previous + data1[:, i]
        expected[:, i] = previous
    np.testing.assert_allclose(read(out), expected, rtol=1e-5)
    nisa.tensor_tensor_scan(
        dst=out, data0=tile(data0), data1=tile(data1), initial=0.0, op0=nl.subtract, op1=nl.subtract,
        reverse0=True, reverse1=True,
    )  # fmt: skip
    previous = np.zeros(3, dtype=np.float32)
    for i in range(12):  # reverse0: data0 is the rhs of op0; reverse1: data1 is the lhs of op1
        previous = data1[:, i] - (previous - data0[:, i])
        expected[:, i] = previous
    np.testing.assert_allclose(read(out), expected, rtol=1e-5, atol=1e-6)


def test_iota_and_affine_select_evaluate_the_affine_pattern(machine):
    values = empty((4, 6), dtype=nl.int32)
    nisa.iota(dst=values, pattern=[[10, 2], [1, 3]], offset=5, channel_multiplier=100)
    expected = np.array([[5 + 100 * p + 10 * w + x for w in range(2) for x in range(3)] for p in range(4)])
    np.testing.assert_array_equal(read(values), expected)
    ones = empty((4, 4))
    nisa.memset(dst=ones, value=1.0)
    lower = empty((4, 4))
    nisa.affine_select(
        dst=lower, pattern=[[-1, 4]], offset=0, channel_multiplier=1, on_true_tile=ones, on_false_value=0.0,
        cmp_op=nl.greater_equal,
    )  # fmt: skip
    np.testing.assert_array_equal(read(lower), np.tril(np.ones((4, 4))))


# Hardware rules ------------------------------------------------------------------------------------------


def test_rejects_a_129_partition_tile(machine):
    with pytest.raises(HardwareRuleError, match="129 partitions"):
        empty((129, 4))


@pytest.mark.parametrize(
    ("stationary_shape", "moving_shape", "message"),
    [((128, 129), (128, 8), "stationary free size 129"), ((64, 8), (64, 513), "moving free size 513")],
)
def test_rejects_an_oversized_matmul_operand(machine, stationary_shape, moving_shape, message):
    stationary, moving = empty(stationary_shape), empty(moving_shape)
    nisa.memset(dst=stationary, value=1.0)
    nisa.memset(dst=moving, value=1.0)
    with pytest.raises(HardwareRuleError, match=message):
        nisa.nc_matmul(dst=empty((8, 8), buffer=nl.psum), stationary=stationary, moving=moving)


def test_matmul_must_write_psum(machine):
    operand = tile(random(4, 4))
    with pytest.raises(HardwareRuleError, match="dst must be in psum"):
        nisa.nc_matmul(dst=empty((4, 4)), stationary=operand, moving=operand)


def test_onezero_flags_hold_only_for_0_1_operands(machine):
    mask = tile(np.triu(np.ones((4, 4), dtype=np.float32)))
    moving = tile(random(4, 3))
    product = empty((4, 3), buffer=nl.psum)
    nisa.nc_matmul(dst=product, stationary=mask, moving=moving, is_stationary_onezero=True)
    np.testing.assert_allclose(read(product), np.triu(np.ones((4, 4))).T @ read(moving), rtol=1e-6)
    with pytest.raises(HardwareRuleError, match="is_moving_onezero=True but the moving holds values other than 0/1"):
        nisa.nc_matmul(dst=empty((4, 3), buffer=nl.psum), stationary=mask, moving=moving, is_moving_onezero=True)


def test_rejects_dma_from_psum(machine):
    result = empty((4, 4), buffer=nl.psum)
    nisa.nc_matmul(dst=result, stationary=tile(random(4, 4)), moving=tile(random(4, 4)))
    out = nl.ndarray((4, 4), dtype=nl.float32, buffer=nl.shared_hbm)
    with pytest.raises(HardwareRuleError, match="PSUM, which DMA cannot access"):
        nisa.dma_copy(dst=out, src=result)


def test_rejects_reading_never_written_memory(machine):
    fresh = empty((4, 4))
    assert np.isnan(fresh.allocation.data).all()  # new buffers hold NaN, like the official simulator
    half = tile(random(4, 2))
    nisa.tensor_copy(dst=fresh[:, 0:2], src=half)
    with pytest.raises(UninitializedReadError, match="8 never-written"):
        nisa.tensor_tensor(dst=empty((4, 4)), data1=fresh, data2=fresh, op=nl.add)


def test_rejects_accumulating_onto_psum_another_engine_wrote(machine):
    result = empty((4, 4), buffer=nl.psum)
    nisa.memset(dst=result, value=0.0)
    operand = tile(random(4, 4))
    with pytest.raises(HardwareRuleError, match="undefined"):
        nisa.nc_matmul(dst=result, stationary=operand, moving=operand)


def test_sbuf_and_psum_capacity_follow_live_tiles(machine):
    big = empty((128, 40 * 1024))  # 160 KiB per partition of the 192
    with pytest.raises(CapacityError, match="SBUF overflow"):
        empty((1, 16 * 1024))
    del big
    empty((1, 16 * 1024))  # the space came back when the tile was dropped
    banks = [empty((128, 512), buffer=nl.psum) for _ in range(8)]
    with pytest.raises(CapacityError, match="PSUM overflow"):
        empty((1, 1), buffer=nl.psum)
    assert machine.peak_psum_banks == len(banks)


def test_kernel_outputs_must_be_fully_written():
    def kernel(values):
        out = nl.ndarray((2, 4), dtype=nl.float32, buffer=nl.shared_hbm)
        staged = nl.ndarray((2, 2), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=staged, src=values)
        nisa.dma_copy(dst=out[:, 0:2], src=staged)
        return out

    with pytest.raises(UninitializedReadError, match="4 never-written"):
        run_kernel(kernel, random(2, 2))


# Counting and the cost model -----------------------------------------------------------------------------


def _small_kernel(a, b):
    out = nl.ndarray((8, 64), dtype=nl.bfloat16, buffer=nl.shared_hbm)
    left, right = nl.ndarray(a.shape, dtype=nl.float32), nl.ndarray(b.shape, dtype=nl.float32)
    nisa.dma_copy(dst=left, src=a)
    nisa.dma_copy(dst=right, src=b)
    product = nl.ndarray((8, 64), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=product, stationary=left, moving=right)
    staged = nl.ndarray((8, 64), dtype=nl.bfloat16)
    nisa.activation(dst=staged, op=nl.copy, data=product)
    nisa.dma_copy(dst=out, src=staged)
    return out


def test_counts_engines_and_prices_them_with_the_documented_model():
    a, b = random(32, 8), random(32, 64)
    run = run_kernel(_small_kernel, a, TypedArray(b, "bfloat16"))
    engines = run.stats.engines
    assert (engines["TensorE"].instructions, engines["ScalarE"].instructions, engines["DMA"].instructions) == (1, 1, 3)
    assert engines["TensorE"].seconds == pytest.approx(max(64, 64) * 4 / 2.8e9)  # fp32 operands: 4x
    assert engines["ScalarE"].seconds == pytest.approx((100 + 64) / 1.4e9)
    bytes_moved = (32 * 8 + 32 * 64) * 4 + 8 * 64 * 2
    assert engines["DMA"].elements == bytes_moved
    assert run.stats.matmul_flops == 2 * 32 * 8 * 64
    assert run.stats.estimated_seconds == max(e.seconds for e in engines.values())
    assert run.stats.bound_by == max(engines, key=lambda name: engines[name].seconds)
    assert cost.dma_seconds(4096, 128) == pytest.approx(4096 / (410 * 2**30))


def test_trace_only_run_counts_what_an_executed_run_does():
    a, b = random(32, 8), random(32, 64)
    executed = run_kernel(_small_kernel, a, b)
    traced = run_kernel(_small_kernel, ShapeOnly((32, 8), "float32"), ShapeOnly((32, 64), "float32"), execute=False)
    assert traced.outputs is None
    assert traced.stats.summary() == executed.stats.summary()
