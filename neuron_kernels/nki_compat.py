"""The ``nki``, ``nl`` and ``nisa`` modules the kernels are written against.

On a host with the Neuron SDK they are the real ``nki``, ``nki.language`` and ``nki.isa``. Without it, or
with ``BMOJO_NKI_INTERPRET=1`` in the environment when this module is first imported, they are the NumPy
interpreter's stand-ins, so the unchanged kernel source runs on CPU (DESIGN §4). PyPI's ``nki`` is an
empty placeholder; it counts as missing.
"""

from __future__ import annotations

import os

INTERPRET_ENV = "BMOJO_NKI_INTERPRET"


def real_nki_available() -> bool:
    """True when the Neuron SDK's ``nki`` (with ``jit``, ``language`` and ``isa``) imports."""
    try:
        import nki
        import nki.isa  # noqa: F401
        import nki.language  # noqa: F401
    except ImportError:
        return False
    return hasattr(nki, "jit")


def interpreter_requested() -> bool:
    return os.environ.get(INTERPRET_ENV, "") == "1"


USING_INTERPRETER = interpreter_requested() or not real_nki_available()

if USING_INTERPRETER:
    from neuron_kernels.interpreter import isa as nisa
    from neuron_kernels.interpreter import language as nl
    from neuron_kernels.interpreter import runtime as nki
else:
    import nki
    import nki.isa as nisa
    import nki.language as nl

__all__ = ["INTERPRET_ENV", "USING_INTERPRETER", "interpreter_requested", "nki", "nisa", "nl", "real_nki_available"]
