"""Stand-in for ``nki.isa`` (NKI 2.28 API, ``dst=`` first): the instructions of DESIGN §4 in NumPy.

Each instruction checks the rules its API reference entry states (aws-neuron-sdk v2.28.1,
``nki/api/nki/isa/__init__.py``) and the hardware limits of NeuronCore-v2, computes its result in fp32
(int arithmetic for ``iota``), rounds it to the destination dtype, and records its engine, size and
modelled cost (:mod:`neuron_kernels.interpreter.cost`). The README beside this file lists, per
instruction, which stated rule is enforced and where the interpreter is stricter than the hardware.
"""

from __future__ import annotations

import math
from enum import Enum
from numbers import Number

import numpy as np

from neuron_kernels.interpreter import cost, dtypes
from neuron_kernels.interpreter import operators as ops
from neuron_kernels.interpreter.errors import HardwareRuleError, NkiInterpreterError
from neuron_kernels.interpreter.memory import (
    PARTITIONS,
    PSUM_BANK_BYTES,
    PSUM_ENGINE,
    PSUM_FRESH,
    PSUM_MATMUL,
    Tensor,
    current_machine,
    load_elements,
    read,
    store_elements,
    write,
)

# The names this module offers as ``nisa.*``; tests/test_nki_stub_conformance.py holds them against the SDK stubs.
__all__ = [
    "activation",
    "affine_select",
    "dge_mode",
    "dma_copy",
    "engine",
    "get_nc_version",
    "iota",
    "matmul_perf_mode",
    "memset",
    "nc_matmul",
    "nc_transpose",
    "nc_version",
    "oob_mode",
    "reduce_cmd",
    "tensor_copy",
    "tensor_scalar",
    "tensor_tensor",
    "tensor_tensor_scan",
]


class engine(Enum):  # noqa: N801  (the NKI names)
    unknown = 0
    tensor = 1
    scalar = 2
    gpsimd = 3
    dma = 4
    vector = 5
    sync = 6


class dge_mode(Enum):  # noqa: N801
    unknown = 0
    swdge = 1
    hwdge = 2
    none = 3


class oob_mode(Enum):  # noqa: N801
    error = 0
    skip = 1


class reduce_cmd(Enum):  # noqa: N801
    idle = 0
    reset = 1
    reduce = 2
    reset_reduce = 3
    load_reduce = 4


class matmul_perf_mode(Enum):  # noqa: N801
    none = "none"
    double_row = "double_row"


class nc_version(Enum):  # noqa: N801
    gen2 = 2
    gen3 = 3
    gen4 = 4


# Instruction parameters reuse these names (engine=, dge_mode=, ...), so the bodies refer to the aliases.
_Engine, _DgeMode, _OobMode, _ReduceCmd = engine, dge_mode, oob_mode, reduce_cmd
_ENGINE_NAMES = {engine.tensor: "TensorE", engine.vector: "VectorE", engine.scalar: "ScalarE", engine.gpsimd: "GpSimd"}


def get_nc_version() -> nc_version:
    """The interpreter models trn1 (NeuronCore-v2)."""
    return nc_version.gen2


# Operand checks ---------------------------------------------------------------------------------------------


