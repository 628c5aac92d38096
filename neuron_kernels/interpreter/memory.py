"""Memories, allocations and tensor views of the interpreter (NeuronCore-v2, trn1).

A :class:`Machine` is the state of one kernel run: the live SBUF and PSUM allocations (checked against the
NeuronCore-v2 capacities), the instruction statistics, and whether instructions compute or only count.
Every ``nl.ndarray`` is an :class:`Allocation` (a flat NumPy array plus a written-mask, NaN-filled when
new, like the official simulator) seen through :class:`Tensor` views: an offset, a shape and element
strides, optionally with an indirect (``vector_offset`` / ``scalar_offset``) dimension.

An allocation's space is released when the last view of it is dropped, so the live set follows the
kernel's Python scopes: tiles allocated inside a loop body or helper function are freed when it moves on.
Capacities per NeuronCore-v2 (NKI "Trainium/Inferentia2 Architecture" guide): SBUF 24 MiB = 128
partitions x 192 KiB; PSUM 2 MiB = 128 partitions x 16 KiB in 8 banks of 2 KiB, each allocation starting
at a bank boundary.
"""

from __future__ import annotations

import math
import weakref

import numpy as np

from neuron_kernels.interpreter import dtypes
from neuron_kernels.interpreter.cost import Stats
from neuron_kernels.interpreter.errors import (
    CapacityError,
    HardwareRuleError,
    NkiInterpreterError,
    OutOfBoundsError,
    UninitializedReadError,
)

PARTITIONS = 128
SBUF_BYTES_PER_PARTITION = 192 * 1024
PSUM_BANK_BYTES = 2 * 1024
PSUM_BANKS = 8
ON_CHIP = ("sbuf", "psum")
HBM = ("hbm", "shared_hbm", "private_hbm")

# PSUM element states, for the matmul accumulation rule: the first matmul into a location overwrites it,
# later ones accumulate; accumulating onto values another engine wrote is undefined on NeuronCore-v2.
PSUM_FRESH, PSUM_MATMUL, PSUM_ENGINE = 0, 1, 2

_current: list[Machine] = []


def current_machine() -> Machine:
    if not _current:
        raise NkiInterpreterError(
            "no kernel is running: NKI tensors and instructions exist only inside a kernel run "
            "(call the @nki.jit kernel, or use neuron_kernels.interpreter.run_kernel / Machine())"
        )
    return _current[-1]


class Machine:
    """One NeuronCore-v2 during a kernel run; a context manager that makes itself current.

    execute=False traces the kernel: every rule is checked and every instruction counted, but no values
    are computed (for cost estimates of sizes too large to run in NumPy). ``loop_seed`` draws the order in
    which ``nl.affine_range`` runs its iterations.
    """

    def __init__(self, execute: bool = True, loop_seed: int = 0) -> None:
        self.execute = execute
        self.loop_order = np.random.default_rng(loop_seed)
        self.stats = Stats()
        self.sbuf_bytes = 0
        self.psum_banks = 0
        self.peak_sbuf_bytes = 0
        self.peak_psum_banks = 0
        self.activation_accumulators = np.zeros(PARTITIONS, dtype=np.float32)

    def __enter__(self) -> Machine:
        _current.append(self)
        return self

    def __exit__(self, *exc_info) -> None:
        _current.remove(self)

    def reserve(self, buffer: str, amount: int, name: str) -> None:
        if buffer == "sbuf":
            if self.sbuf_bytes + amount > SBUF_BYTES_PER_PARTITION:
                raise CapacityError(
                    f"SBUF overflow allocating {name!r}: {amount} B per partition on top of {self.sbuf_bytes} B "
                    f"live exceeds {SBUF_BYTES_PER_PARTITION} B per partition (24 MiB); tile smaller or free "
                    "tiles earlier (allocate them inside the loop body or helper that uses them)"
                )
            self.sbuf_bytes += amount
            self.peak_sbuf_bytes = max(self.peak_sbuf_bytes, self.sbuf_bytes)
        elif buffer == "psum":
            if self.psum_banks + amount > PSUM_BANKS:
                raise CapacityError(
                    f"PSUM overflow allocating {name!r}: {amount} bank(s) on top of {self.psum_banks} live exceeds "
                    f"the {PSUM_BANKS} banks of 2 KiB per partition; copy results to SBUF and drop PSUM tiles sooner"
                )
            self.psum_banks += amount
            self.peak_psum_banks = max(self.peak_psum_banks, self.psum_banks)

    def release(self, buffer: str, amount: int) -> None:
        if buffer == "sbuf":
            self.sbuf_bytes -= amount
        elif buffer == "psum":
            self.psum_banks -= amount


