"""Everything device-specific the trainer needs, in one place: device choice, autocast and RNG state.

The trn1 lane (torch-xla) plugs in here: :func:`select_device` is the only place a device is chosen, and
the trainer reads values back to the host only at its logging points.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from bmojo.ops import set_default_backend
from bmojo.train.config import BackendConfig, Device, Precision
from bmojo.train.host_memory import keep_freed_host_memory


class DeviceError(RuntimeError):
    """The requested device or kernel backend is not usable here; the message says what to use instead."""


def select_device(backend: BackendConfig) -> torch.device:
    """The device ``backend.device`` names, after setting the kernel backend and thread count (and, on the CPU,
    the host allocator: ``backend.keep_host_memory``). The kernel backend is process-wide, so it is set only once
    the device is known to be usable: a start-up that fails leaves it as it was."""
    device = _resolve_device(backend)
    set_default_backend(backend.kernels.value)
    if backend.num_threads is not None:
        torch.set_num_threads(backend.num_threads)
    if device.type == "cpu" and backend.keep_host_memory:
        keep_freed_host_memory()
    return device


def _resolve_device(backend: BackendConfig) -> torch.device:
    if backend.device == Device.xla:
        from bmojo.train.xla import xla_device  # torch-xla is imported only when asked for

        return xla_device()
    if backend.device == Device.cuda or (backend.device == Device.auto and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DeviceError("backend.device=cuda but no CUDA device is visible; use backend=cpu")
        return torch.device("cuda")
    return torch.device("cpu")


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """bf16 autocast for the forward pass and loss when asked for; a no-op context otherwise."""
    if precision == Precision.bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_host(tree):
    """``tree`` (nested dicts, lists, tuples) with every tensor not on the CPU copied there.

    A checkpoint holding XLA or CUDA tensors would only load back onto that kind of device.
    """
    if isinstance(tree, torch.Tensor):
        return tree if tree.device.type == "cpu" else tree.cpu()
    if isinstance(tree, dict):
        return {key: to_host(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_host(value) for value in tree)
    return tree


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every random generator's state, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
