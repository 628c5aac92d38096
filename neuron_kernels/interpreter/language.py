"""Stand-in for ``nki.language`` (NKI 2.28 API): dtypes, buffers, tensor creation, operators, loop ranges.

Only what the project's kernels and the ISA stand-in need. Operators (``nl.add``, ``nl.exp``, ...) are
identifiers passed as ``op=`` to ``nki.isa`` instructions; as in the 2.28 API stub, calling them as
tile-level functions is unsupported, so calling one raises an error that says so.

Loops (API entries of ``affine_range``, ``sequential_range``, ``static_range``): ``static_range`` is
unrolled, a plain range. ``affine_range`` and ``sequential_range`` stay loops in the compiled program, so
each runs as one device loop (:class:`~neuron_kernels.interpreter.cost.DeviceLoop`): its body is counted
once in the static instruction count and must be the same program every iteration. ``affine_range``
declares its iterations independent (associative reductions such as matmuls accumulating into one PSUM
tile aside), so the interpreter runs them in a permuted order drawn from the run's seed: a loop-carried
dependency there gives a wrong result instead of passing by luck. ``sequential_range`` runs in order.
"""

from __future__ import annotations

from neuron_kernels.interpreter import isa as _isa
from neuron_kernels.interpreter import operators as _operators
from neuron_kernels.interpreter.memory import Allocation, Tensor, current_machine
from neuron_kernels.interpreter.operators import *  # noqa: F403  (nl.add, nl.exp, ... live there)

# The names this module offers as ``nl.*``; tests/test_nki_stub_conformance.py holds them against the SDK stubs.
__all__ = [name for name in _operators.__all__ if name != "Operator"] + [
    "NKIObject",
    "affine_range",
    "bfloat16",
    "bool_",
    "float16",
    "float32",
    "float8_e4m3",
    "float8_e5m2",
    "hbm",
    "int8",
    "int16",
    "int32",
    "ndarray",
    "private_hbm",
    "psum",
    "sbuf",
    "sequential_range",
    "shared_hbm",
    "static_range",
    "tfloat32",
    "tile_size",
    "uint8",
    "uint16",
    "uint32",
    "zeros",
]

bool_ = "bool"
int8, int16, int32 = "int8", "int16", "int32"
uint8, uint16, uint32 = "uint8", "uint16", "uint32"
float16, bfloat16, tfloat32, float32 = "float16", "bfloat16", "tfloat32", "float32"
float8_e4m3, float8_e5m2 = "float8_e4m3", "float8_e5m2"

sbuf, psum = "sbuf", "psum"
hbm, shared_hbm, private_hbm = "hbm", "shared_hbm", "private_hbm"


class NKIObject:
    """Base of every class a kernel uses (NKI Language Guide, "Class Support"); the front end checks it."""


class tile_size(NKIObject):  # noqa: N801  (the NKI name)
    """Tile-size constants of NeuronCore-v2."""

    pmax = 128
    psum_fmax = 2048
    gemm_stationary_fmax = 128
    gemm_moving_fmax = 512
    bn_stats_fmax = 512
    psum_min_align = 4
    sbuf_min_align = 1
    total_available_sbuf_size = 24 * 2**20


def ndarray(shape, dtype, buffer=None, name="") -> Tensor:
    """A new tensor on ``buffer`` (default SBUF); its elements hold NaN until written."""
    return Allocation(tuple(shape), dtype, buffer or sbuf, name).view()


def zeros(shape, dtype, buffer=None, name="") -> Tensor:
    """A new tensor filled with zeros (a ``memset`` on chip, counted as one)."""
    tensor = ndarray(shape, dtype, buffer, name)
    _isa.memset(dst=tensor, value=0)
    return tensor


def affine_range(start, stop=None, step=1):
    """A device loop of independent iterations, run in a seeded permuted order (see the module docstring)."""
    return _DeviceRange("affine_range", range(start, stop, step) if stop is not None else range(start))


def sequential_range(start, stop, step):
    """A device loop whose iterations depend on each other, run in order (the stub has no defaults)."""
    return _DeviceRange("sequential_range", range(start, stop, step))


def static_range(start, stop=None, step=1) -> range:
    """A loop the compiler unrolls: every iteration's instructions are part of the program."""
    return range(start, stop, step) if stop is not None else range(start)


class _DeviceRange:
    """The iterable an ``affine_range``/``sequential_range`` call returns."""

    def __init__(self, kind: str, indices: range) -> None:
        self.kind, self.indices = kind, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        machine = current_machine()
        order = list(self.indices)
        if self.kind == "affine_range" and len(order) > 1:
            permuted = [order[i] for i in machine.loop_order.permutation(len(order))]
            # Never in program order, so a carried dependency always shows.
            order = permuted if permuted != order else order[1:] + order[:1]
        loop = machine.stats.begin_loop(self.kind)
        completed = False
        try:
            for index in order:
                machine.stats.begin_iteration(loop)
                yield index
            completed = True
        finally:
            # A body that raised (or broke out) leaves its last iteration unfinished: nothing to compare.
            machine.stats.end_loop(loop, check=completed)
