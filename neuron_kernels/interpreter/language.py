"""Stand-in for ``nki.language`` (NKI 2.28 API): dtypes, buffers, tensor creation, operators, loop ranges.

Only what the project's kernels and the ISA stand-in need. Operators (``nl.add``, ``nl.exp``, ...) are
identifiers passed as ``op=`` to ``nki.isa`` instructions; as in the 2.28 API stub, calling them as
tile-level functions is unsupported, so calling one raises an error that says so. Loops are unrolled at
trace time in this API generation (NKI language guide), so the range hints are plain Python ranges.
"""

from __future__ import annotations

from neuron_kernels.interpreter import isa as _isa
from neuron_kernels.interpreter.memory import Allocation, Tensor
from neuron_kernels.interpreter.operators import *  # noqa: F403  (nl.add, nl.exp, ... live there)

bool_ = "bool"
int8, int16, int32 = "int8", "int16", "int32"
uint8, uint16, uint32 = "uint8", "uint16", "uint32"
float16, bfloat16, tfloat32, float32 = "float16", "bfloat16", "tfloat32", "float32"
float8_e4m3, float8_e5m2 = "float8_e4m3", "float8_e5m2"

sbuf, psum = "sbuf", "psum"
hbm, shared_hbm, private_hbm = "hbm", "shared_hbm", "private_hbm"


class tile_size:  # noqa: N801  (the NKI name)
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


def affine_range(start, stop=None, step=1) -> range:
    return range(start, stop, step) if stop is not None else range(start)


def sequential_range(start, stop=None, step=1) -> range:
    return range(start, stop, step) if stop is not None else range(start)


def static_range(start, stop=None, step=1) -> range:
    return range(start, stop, step) if stop is not None else range(start)