def _tensor(value, instruction: str, role: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise NkiInterpreterError(f"{instruction}: {role} must be an NKI tensor, got {type(value).__name__}")
    return value


def _on_chip(value, instruction: str, role: str, allowed=("sbuf", "psum")) -> Tensor:
    """An SBUF/PSUM operand of a compute engine: contiguous partitions from a legal start, within a row."""
    tile = _tensor(value, instruction, role)
    if tile.buffer not in allowed:
        raise HardwareRuleError(f"{instruction}: {role} must be in {' or '.join(allowed)}, got {tile.buffer}")
    if tile.indirect is not None:
        raise HardwareRuleError(f"{instruction}: indirect access patterns are only for DMA ({role})")
    row = tile.allocation.row_size
    count = tile.partitions
    if count > PARTITIONS:
        raise HardwareRuleError(f"{instruction}: {role} spans {count} partitions; at most {PARTITIONS}")
    if count > 1 and tile.strides[0] != row:
        raise HardwareRuleError(f"{instruction}: {role} must walk partitions one by one along its first dimension")
    start = tile.offset // row
    legal_starts = (0,) if count > 64 else (0, 64) if count > 32 else (0, 32, 64, 96)
    if start not in legal_starts:
        raise HardwareRuleError(
            f"{instruction}: {role} starts at partition {start}; a {count}-partition access must start at one of "
            f"{legal_starts} (NeuronCore-v2 start-partition rule)"
        )
    extent = tile.offset % row + tile.free_extent
    if extent >= row:
        raise HardwareRuleError(f"{instruction}: {role} reaches past the end of its partition rows")
    return tile


def _same_layout(a: Tensor, b: Tensor, instruction: str, roles: str) -> None:
    if (a.partitions, a.free_size) != (b.partitions, b.free_size):
        raise HardwareRuleError(
            f"{instruction}: {roles} must have the same partitions and elements per partition, got "
            f"{a.shape} and {b.shape}"
        )


def _not_both_psum(a: Tensor, b: Tensor, instruction: str) -> None:
    if a.buffer == "psum" and b.buffer == "psum":
        raise HardwareRuleError(f"{instruction}: the two input tiles cannot both be in PSUM; copy one to SBUF")


def _operator(op, instruction: str, role: str, kind: str) -> ops.Operator:
    if not isinstance(op, ops.Operator) or getattr(op, kind) is None:
        expected = "an ALU operator like nl.add" if kind == "binary" else "an activation function like nl.exp"
        raise NkiInterpreterError(f"{instruction}: {role} must be {expected}, got {op!r}")
    return op


def _scalar_operand(value, data: Tensor, instruction: str, role: str):
    """A compile-time number, or a [partitions, 1] tile read as a column."""
    if isinstance(value, Number):
        return float(value)
    tile = _on_chip(value, instruction, role)
    if tile.partitions != data.partitions or tile.free_size != 1:
        raise HardwareRuleError(f"{instruction}: {role} tile must be [{data.partitions}, 1], got {tile.shape}")
    return tile


def _column(value, machine) -> float | np.ndarray:
    if isinstance(value, float) or not machine.execute:
        return value
    return read(value).reshape(-1, 1)


def _values(tile: Tensor) -> np.ndarray:
    """[partitions, free] values in fp32 (ints stay ints)."""
    return read(tile).reshape(tile.partitions, tile.free_size)


def _store(dst: Tensor, values: np.ndarray, psum_state: int = PSUM_ENGINE) -> None:
    write(dst, np.asarray(values).reshape(dst.shape), psum_state)


def _engine(choice: engine, allowed: tuple[engine, ...], default: engine, instruction: str) -> engine:
    chosen = default if choice in (engine.unknown, None) else choice
    if chosen not in allowed:
        names = ", ".join(_ENGINE_NAMES[e] for e in allowed)
        raise HardwareRuleError(f"{instruction}: cannot run on {chosen.name} engine on NeuronCore-v2; use {names}")
    return chosen


def _no_psum_on_gpsimd(chosen: engine, tiles, instruction: str) -> None:
    if chosen is engine.gpsimd and any(t.buffer == "psum" for t in tiles):
        raise HardwareRuleError(f"{instruction}: GpSimd cannot access PSUM; use the Vector engine")


def _record_elementwise(chosen: engine, instruction: str, dst: Tensor, tensor_inputs: int) -> None:
    cycles = cost.elementwise_cycles(dst.free_size, tensor_inputs)
    current_machine().stats.record(_ENGINE_NAMES[chosen], instruction, dst.partitions * dst.free_size, cycles)


# Data movement ---------------------------------------------------------------------------------------------


def dma_copy(
    dst, src, dst_rmw_op=None, oob_mode=oob_mode.error, dge_mode=dge_mode.unknown, unique_indices=True, name=None
):
    """``dst = src`` (or ``dst = dst + src`` with ``dst_rmw_op=nl.add``) between HBM and SBUF, casting via fp32.

    Indirect (gather/scatter) accesses come from ``.ap(vector_offset=...)`` on either side.
    """
    instruction = "dma_copy"
    dst, src = _tensor(dst, instruction, "dst"), _tensor(src, instruction, "src")
    for role, tile in (("src", src), ("dst", dst)):
        if tile.buffer == "psum":
            raise HardwareRuleError(
                f"dma_copy: {role} {tile.name!r} is in PSUM, which DMA cannot access; "
                "copy it to SBUF with nisa.tensor_copy (or activation) first"
            )
    count = math.prod(src.shape)
    if count != math.prod(dst.shape):
        raise HardwareRuleError(f"dma_copy: src has {count} elements but dst has {math.prod(dst.shape)}")
    indirect = src.indirect is not None or dst.indirect is not None
    if indirect and dge_mode not in (_DgeMode.unknown, _DgeMode.swdge):
        raise HardwareRuleError("dma_copy: indirect access on NeuronCore-v2 needs software DGE (dge_mode.swdge)")
    skip = oob_mode is _OobMode.skip
    if dst_rmw_op is not None:
        if dst_rmw_op is not ops.add:
            raise HardwareRuleError(f"dma_copy: dst_rmw_op supports only nl.add, got {dst_rmw_op!r}")
        if skip and indirect:
            raise HardwareRuleError("dma_copy: with dst_rmw_op on an indirect access only oob_mode.error is allowed")
    machine = current_machine()
    if machine.execute:
        _move(dst, src, dst_rmw_op is not None, unique_indices, skip)
    sbuf_side = next((t.partitions for t in (dst, src) if t.buffer == "sbuf"), None)
    num_bytes = count * max(dtypes.itemsize(src.dtype), dtypes.itemsize(dst.dtype)) * (2 if dst_rmw_op else 1)
    kind = "dma_scatter_add" if dst_rmw_op is not None else "dma_indirect" if indirect else "dma_copy"
    machine.stats.record("DMA", kind, num_bytes, seconds=cost.dma_seconds(num_bytes, sbuf_side))


# nki.isa.dma_copy (SDK 2.28 stub): "When sw_dge is selected, nisa.dma_copy can also perform a gather or
# scatter operation, using a list of **unique** dynamic indices from SBUF."
UNIQUE_SCATTER_RULE = (
    "software-DGE scatter takes a list of unique dynamic indices (nki.isa.dma_copy docstring, SDK 2.28 stub "
    "nki/api/nki/isa/__init__.py: 'perform a gather or scatter operation, using a list of **unique** dynamic "
    "indices'); unique_indices=False does not lift this: combine the duplicate rows on chip first and send "
    "the later ones out of bounds with oob_mode=nisa.oob_mode.skip"
)


def _move(dst: Tensor, src: Tensor, accumulate: bool, unique_indices: bool, skip: bool) -> None:
    """Element i of src (C order) to element i of dst; with ``skip``, pairs with an out-of-bounds side are dropped.

    A scatter (indirect ``dst``) whose transferred elements repeat a destination is refused
    (:data:`UNIQUE_SCATTER_RULE`).
    """
    src_index, src_valid = src.element_indices(oob_skip=skip)
    dst_index, dst_valid = dst.element_indices(oob_skip=skip)
    src_index, dst_index = src_index.reshape(-1), dst_index.reshape(-1)
    keep = np.ones(len(src_index), dtype=bool)
    for valid in (src_valid, dst_valid):
        if valid is not None:
            keep &= valid.reshape(-1)
    targets, inverse = np.unique(dst_index[keep], return_inverse=True)
    if dst.indirect is not None and len(targets) != int(keep.sum()):
        row_size = math.prod(dst.indirect[3][1:])
        repeated_rows = np.unique(targets[np.bincount(inverse) > 1] // row_size)
        raise HardwareRuleError(
            f"dma_copy: the scatter writes rows {repeated_rows[:8].tolist()} more than once: {UNIQUE_SCATTER_RULE}"
        )
    values = load_elements(src.allocation, src_index[keep])
    if not accumulate:
        store_elements(dst.allocation, dst_index[keep], values)
        return
    if unique_indices and len(targets) != int(keep.sum()):
        raise HardwareRuleError("dma_copy: destination elements repeat but unique_indices=True")
    sums = np.zeros(len(targets), dtype=np.float32)
    np.add.at(sums, inverse, values.astype(np.float32))
    store_elements(dst.allocation, targets, load_elements(dst.allocation, targets) + sums)


def tensor_copy(dst, src, engine=engine.unknown, name=None):
    """Copy between on-chip tiles (bit-exact for equal dtypes, else through fp32) on VectorE or GpSimd."""
    instruction = "tensor_copy"
    dst, src = _on_chip(dst, instruction, "dst"), _on_chip(src, instruction, "src")
    _same_layout(dst, src, instruction, "dst and src")
    if engine is _Engine.scalar:
        raise HardwareRuleError("tensor_copy: not supported on ScalarE on NeuronCore-v2; use activation(op=nl.copy)")
    chosen = _engine(engine, (_Engine.vector, _Engine.gpsimd), _Engine.vector, instruction)
    _no_psum_on_gpsimd(chosen, (dst, src), instruction)
    if current_machine().execute:
        _store(dst, _values(src))
    _record_elementwise(chosen, instruction, dst, 1)


def memset(dst, value, engine=engine.unknown, name=None):
    """Fill an on-chip tile with a compile-time constant (VectorE or GpSimd)."""
    instruction = "memset"
    dst = _on_chip(dst, instruction, "dst")
    chosen = _engine(engine, (_Engine.vector, _Engine.gpsimd), _Engine.vector, instruction)
    _no_psum_on_gpsimd(chosen, (dst,), instruction)
    if current_machine().execute:
        _store(dst, np.full(dst.shape, value))
    _record_elementwise(chosen, instruction, dst, 1)


# TensorE ---------------------------------------------------------------------------------------------------


def _check_psum_bank(dst: Tensor, instruction: str) -> None:
    row = dst.allocation.row_size
    width = dtypes.itemsize(dst.dtype)
    first = (dst.offset % row) * width
    last = first + dst.free_extent * width + width - 1
    if first // PSUM_BANK_BYTES != last // PSUM_BANK_BYTES:
        raise HardwareRuleError(f"{instruction}: dst must lie within one 2 KiB PSUM bank per partition")


def nc_matmul(
    dst,
    stationary,
    moving,
    is_stationary_onezero=False,
    is_moving_onezero=False,
    is_transpose=False,
    tile_position=(),
    tile_size=(),
    perf_mode=matmul_perf_mode.none,
    name=None,
):
    """``dst = stationary.T @ moving`` on TensorE, contracting over the partition dimension.

    The first matmul into a PSUM location overwrites it, later ones accumulate (an accumulation group);
    accumulating onto PSUM values written by another engine is undefined on NeuronCore-v2 and rejected.
    """
    instruction = "nc_matmul"
    dst = _on_chip(dst, instruction, "dst", allowed=("psum",))
    stationary = _on_chip(stationary, instruction, "stationary", allowed=("sbuf",))
    moving = _on_chip(moving, instruction, "moving", allowed=("sbuf",))
    if perf_mode not in (matmul_perf_mode.none, None):
        raise HardwareRuleError("nc_matmul: performance modes need NeuronCore-v3 or newer")
    contraction, m, n = stationary.partitions, stationary.free_size, moving.free_size
    rows, columns = tile_size if tile_size else (PARTITIONS, PARTITIONS)
    if moving.partitions != contraction:
        raise HardwareRuleError(
            f"nc_matmul: stationary and moving must have the same partition (contraction) size, got "
            f"{contraction} and {moving.partitions}"
        )
    if contraction > rows:
        raise HardwareRuleError(f"nc_matmul: contraction over {contraction} partitions exceeds {rows}")
    if m > columns:
        raise HardwareRuleError(f"nc_matmul: stationary free size {m} exceeds {columns} (gemm_stationary_fmax)")
    if n > 512:
        raise HardwareRuleError(f"nc_matmul: moving free size {n} exceeds 512 (gemm_moving_fmax, one PSUM bank)")
    if (dst.partitions, dst.free_size) != (m, n):
        raise HardwareRuleError(f"nc_matmul: dst must be [{m}, {n}] (stationary free x moving free), got {dst.shape}")
    if dst.dtype != "float32":
        raise HardwareRuleError(f"nc_matmul: dst must be float32 on NeuronCore-v2, got {dst.dtype}")
    wide = {"float32", "tfloat32"}
    if (stationary.dtype in wide) != (moving.dtype in wide):
        raise HardwareRuleError("nc_matmul: a float32/tfloat32 operand needs the other operand float32/tfloat32 too")
    if not (dtypes.is_float(stationary.dtype) and dtypes.is_float(moving.dtype)):
        raise HardwareRuleError("nc_matmul: operands must be floating point")
    _check_psum_bank(dst, instruction)
    index, _ = dst.element_indices()
    states = dst.allocation.psum_state[index]
    if (states == PSUM_ENGINE).any():
        raise HardwareRuleError(
            "nc_matmul: dst holds values written by another engine (memset/copy); accumulating onto them is "
            "undefined on NeuronCore-v2: allocate a fresh PSUM tile for the accumulation group"
        )
    accumulate = bool((states == PSUM_MATMUL).all())
    if not accumulate and not (states == PSUM_FRESH).all():
        raise HardwareRuleError("nc_matmul: dst mixes fresh and accumulating PSUM elements")
    machine = current_machine()
    if machine.execute:
        for flag, role, tile in (
            (is_stationary_onezero, "stationary", stationary),
            (is_moving_onezero, "moving", moving),
        ):
            if flag and not np.isin(_values(tile), (0.0, 1.0)).all():
                raise HardwareRuleError(f"nc_matmul: is_{role}_onezero=True but the {role} holds values other than 0/1")
        product = _values(stationary).T @ _values(moving)
        if accumulate:
            product = product + _values(dst)
        _store(dst, product, PSUM_MATMUL)
    else:
        dst.allocation.psum_state[index] = PSUM_MATMUL
    fp32 = "float32" in (stationary.dtype, moving.dtype)
    machine.stats.record("TensorE", instruction, m * n, cost.matmul_cycles(n, fp32))
    machine.stats.matmul_flops += 2 * contraction * m * n


def nc_transpose(dst, data, engine=engine.unknown, name=None):
    """Swap partition and (flattened) free axes: TensorE (<= 128x128, SBUF -> PSUM) or VectorE (<= 32x32)."""
    instruction = "nc_transpose"
    data = _on_chip(data, instruction, "data")
    dst = _on_chip(dst, instruction, "dst")
    default = _Engine.tensor if (data.buffer, dst.buffer) == ("sbuf", "psum") else _Engine.vector
    chosen = _engine(engine, (_Engine.tensor, _Engine.vector), default, instruction)
    if (dst.partitions, dst.free_size) != (data.free_size, data.partitions):
        raise HardwareRuleError(f"nc_transpose: dst must be [{data.free_size}, {data.partitions}], got {dst.shape}")
    if dst.dtype != data.dtype:
        raise HardwareRuleError(f"nc_transpose: dst dtype {dst.dtype} must equal data dtype {data.dtype}")
    limit = PARTITIONS if chosen is _Engine.tensor else 32
    if data.partitions > limit or data.free_size > limit:
        raise HardwareRuleError(
            f"nc_transpose: {chosen.name} engine transposes at most {limit}x{limit}, got {data.shape}"
        )
    if chosen is _Engine.tensor:
        if (data.buffer, dst.buffer) != ("sbuf", "psum"):
            raise HardwareRuleError("nc_transpose: the Tensor engine reads SBUF and writes PSUM")
        _check_psum_bank(dst, instruction)
    machine = current_machine()
    if machine.execute:
        _store(dst, _values(data).T)
    elif dst.buffer == "psum":
        dst.allocation.psum_state[dst.element_indices()[0]] = PSUM_ENGINE
    if chosen is _Engine.tensor:
        cycles = cost.matmul_cycles(data.partitions, data.dtype == "float32")
        machine.stats.record("TensorE", instruction, data.partitions * data.free_size, cycles)
    else:
        _record_elementwise(chosen, instruction, dst, 1)


# VectorE / ScalarE / GpSimd ----------------------------------------------------------------------------------


def _apply(op: ops.Operator, lhs, rhs, reverse: bool):
    return op.binary(rhs, lhs) if reverse else op.binary(lhs, rhs)


def _check_alu_dtypes(op: ops.Operator, tiles, instruction: str) -> None:
    if op.bitvec and any(dtypes.is_float(t.dtype) for t in tiles):
        raise HardwareRuleError(f"{instruction}: bitvec operator {op!r} needs integer tiles")


def tensor_tensor(dst, data1, data2, op, engine=engine.unknown, name=None):
    """``dst = op(data1, data2)`` element-wise in fp32 (VectorE; ``nl.power`` runs on GpSimd)."""
    instruction = "tensor_tensor"
    dst = _on_chip(dst, instruction, "dst")
    data1, data2 = _on_chip(data1, instruction, "data1"), _on_chip(data2, instruction, "data2")
    op = _operator(op, instruction, "op", "binary")
    _same_layout(data1, data2, instruction, "data1 and data2")
    _same_layout(dst, data1, instruction, "dst and the inputs")
    _not_both_psum(data1, data2, instruction)
    _check_alu_dtypes(op, (dst, data1, data2), instruction)
    default = _Engine.gpsimd if op is ops.power else _Engine.vector
    chosen = _engine(engine, (_Engine.vector, _Engine.gpsimd), default, instruction)
    _no_psum_on_gpsimd(chosen, (dst, data1, data2), instruction)
    if current_machine().execute:
        _store(dst, op.binary(_values(data1), _values(data2)))
    _record_elementwise(chosen, instruction, dst, 2)


def tensor_scalar(
    dst, data, op0, operand0, reverse0=False, op1=None, operand1=None, reverse1=False, engine=engine.unknown, name=None
):
    """``dst = (data op0 operand0) op1 operand1``; operands are numbers or [partitions, 1] fp32 tiles."""
    instruction = "tensor_scalar"
    dst, data = _on_chip(dst, instruction, "dst"), _on_chip(data, instruction, "data")
    _same_layout(dst, data, instruction, "dst and data")
    op0 = _operator(op0, instruction, "op0", "binary")
    if (op1 is None) != (operand1 is None):
        raise NkiInterpreterError("tensor_scalar: give op1 and operand1 together, or neither")
    operand0 = _scalar_operand(operand0, data, instruction, "operand0")
    stages = [(op0, operand0, reverse0)]
    if op1 is not None:
        stages.append(
            (
                _operator(op1, instruction, "op1", "binary"),
                _scalar_operand(operand1, data, instruction, "operand1"),
                reverse1,
            )
        )
    for op, operand, _ in stages:
        _check_alu_dtypes(op, (dst, data), instruction)
        if isinstance(operand, Tensor) and not op.bitvec and operand.dtype != "float32":
            raise HardwareRuleError(f"tensor_scalar: arithmetic operand tiles must be float32, got {operand.dtype}")
    if op0.bitvec != stages[-1][0].bitvec:
        raise HardwareRuleError("tensor_scalar: op0 and op1 must both be arithmetic or both bitvec")
    chosen = _engine(engine, (_Engine.vector, _Engine.scalar, _Engine.gpsimd), _Engine.vector, instruction)
    if chosen is _Engine.gpsimd and op0 is not ops.rsqrt:
        raise HardwareRuleError("tensor_scalar: GpSimd runs only rsqrt; use the Vector or Scalar engine")
    machine = current_machine()
    if machine.execute:
        result = _values(data)
        for op, operand, reverse in stages:
            result = _apply(op, result, _column(operand, machine), reverse)
        _store(dst, result)
    _record_elementwise(chosen, instruction, dst, 1)


def activation(
    dst, op, data, bias=None, scale=1.0, reduce_op=None, reduce_res=None, reduce_cmd=reduce_cmd.idle, name=None
):
    """ScalarE ``dst = op(data * scale + bias)``, optionally summing each partition into the reduce registers.

    Register semantics follow the stub's prose: ``reset`` zeroes them, ``reduce`` adds this instruction's
    row sums, ``reset_reduce`` does both, ``idle`` leaves them; ``reduce_res`` receives their value. (The
    stub's pseudo-code adds the registers twice for ``reduce``; its prose and ``activation_reduce`` do not.)
    """
    instruction = "activation"
    dst, data = _on_chip(dst, instruction, "dst"), _on_chip(data, instruction, "data")
    _same_layout(dst, data, instruction, "dst and data")
    op = _operator(op, instruction, "op", "unary")
    scale = _scalar_operand(scale, data, instruction, "scale")
    if isinstance(scale, Tensor) and scale.dtype != "float32":
        raise HardwareRuleError("activation: a scale tile must be float32")
    if bias is not None:
        if isinstance(bias, Number):
            raise HardwareRuleError("activation: on NeuronCore-v2 bias must be a [partitions, 1] tile, not a number")
        bias = _scalar_operand(bias, data, instruction, "bias")
    if reduce_op is not None and reduce_op is not ops.add:
        raise HardwareRuleError(f"activation: reduce_op must be nl.add on NeuronCore-v2, got {reduce_op!r}")
    if reduce_cmd in (_ReduceCmd.reduce, _ReduceCmd.reset_reduce) and reduce_op is None:
        raise NkiInterpreterError(f"activation: reduce_cmd={reduce_cmd.name} needs reduce_op=nl.add")
    if reduce_cmd is _ReduceCmd.load_reduce:
        raise NkiInterpreterError("activation: reduce_cmd.load_reduce is not modelled")
    if reduce_res is not None:
        reduce_res = _on_chip(reduce_res, instruction, "reduce_res")
        if reduce_res.partitions != data.partitions or reduce_res.free_size != 1:
            raise HardwareRuleError(f"activation: reduce_res must be [{data.partitions}, 1], got {reduce_res.shape}")
    machine = current_machine()
    if machine.execute:
        pre = _values(data) * _column(scale, machine)
        if bias is not None:
            pre = pre + _column(bias, machine)
        if op.valid_range is not None and pre.size:
            low, high = op.valid_range
            magnitude = np.abs(pre)
            if (magnitude < low).any() or (magnitude > high).any():
                raise HardwareRuleError(
                    f"activation: {op!r} input outside its valid range [{low:g}, {high:g}]; "
                    "ScalarE output would be invalid"
                )
        result = op.unary(pre).astype(np.float32)
        _store(dst, result)
        registers = machine.activation_accumulators[: data.partitions]
        if reduce_cmd in (_ReduceCmd.reset, _ReduceCmd.reset_reduce):
            registers[:] = 0.0
        if reduce_cmd in (_ReduceCmd.reduce, _ReduceCmd.reset_reduce):
            registers += result.sum(axis=1, dtype=np.float32)
        if reduce_res is not None:
            _store(reduce_res, registers.reshape(-1, 1))
    machine.stats.record("ScalarE", instruction, dst.partitions * dst.free_size, cost.elementwise_cycles(dst.free_size))
    if reduce_res is not None:
        machine.stats.record("ScalarE", "activation_reduce_readout", data.partitions, cost.STATIC_OVERHEAD_CYCLES)


def tensor_tensor_scan(dst, data0, data1, initial, op0, op1, reverse0=False, reverse1=False, name=None):
    """Per partition ``r[i] = op1(op0(data0[i], r[i-1]), data1[i])`` along the free axis, ``r[-1] = initial``."""
    instruction = "tensor_tensor_scan"
    dst = _on_chip(dst, instruction, "dst")
    data0, data1 = _on_chip(data0, instruction, "data0"), _on_chip(data1, instruction, "data1")
    _same_layout(data0, data1, instruction, "data0 and data1")
    _same_layout(dst, data0, instruction, "dst and the inputs")
    _not_both_psum(data0, data1, instruction)
    op0, op1 = _operator(op0, instruction, "op0", "binary"), _operator(op1, instruction, "op1", "binary")
    initial = _scalar_operand(initial, data0, instruction, "initial")
    machine = current_machine()
    if machine.execute:
        first, second = _values(data0), _values(data1)
        previous = np.broadcast_to(np.asarray(_column(initial, machine), dtype=np.float32), (data0.partitions, 1))
        result = np.empty_like(first)
        for i in range(first.shape[1]):
            combined = _apply(op0, first[:, i : i + 1], previous, reverse0)
            previous = _apply(op1, combined, second[:, i : i + 1], reverse1).astype(np.float32)
            result[:, i : i + 1] = previous
        _store(dst, result)
    _record_elementwise(_Engine.vector, instruction, dst, 2)


def _affine_values(dst: Tensor, pattern, offset: int, channel_multiplier: int, instruction: str) -> np.ndarray:
    """int64 [partitions, free]: offset + partition * channel_multiplier + Σ index_d * step_d."""
    pattern = [(int(step), int(num)) for step, num in pattern]
    if not 1 <= len(pattern) <= 4:
        raise HardwareRuleError(f"{instruction}: pattern has {len(pattern)} dimensions; give 1 to 4 [step, num] pairs")
    if math.prod(num for _, num in pattern) != dst.free_size:
        raise HardwareRuleError(
            f"{instruction}: pattern {pattern} covers {math.prod(n for _, n in pattern)} elements per partition but "
            f"dst has {dst.free_size}"
        )
    values = np.zeros([num for _, num in pattern], dtype=np.int64)
    for dim, (step, num) in enumerate(pattern):
        axis_shape = [1] * len(pattern)
        axis_shape[dim] = num
        values = values + (np.arange(num, dtype=np.int64) * step).reshape(axis_shape)
    channels = np.arange(dst.partitions, dtype=np.int64).reshape(-1, 1) * int(channel_multiplier)
    return int(offset) + channels + values.reshape(1, -1)


def iota(dst, pattern, offset, channel_multiplier=0, name=None):
    """GpSimd: ``dst[p, i] = offset + p * channel_multiplier + affine(pattern, i)`` in int32, cast to dst."""
    instruction = "iota"
    dst = _on_chip(dst, instruction, "dst", allowed=("sbuf",))
    values = _affine_values(dst, pattern, offset, channel_multiplier, instruction)
    if current_machine().execute:
        _store(dst, values.astype(np.int32))
    _record_elementwise(_Engine.gpsimd, instruction, dst, 1)


def affine_select(dst, pattern, offset, channel_multiplier, on_true_tile, on_false_value, cmp_op=ops.equal, name=None):
    """GpSimd: ``dst = on_true_tile`` where ``cmp_op(affine value, 0)`` holds, else ``on_false_value``."""
    instruction = "affine_select"
    dst = _on_chip(dst, instruction, "dst", allowed=("sbuf",))
    on_true = _on_chip(on_true_tile, instruction, "on_true_tile", allowed=("sbuf",))
    _same_layout(dst, on_true, instruction, "dst and on_true_tile")
    cmp_op = _operator(cmp_op, instruction, "cmp_op", "binary")
    values = _affine_values(dst, pattern, offset, channel_multiplier, instruction)
    if current_machine().execute:
        predicate = cmp_op.binary(values, 0) != 0
        _store(dst, np.where(predicate, _values(on_true), np.float32(on_false_value)))
    _record_elementwise(_Engine.gpsimd, instruction, dst, 1)
