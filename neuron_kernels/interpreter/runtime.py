"""Stand-in for the top-level ``nki`` module: ``nki.jit`` and running a kernel on NumPy data.

A kernel is called with host arrays (NumPy, or :class:`TypedArray` for bfloat16), which become read-only
HBM tensors; Python numbers and None pass through as compile-time constants. The kernel must return the
``nl.shared_hbm`` tensors it allocated (NKI rule for outputs); they come back as NumPy arrays. Pass
:class:`ShapeOnly` inputs with ``execute=False`` to trace a kernel for its counts without computing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from neuron_kernels.interpreter import dtypes
from neuron_kernels.interpreter.cost import Stats
from neuron_kernels.interpreter.errors import NkiInterpreterError, UninitializedReadError
from neuron_kernels.interpreter.frontend import check_kernel
from neuron_kernels.interpreter.memory import Allocation, Machine, Tensor


@dataclass(frozen=True)
class ShapeOnly:
    """An input known only by shape and dtype, for ``execute=False`` runs."""

    shape: tuple[int, ...]
    dtype: str


@dataclass
class KernelRun:
    """Outputs (None when only traced), statistics and on-chip memory high-water marks of one run."""

    outputs: tuple | np.ndarray | None
    stats: Stats
    peak_sbuf_bytes_per_partition: int
    peak_psum_banks: int


class InterpretedKernel:
    """What ``@nki.jit`` returns under the interpreter: calling it runs the kernel and returns its outputs.

    Like the real compiler, which compiles a kernel when it is first called, the first run passes the kernel
    and every helper it reaches through the NKI language front end (:mod:`.frontend`); the module's helpers
    defined below the kernel exist by then.
    """

    def __init__(self, fn) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        return run_kernel(self, *args, **kwargs).outputs


def jit(func=None, mode="auto", **kwargs):
    """``@nki.jit`` / ``@nki.jit(...)`` (the SDK signature): ``mode`` and options mean nothing to the interpreter."""
    if func is None:
        return InterpretedKernel
    return InterpretedKernel(func)


def run_kernel(kernel, *args, execute: bool = True, loop_seed: int = 0, **kwargs) -> KernelRun:
    """Run ``kernel`` (an ``@nki.jit`` function or a plain one) on host data; see the module docstring.

    The kernel's source is checked against the NKI language first; ``loop_seed`` draws the order of every
    ``nl.affine_range`` loop's iterations.
    """
    fn = kernel.fn if isinstance(kernel, InterpretedKernel) else kernel
    check_kernel(fn)
    machine = Machine(execute, loop_seed)
    with machine:
        hbm_args = [_to_hbm(value, f"arg{i}", execute) for i, value in enumerate(args)]
        hbm_kwargs = {name: _to_hbm(value, name, execute) for name, value in kwargs.items()}
        result = fn(*hbm_args, **hbm_kwargs)
        outputs = (
            tuple(_from_hbm(t, execute) for t in result) if isinstance(result, tuple) else _from_hbm(result, execute)
        )
    return KernelRun(
        outputs=outputs if execute else None,
        stats=machine.stats,
        peak_sbuf_bytes_per_partition=machine.peak_sbuf_bytes,
        peak_psum_banks=machine.peak_psum_banks,
    )


def _to_hbm(value, name: str, execute: bool):
    if isinstance(value, ShapeOnly):
        if execute:
            raise NkiInterpreterError(f"input {name} is ShapeOnly; pass data, or run with execute=False")
        return Allocation(value.shape, value.dtype, "hbm", name, read_only=True).view()
    if isinstance(value, dtypes.TypedArray):
        return Allocation(value.values.shape, value.dtype, "hbm", name, value.values, read_only=True).view()
    if isinstance(value, np.ndarray):
        dtype = dtypes.from_numpy(value.dtype)
        return Allocation(value.shape, dtype, "hbm", name, value if execute else None, read_only=True).view()
    return value


def _from_hbm(tensor, execute: bool):
    if not isinstance(tensor, Tensor) or tensor.buffer != "shared_hbm":
        raise NkiInterpreterError(
            f"a kernel must return tensors allocated with nl.ndarray(..., buffer=nl.shared_hbm), got {tensor!r}"
        )
    if not execute:
        return None
    base = tensor.allocation
    if not base.written.all():
        raise UninitializedReadError(
            f"kernel output {base.name!r} has {int((~base.written).sum())} never-written element(s)"
        )
    return base.data.reshape(base.shape).copy()