class Allocation:
    """The storage of one ``nl.ndarray``: a flat array, a written-mask and (PSUM) accumulation states."""

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: str,
        buffer: str,
        name: str = "",
        host_values: np.ndarray | None = None,
        read_only: bool = False,
    ) -> None:
        machine = current_machine()
        self.shape = tuple(int(d) for d in shape)
        self.dtype = dtypes.check_dtype(dtype)
        self.buffer = buffer
        self.name = name or f"{buffer}_tensor"
        self.read_only = read_only
        self.size = math.prod(self.shape)
        if buffer not in ON_CHIP + HBM:
            raise NkiInterpreterError(f"unknown buffer {buffer!r}; use nl.sbuf, nl.psum, nl.hbm or nl.shared_hbm")
        if any(d <= 0 for d in self.shape) or not self.shape:
            raise NkiInterpreterError(f"tensor {self.name!r} needs a non-empty shape of positive sizes, got {shape}")
        if buffer in ON_CHIP:
            self._check_on_chip_shape()
        self.data: np.ndarray | None = None
        self.written = np.zeros(0, dtype=bool)
        if machine.execute:
            if host_values is not None:
                self.data = dtypes.round_to(host_values.reshape(-1), self.dtype)
                self.written = np.ones(self.size, dtype=bool)
            else:
                fill = np.nan if dtypes.is_float(self.dtype) else 0
                self.data = np.full(self.size, fill, dtype=dtypes.storage_dtype(self.dtype))
                self.written = np.zeros(self.size, dtype=bool)
        self.psum_state = np.zeros(self.size if buffer == "psum" else 0, dtype=np.int8)
        amount = self._footprint()
        machine.reserve(buffer, amount, self.name)
        weakref.finalize(self, machine.release, buffer, amount)

    @property
    def row_size(self) -> int:
        """Elements per partition (on-chip) or per leading index (HBM)."""
        return math.prod(self.shape[1:])

    def _check_on_chip_shape(self) -> None:
        if len(self.shape) < 2:
            raise HardwareRuleError(
                f"on-chip tensor {self.name!r} has shape {self.shape}: SBUF/PSUM tiles are [partition, free...]; "
                "give it at least two dimensions"
            )
        if self.shape[0] > PARTITIONS:
            raise HardwareRuleError(
                f"tile {self.name!r} has {self.shape[0]} partitions; the partition dimension (dim 0) of an SBUF/PSUM "
                f"tile is at most {PARTITIONS}: split it into tiles of <= {PARTITIONS} rows"
            )
        if self.buffer == "psum" and self.row_size * dtypes.itemsize(self.dtype) > PSUM_BANKS * PSUM_BANK_BYTES:
            raise CapacityError(f"PSUM tile {self.name!r} needs more than the 16 KiB of a PSUM partition")

    def _footprint(self) -> int:
        bytes_per_partition = self.row_size * dtypes.itemsize(self.dtype)
        if self.buffer == "sbuf":
            return bytes_per_partition
        if self.buffer == "psum":
            return math.ceil(bytes_per_partition / PSUM_BANK_BYTES)
        return 0

    def view(self) -> Tensor:
        strides = tuple(math.prod(self.shape[i + 1 :]) for i in range(len(self.shape)))
        return Tensor(self, 0, self.shape, strides)


