"""ALU operators and ScalarE activation functions, the ``op=`` values of ``nki.isa`` instructions.

Shared by the ``nki.language`` stand-in (which exports them as ``nl.add``, ``nl.exp``, ...) and the ISA
stand-in (which applies them). Semantics follow the NKI "Supported Math Operators" and "Supported
Activation Functions" tables of the API reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from neuron_kernels.interpreter.errors import NkiInterpreterError


@dataclass(frozen=True, eq=False)
class Operator:
    """An ALU operator and/or ScalarE activation function, named like its ``nki.language`` identifier.

    ``binary(a, b)`` is the ALU operator on float64 arrays (``a`` the left-hand side); ``unary(x)`` the
    activation function; ``valid_range`` the input range outside which ScalarE output is invalid
    (NKI "Supported Activation Functions" table).
    """

    name: str
    binary: Callable | None = None
    unary: Callable | None = None
    valid_range: tuple[float, float] | None = None
    reducible: bool = False
    bitvec: bool = False

    def __call__(self, *args, **kwargs):
        raise NkiInterpreterError(
            f"nl.{self.name} as a tile-level function is not supported in this NKI release; "
            f"pass op=nl.{self.name} to an nki.isa instruction (tensor_tensor, tensor_scalar, activation, ...)"
        )

    def __repr__(self) -> str:
        return f"nl.{self.name}"


def _compare(fn: Callable) -> Callable:
    return lambda a, b: fn(a, b).astype(np.float64)


add = Operator("add", np.add, reducible=True)
subtract = Operator("subtract", np.subtract, reducible=True)
multiply = Operator("multiply", np.multiply, reducible=True)
maximum = Operator("maximum", np.maximum, reducible=True)
minimum = Operator("minimum", np.minimum, reducible=True)
divide = Operator("divide", np.divide)
power = Operator("power", np.power)
equal = Operator("equal", _compare(np.equal))
not_equal = Operator("not_equal", _compare(np.not_equal))
greater = Operator("greater", _compare(np.greater))
greater_equal = Operator("greater_equal", _compare(np.greater_equal))
less = Operator("less", _compare(np.less))
less_equal = Operator("less_equal", _compare(np.less_equal))
logical_and = Operator("logical_and", _compare(np.logical_and), reducible=True)
logical_or = Operator("logical_or", _compare(np.logical_or), reducible=True)
logical_xor = Operator("logical_xor", _compare(np.logical_xor), reducible=True)
bitwise_and = Operator("bitwise_and", np.bitwise_and, reducible=True, bitvec=True)
bitwise_or = Operator("bitwise_or", np.bitwise_or, reducible=True, bitvec=True)
bitwise_xor = Operator("bitwise_xor", np.bitwise_xor, reducible=True, bitvec=True)
left_shift = Operator("left_shift", np.left_shift, bitvec=True)
right_shift = Operator("right_shift", np.right_shift, bitvec=True)

copy = Operator("copy", unary=lambda x: x)
exp = Operator("exp", unary=np.exp)
log = Operator("log", unary=np.log, valid_range=(2.0**-64, 2.0**64))
square = Operator("square", unary=np.square)
sqrt = Operator("sqrt", unary=np.sqrt, valid_range=(2.0**-116, 2.0**118))
rsqrt = Operator("rsqrt", unary=lambda x: 1.0 / np.sqrt(x), valid_range=(2.0**-87, 2.0**97))
reciprocal = Operator("reciprocal", unary=lambda x: 1.0 / x)
sigmoid = Operator("sigmoid", unary=lambda x: 1.0 / (1.0 + np.exp(-x)))
tanh = Operator("tanh", unary=np.tanh)
relu = Operator("relu", unary=lambda x: np.maximum(x, 0.0))
softplus = Operator("softplus", unary=lambda x: np.logaddexp(0.0, x))
silu = Operator("silu", unary=lambda x: x / (1.0 + np.exp(-x)))
sign = Operator("sign", unary=np.sign)
abs = Operator("abs", unary=np.abs)  # noqa: A001  (the NKI name)

__all__ = [name for name, value in list(globals().items()) if isinstance(value, Operator)] + ["Operator"]
