"""Backend registry shared by every op (DESIGN §4).

Each op registers implementations under the names ``naive`` (reference), ``torch`` (efficient PyTorch)
and ``nki`` (Trainium). ``backend="auto"`` resolves to the process default, which is ``BMOJO_BACKEND`` from
the environment, else what :func:`set_default_backend` set, else ``auto``: ``nki`` when the tensors live on
a Neuron (XLA) device and the kernels can run there, otherwise ``torch``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("naive", "torch", "nki")
_default_backend: str | None = None


def set_default_backend(name: str) -> None:
    """Set the backend that ``backend="auto"`` means for every op (``auto`` restores device-based choice)."""
    global _default_backend
    if name not in (*BACKENDS, "auto"):
        raise ValueError(f"unknown kernel backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    _default_backend = name


def default_backend() -> str:
    env = os.environ.get("BMOJO_BACKEND")
    if env:
        if env not in (*BACKENDS, "auto"):
            raise ValueError(f"BMOJO_BACKEND={env!r} is not a kernel backend; use auto, {', '.join(BACKENDS)}")
        return env
    return _default_backend or "auto"


@dataclass
class _Impl:
    fn: Callable
    can_run: Callable[[torch.device], str | None]  # None when it can run, else the reason it cannot


@dataclass
class OpRegistry:
    """The implementations of one op, keyed by backend name."""

    op_name: str
    impls: dict[str, _Impl] = field(default_factory=dict)
    _logged: set = field(default_factory=set)

    def register(self, backend: str, can_run: Callable[[torch.device], str | None] | None = None):
        """Decorator: register ``fn`` as ``backend``; ``can_run(device)`` returns why it cannot run, or None."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} for {self.op_name}")

        def wrap(fn: Callable) -> Callable:
            self.impls[backend] = _Impl(fn, can_run or (lambda device: None))
            return fn

        return wrap

    def resolve(self, backend: str, device: torch.device) -> Callable:
        """The implementation to call for ``backend`` on tensors living on ``device``."""
        requested = default_backend() if backend == "auto" else backend
        if requested == "auto":
            nki = self.impls.get("nki")
            on_neuron = device.type in ("xla", "neuron")
            requested = "nki" if on_neuron and nki is not None and nki.can_run(device) is None else "torch"
        if requested not in BACKENDS:
            raise ValueError(
                f"{self.op_name}: unknown backend {requested!r}; choose one of auto, {', '.join(BACKENDS)}"
            )
        impl = self.impls.get(requested)
        if impl is None:
            raise RuntimeError(
                f"{self.op_name}: backend {requested!r} is not available (not installed or not registered); "
                f"available here: {', '.join(sorted(self.impls))}"
            )
        reason = impl.can_run(device)
        if reason is not None:
            raise RuntimeError(f"{self.op_name}: backend {requested!r} cannot run on {device}: {reason}")
        key = (requested, device.type)
        # Logging inside a torch.compile'd graph would break it in two: only eager calls log the choice.
        if key not in self._logged and not torch.compiler.is_compiling():
            self._logged.add(key)
            logger.info("%s: using backend %r on %s", self.op_name, requested, device.type)
        return impl.fn
