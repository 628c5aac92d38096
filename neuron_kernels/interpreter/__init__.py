"""A NumPy interpreter of the NKI subset the project's kernels use (DESIGN §4); see README.md here.

``language`` and ``isa`` stand in for ``nki.language`` and ``nki.isa``, ``runtime`` for ``nki`` itself
(``jit``). :func:`run_kernel` runs a kernel on host arrays and returns its outputs with per-engine
statistics and an estimated trn1 time (:mod:`neuron_kernels.interpreter.cost`).
"""

from neuron_kernels.interpreter.dtypes import TypedArray
from neuron_kernels.interpreter.errors import (
    CapacityError,
    HardwareRuleError,
    NkiInterpreterError,
    NkiLanguageError,
    OutOfBoundsError,
    UninitializedReadError,
)
from neuron_kernels.interpreter.memory import Machine
from neuron_kernels.interpreter.runtime import KernelRun, ShapeOnly, run_kernel

__all__ = [
    "CapacityError",
    "HardwareRuleError",
    "KernelRun",
    "Machine",
    "NkiInterpreterError",
    "NkiLanguageError",
    "OutOfBoundsError",
    "ShapeOnly",
    "TypedArray",
    "UninitializedReadError",
    "run_kernel",
]
