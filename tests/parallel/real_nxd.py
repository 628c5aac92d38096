"""Import the real neuronx-distributed for tests: the installed package, or its Python source on CPU.

``BMOJO_NXD_SOURCE`` names a ``src`` folder holding ``neuronx_distributed/`` (CI: the NxD 0.17 source beside
the checkout, ../shared/reference/neuronx-distributed-2.28.0/src). The package's ``__init__`` imports modules
that need the compiled Neuron SDK, so a bare package whose ``__path__`` is that folder is registered instead and
each submodule is imported as the tests need it. The compiled modules NxD imports at module level are replaced
by the stand-ins below, each naming what it stands in for; none of them is called on NxD's CPU path
(``NXD_CPU_MODE=1``: gloo groups, collectives on CPU tensors). NxD's own Python is never replaced.

In the XLA lane (torch-xla on its CPU device) :func:`load` with ``cpu_mode=False`` runs NxD's XLA path instead:
its collectives are torch-xla's, and its trainer (``neuronx_distributed.trainer``) imports, since torch-xla is real.

Without ``BMOJO_NXD_SOURCE`` the installed package is used (a Neuron host); without either the tests skip, or
fail where ``BMOJO_REQUIRE_REFERENCES=1`` (CI).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest

SOURCE_VARIABLE = "BMOJO_NXD_SOURCE"
MISSING = (
    "the real neuronx-distributed is not available: set BMOJO_NXD_SOURCE to the src folder of the NxD 0.17 source "
    "(../shared/reference/neuronx-distributed-2.28.0/src) or install neuronx-distributed"
)


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    sys.modules[name] = module
    return module


def _nki_jit(*args, **kwargs):
    """Stands in for ``torch_neuronx.xla_impl.ops.nki_jit`` (compiles an NKI kernel): NxD's mappings wrap their
    tiled collective kernels with it at import; the kernels only run on a Neuron device."""

    def wrap(kernel):
        return kernel

    return wrap


class _RingPairs:
    """Stands in for ``neuronxcc.nki._private_kernels.collectives.CollectivesConfig``, which
    ``initialize_model_parallel`` builds from the context-parallel groups for ring attention's send/receive
    pairs: ``rank_src_tgt_pairs[rank]`` is (previous, next) rank in its ring. Ring attention is not used here."""

    def __init__(self, replica_groups: list[list[int]]):
        self.rank_src_tgt_pairs = {
            rank: (group[index - 1], group[(index + 1) % len(group)])
            for group in replica_groups
            for index, rank in enumerate(group)
        }


def _install_compiled_stand_ins() -> None:
    """The compiled Neuron modules (torch-neuronx, neuronx-cc) that ``parallel_layers`` imports at module level."""
    if importlib.util.find_spec("torch_neuronx") is None:
        _module("torch_neuronx")
        # get_platform_target reads the Neuron device's instance type; the trainer targets trn1.
        _module("torch_neuronx.utils", get_platform_target=lambda: "trn1")
        _module("torch_neuronx.xla_impl")
        _module("torch_neuronx.xla_impl.ops", nki_jit=_nki_jit)
    if importlib.util.find_spec("neuronxcc") is None:
        for name in ("neuronxcc", "neuronxcc.nki", "neuronxcc.nki.compiler", "neuronxcc.nki.compiler.backends"):
            _module(name)
        # NKI's collectives and language, used only inside the NKI kernels above.
        _module("neuronxcc.nki.nccl")
        _module("neuronxcc.nki.language")
        _module("neuronxcc.nki.compiler.backends.neuron")
        _module("neuronxcc.nki.compiler.backends.neuron.dimensions", CCPipeline=object)
        _module("neuronxcc.nki._private_kernels")
        _module("neuronxcc.nki._private_kernels.collectives", CollectivesConfig=_RingPairs)


def _install_torch_xla_stand_in() -> None:
    """Where torch-xla is absent (the main lane), the module-level names NxD's CPU path reads from it."""
    if importlib.util.find_spec("torch_xla") is not None:
        return
    _module("torch_xla")
    _module("torch_xla.core")
    # The reduce kinds of torch_xla.core.xla_model: NxD maps them to torch.distributed ops in CPU mode.
    _module(
        "torch_xla.core.xla_model",
        REDUCE_SUM="sum",
        REDUCE_MUL="mul",
        REDUCE_AND="and",
        REDUCE_OR="or",
        REDUCE_MIN="min",
        REDUCE_MAX="max",
    )
    _module("torch_xla.core.xla_env_vars")
    _module("torch_xla.runtime")
    _module("torch_xla.utils")
    _module("torch_xla.utils.serialization")


def _install_xrt_host_world_size() -> None:
    """NxD's ``get_local_world_size`` takes its PJRT branch only for ``PJRT_DEVICE=NEURON``; on torch-xla's CPU
    device it falls back to the XRT runtime's ``xla_env_vars.HOST_WORLD_SIZE``, which torch-xla 2.9 removed. This
    stands in for that XRT variable: one host, so NxD counts every process of the world as local."""
    env_vars = importlib.import_module("torch_xla.core.xla_env_vars")
    if not hasattr(env_vars, "HOST_WORLD_SIZE"):
        env_vars.HOST_WORLD_SIZE = "HOST_WORLD_SIZE"
    os.environ.setdefault("HOST_WORLD_SIZE", "1")


def source_folder() -> Path | None:
    value = os.environ.get(SOURCE_VARIABLE)
    return Path(value).resolve() if value else None


def available() -> bool:
    return source_folder() is not None or importlib.util.find_spec("neuronx_distributed") is not None


def require() -> None:
    """Skip the calling test when the real NxD is not available, or fail under ``BMOJO_REQUIRE_REFERENCES=1``."""
    if available():
        return
    if os.environ.get("BMOJO_REQUIRE_REFERENCES") == "1":
        pytest.fail(MISSING)
    pytest.skip(MISSING)


def load(cpu_mode: bool = True) -> types.ModuleType:
    """The ``neuronx_distributed`` package (its submodules import on demand). ``cpu_mode``: NxD's CPU mode
    (``NXD_CPU_MODE=1``: gloo groups, collectives on CPU tensors); else its XLA path, on torch-xla's device."""
    os.environ["NXD_CPU_MODE"] = "1" if cpu_mode else "0"
    if not cpu_mode and os.environ.get("PJRT_DEVICE") != "NEURON":
        _install_xrt_host_world_size()
    source = source_folder()
    if source is None:
        return importlib.import_module("neuronx_distributed")
    if "neuronx_distributed" in sys.modules:
        return sys.modules["neuronx_distributed"]
    package_folder = source / "neuronx_distributed"
    if not (package_folder / "parallel_layers").is_dir():
        raise FileNotFoundError(f"{SOURCE_VARIABLE}={source} holds no neuronx_distributed/ package")
    _install_compiled_stand_ins()
    _install_torch_xla_stand_in()
    package = types.ModuleType("neuronx_distributed")
    package.__path__ = [str(package_folder)]
    package.__file__ = str(package_folder / "__init__.py")
    sys.modules["neuronx_distributed"] = package
    return package
