"""Errors the interpreter raises when a kernel breaks an NKI or hardware rule."""


class NkiInterpreterError(Exception):
    """Base class: the kernel cannot run as written."""


class HardwareRuleError(NkiInterpreterError):
    """An instruction breaks a tile-size, memory-type or dtype rule of the NKI ISA."""


class CapacityError(NkiInterpreterError):
    """Live SBUF or PSUM allocations exceed the NeuronCore's on-chip memory."""


class UninitializedReadError(NkiInterpreterError):
    """An instruction read memory that nothing wrote (new buffers hold NaN, as in the official simulator)."""


class OutOfBoundsError(NkiInterpreterError):
    """An access pattern or indirect index reaches outside its tensor."""


class NkiLanguageError(NkiInterpreterError):
    """The kernel source uses Python the NKI 2.28 compiler does not accept, or a loop breaks its semantics."""