class Tensor:
    """A view of an allocation: flat element ``offset``, ``shape`` and element ``strides``.

    ``indirect`` holds (index view, indirect dim, kind, shape of the tensor .ap() was called on) for
    ``.ap(vector_offset=...)`` and ``.ap(scalar_offset=...)`` accesses, whose addresses are known only when
    the instruction runs; indices count in rows of that tensor and must lie inside it.
    """

    def __init__(self, allocation, offset, shape, strides, indirect=None) -> None:
        self.allocation = allocation
        self.offset = int(offset)
        self.shape = tuple(int(d) for d in shape)
        self.strides = tuple(int(s) for s in strides)
        self.indirect = indirect

    @property
    def dtype(self) -> str:
        return self.allocation.dtype

    @property
    def buffer(self) -> str:
        return self.allocation.buffer

    @property
    def name(self) -> str:
        return self.allocation.name

    @property
    def on_chip(self) -> bool:
        return self.allocation.buffer in ON_CHIP

    @property
    def partitions(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def free_size(self) -> int:
        """Elements per partition of an on-chip view (all elements after dim 0)."""
        return math.prod(self.shape[1:])

    @property
    def free_extent(self) -> int:
        """Distance in elements from the first to the last element of a partition row of this view."""
        return sum((size - 1) * stride for size, stride in zip(self.shape[1:], self.strides[1:], strict=True))

    def __repr__(self) -> str:
        return f"Tensor({self.name!r}, {self.buffer}, {self.dtype}, shape={self.shape})"

    # Indexing -------------------------------------------------------------------------------------------

    def __getitem__(self, key) -> Tensor:
        if self.indirect is not None:
            raise NkiInterpreterError(f"cannot index the indirect access {self!r}; index the tensor before .ap()")
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            at = key.index(Ellipsis)
            fill = len(self.shape) - (len(key) - 1)
            key = key[:at] + (slice(None),) * fill + key[at + 1 :]
        if len(key) > len(self.shape):
            raise NkiInterpreterError(f"too many indices ({len(key)}) for {self!r}")
        key = key + (slice(None),) * (len(self.shape) - len(key))
        offset, shape, strides = self.offset, [], []
        for dim, (k, size, stride) in enumerate(zip(key, self.shape, self.strides, strict=True)):
            if isinstance(k, slice):
                start, stop, step = k.indices(size)
                if step <= 0:
                    raise NkiInterpreterError(f"slice step must be positive, got {k.step} on dim {dim} of {self!r}")
                count = len(range(start, stop, step))
                if count == 0:
                    raise OutOfBoundsError(f"empty slice {k} on dim {dim} (size {size}) of {self!r}")
                offset += start * stride
                shape.append(count)
                strides.append(stride * step)
            else:
                index = int(k)
                if not -size <= index < size:
                    raise OutOfBoundsError(f"index {index} out of range for dim {dim} (size {size}) of {self!r}")
                offset += (index % size) * stride
        if not shape:
            shape, strides = [1], [1]
        return Tensor(self.allocation, offset, shape, strides)

    def reshape(self, shape) -> Tensor:
        """A view of the same (contiguous) elements with another shape."""
        shape = tuple(int(d) for d in shape)
        contiguous = self.strides == tuple(math.prod(self.shape[i + 1 :]) for i in range(len(self.shape)))
        if self.indirect is not None or not contiguous:
            raise NkiInterpreterError(f"reshape needs a contiguous view, {self!r} is strided")
        if math.prod(shape) > math.prod(self.shape):
            raise NkiInterpreterError(f"reshape of {self!r} to {shape} needs more memory than the tensor has")
        if self.on_chip and (not shape or shape[0] != self.shape[0]):
            raise NkiInterpreterError(f"reshape of on-chip {self!r} must keep the partition dimension {self.shape[0]}")
        strides = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
        return Tensor(self.allocation, self.offset, shape, strides)

    def ap(self, pattern, offset=0, scalar_offset=None, vector_offset=None, indirect_dim=0, dtype=None) -> Tensor:
        """Access pattern ``[[step, num], ...]`` from ``offset`` elements past this view's start (DESIGN §4).

        ``vector_offset`` (an SBUF [num_0, 1] int tile) replaces the index of dim 0 by a per-row index into
        dim 0 of this tensor; ``scalar_offset`` (an SBUF [1, 1] int tile) shifts the start by that many
        rows of ``indirect_dim`` of this tensor (NKI "Access Patterns" guide and migration guide).
        """
        if dtype is not None and dtype != self.dtype:
            raise NkiInterpreterError("the interpreter does not model reinterpreting dtypes in .ap(dtype=...)")
        if self.indirect is not None:
            raise NkiInterpreterError(f".ap() on an indirect access {self!r}")
        pattern = [(int(step), int(num)) for step, num in pattern]
        if not pattern or any(num <= 0 for _, num in pattern):
            raise NkiInterpreterError(f"access pattern {pattern} needs at least one [step, num] with num > 0")
        if scalar_offset is not None and vector_offset is not None:
            raise NkiInterpreterError("give at most one of scalar_offset and vector_offset")
        base = self.allocation
        if self.on_chip and len(pattern) > 1 and pattern[0][1] > 1 and pattern[0][0] != base.row_size:
            raise HardwareRuleError(
                f"on-chip access pattern {pattern} on {self!r}: the first [step, num] walks partitions, so its step "
                f"must equal the elements per partition ({base.row_size})"
            )
        indirect = None
        if vector_offset is not None:
            if indirect_dim != 0:
                raise HardwareRuleError("vector_offset supports only indirect_dim=0 (NKI migration guide)")
            indirect = (_index_tile(vector_offset, (pattern[0][1], 1), "vector_offset"), 0, "vector", self.shape)
        elif scalar_offset is not None:
            if not 0 <= indirect_dim < len(self.shape):
                raise NkiInterpreterError(f"indirect_dim {indirect_dim} is not a dimension of {self.shape}")
            indirect = (_index_tile(scalar_offset, (1, 1), "scalar_offset"), indirect_dim, "scalar", self.shape)
        shape = tuple(num for _, num in pattern)
        strides = tuple(step for step, _ in pattern)
        return Tensor(base, self.offset + int(offset), shape, strides, indirect)

    # Addresses ------------------------------------------------------------------------------------------

    def static_indices(self) -> np.ndarray:
        """Flat element indices of this view without its indirect part; shape ``self.shape``."""
        index = np.full(self.shape, self.offset, dtype=np.int64)
        for dim, (size, stride) in enumerate(zip(self.shape, self.strides, strict=True)):
            axis_shape = [1] * len(self.shape)
            axis_shape[dim] = size
            index = index + (np.arange(size, dtype=np.int64) * stride).reshape(axis_shape)
        return index

    def element_indices(self, oob_skip: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(flat indices, valid mask or None) of every element; raises on out-of-bounds unless ``oob_skip``."""
        base = self.allocation
        if self.indirect is None:
            index = self.static_indices()
            if index.min() < 0 or index.max() >= base.size:
                raise OutOfBoundsError(
                    f"access {self!r} (offset {self.offset}, strides {self.strides}) leaves its tensor"
                )
            return index, None
        index_view, dim, kind, indexed_shape = self.indirect
        rows = read(index_view).astype(np.int64).reshape(-1)
        row_stride = math.prod(indexed_shape[dim + 1 :])
        if kind == "vector":
            static = self.static_indices() - (np.arange(self.shape[0]) * self.strides[0]).reshape(
                (-1,) + (1,) * (len(self.shape) - 1)
            )
            index = static + (rows * row_stride).reshape((-1,) + (1,) * (len(self.shape) - 1))
            row_valid = (rows >= 0) & (rows < indexed_shape[0])
            valid = np.broadcast_to(row_valid.reshape((-1,) + (1,) * (len(self.shape) - 1)), self.shape)
        else:
            index = self.static_indices() + rows[0] * row_stride
            valid = np.full(self.shape, 0 <= rows[0] < indexed_shape[dim])
        valid = valid & (index >= 0) & (index < base.size)
        if not valid.all():
            if not oob_skip:
                bad = sorted(set(rows[~row_valid].tolist()))[:8] if kind == "vector" else rows.tolist()
                raise OutOfBoundsError(
                    f"indirect access into {base.name!r} (indexed as {indexed_shape}) is out of bounds for "
                    f"indices {bad}; fix the indices or pass oob_mode=nisa.oob_mode.skip"
                )
            return np.where(valid, index, 0), valid
        return index, None


def _index_tile(tile: Tensor, expected: tuple[int, int], what: str) -> Tensor:
    if not isinstance(tile, Tensor) or tile.buffer != "sbuf" or dtypes.is_float(tile.dtype):
        raise HardwareRuleError(f"{what} must be an integer SBUF tile, got {tile!r}")
    if tile.shape != expected:
        raise HardwareRuleError(f"{what} tile must have shape {expected}, got {tile.shape}")
    return tile


def load_elements(base: Allocation, index: np.ndarray) -> np.ndarray:
    """Values at flat ``index`` (float32 for float dtypes); raises if any of them was never written."""
    written = base.written[index]
    if not written.all():
        raise UninitializedReadError(
            f"read of {int((~written).sum())} never-written element(s) of {base.name!r} ({base.buffer}, "
            f"shape {base.shape}); write them first (new buffers hold NaN)"
        )
    values = base.data[index]
    return values.astype(np.float32) if dtypes.is_float(base.dtype) else values


def store_elements(base: Allocation, index: np.ndarray, values: np.ndarray, psum_state: int = PSUM_ENGINE) -> None:
    """Store ``values`` at flat ``index``, rounded to the allocation's dtype, and mark them written."""
    if base.read_only:
        raise NkiInterpreterError(
            f"kernel input {base.name!r} is read-only; allocate outputs with nl.ndarray(..., buffer=nl.shared_hbm)"
        )
    base.data[index] = dtypes.round_to(values, base.dtype)
    base.written[index] = True
    if base.buffer == "psum":
        base.psum_state[index] = psum_state


def read(view: Tensor) -> np.ndarray:
    """The view's values, shape ``view.shape``."""
    index, _ = view.element_indices()
    return load_elements(view.allocation, index)


def write(view: Tensor, values: np.ndarray, psum_state: int = PSUM_ENGINE) -> None:
    """Store ``values`` (broadcast to the view's shape) into the view."""
    index, _ = view.element_indices()
    store_elements(view.allocation, index, np.broadcast_to(np.asarray(values), view.shape), psum_state)
