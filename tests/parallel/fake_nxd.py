"""Stand-ins for the parts of neuronx-distributed and torch-xla that the main lane cannot run, recording calls.

The main lane has no torch-xla, and NxD imports it at module level in its trainer API
(``neuronx_distributed.trainer``: ``trainer.py``, ``optimizer.py``, ``checkpoint.py``), in ``NeuronZero1Optimizer``
(torch-xla's ``ZeroRedundancyOptimizer``) and in its pipeline (``NxDPPModel``). Everything else the engine calls
is NxD's own code in its CPU mode (``tests/parallel/real_nxd.py``): layers, mappings, ``parallel_state``, ``grads``
and ``parallel_cross_entropy``, over gloo. The XLA lane (``tests/test_xla_nxd.py``) runs the real trainer API,
ZeRO-1 and checkpoints on torch-xla's CPU device; each function here names the one it mirrors and what it leaves
out. The pipeline is not mirrored: :func:`initialize_parallel_model` refuses a pipeline-parallel size above 1.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.distributed as dist


@dataclass
class Record:
    name: str
    kwargs: dict


@dataclass
class Recorder:
    calls: list[Record] = field(default_factory=list)

    def record(self, name: str, **kwargs) -> None:
        self.calls.append(Record(name, kwargs))

    def named(self, name: str) -> list[Record]:
        return [call for call in self.calls if call.name == name]


def _register(patch: pytest.MonkeyPatch, modules: dict[str, dict]) -> None:
    """Give each named module these attributes: added to a module already there (such as real_nxd's torch-xla
    stand-in, whose names NxD's modules hold), else in a new module."""
    for name, attributes in modules.items():
        module = sys.modules.get(name)
        if module is None:
            module = types.ModuleType(name)
            patch.setitem(sys.modules, name, module)
        for attribute, value in attributes.items():
            patch.setattr(module, attribute, value, raising=False)
    for name in modules:
        parent, _, child = name.rpartition(".")
        if parent in sys.modules:
            patch.setattr(sys.modules[parent], child, sys.modules[name], raising=False)


def _rank_file() -> str:
    """The per-rank file name of NxD's ``trainer/checkpoint.py`` (``_get_path``), data-parallel rank 0."""
    from neuronx_distributed.parallel_layers import parallel_state

    tp_rank, pp_rank = (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_pipeline_model_parallel_rank(),
    )
    return f"dp_rank_00_tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:02d}.pt"


def install(patch: pytest.MonkeyPatch) -> Recorder:
    """Register a ``neuronx_distributed.trainer`` module (undone by ``patch``) over the real NxD that
    ``real_nxd.load()`` set up, and return its recorder."""
    from neuronx_distributed.parallel_layers import grads, parallel_state

    recorder = Recorder()

    def initialize_groups(nxd_config: dict) -> None:
        if dist.is_initialized() and not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=nxd_config["tensor_parallel_size"],
                pipeline_model_parallel_size=nxd_config["pipeline_parallel_size"],
            )

    def neuronx_distributed_config(
        tensor_parallel_size=1,
        pipeline_parallel_size=1,
        pipeline_config=None,
        optimizer_config=None,
        activation_checkpoint_config=None,
        sequence_parallel=False,
        **unused,
    ):
        """Mirrors ``neuronx_distributed.trainer.neuronx_distributed_config``, which initialises NxD's groups (the
        real ``parallel_state``, here), without the settings the engine leaves at NxD's defaults."""
        config = dict(
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            pipeline_config=pipeline_config,
            optimizer_config=optimizer_config,
            activation_checkpoint_config=activation_checkpoint_config,
            sequence_parallel=sequence_parallel,
        )
        recorder.record("neuronx_distributed_config", **config)
        initialize_groups(config)
        return config

    def initialize_parallel_model(nxd_config, model_fn, include_buffers=False, *model_args, **model_kwargs):
        """Mirrors ``neuronx_distributed.trainer.initialize_parallel_model`` without its move to the XLA device,
        its ``NxDModel`` wrapper and activation checkpointing (which the XLA lane runs); ``NxDPPModel``'s tracing
        and runtime need torch-xla and a process per pipeline stage, so a pipeline is refused."""
        if nxd_config["pipeline_parallel_size"] > 1:
            raise NotImplementedError("NxDPPModel needs torch-xla: pipelines are not run in the main lane")
        recorder.record("initialize_parallel_model", include_buffers=include_buffers)
        initialize_groups(nxd_config)
        return model_fn(*model_args, **model_kwargs)

    class NxDOptimizer(torch.optim.Optimizer):
        """Mirrors ``neuronx_distributed.trainer.optimizer.NxDOptimizer``: its ``step`` with NxD's real
        ``grads.allreduce_sequence_parallel_gradients`` and ``grads.clip_grad_norm``, without the data-parallel
        reduction (one data-parallel rank here). Under ZeRO-1 it clips at the ZeRO optimizer's ``max_norm``, as
        ``NeuronZero1Optimizer`` does; gradients stay in ``grad`` (the real one's ``main_grad``: the XLA lane)."""

        def __init__(self, optimizer, nxd_config, zero1_max_norm=None):  # no Optimizer.__init__, as in NxD
            self.optimizer, self.nxd_config, self.grad_norm = optimizer, nxd_config, None
            self.zero1_max_norm = zero1_max_norm

        param_groups = property(lambda self: self.optimizer.param_groups)
        state = property(lambda self: self.optimizer.state)
        defaults = property(lambda self: self.optimizer.defaults)

        def __getstate__(self):
            return self.optimizer.__getstate__()

        def state_dict(self):
            return self.optimizer.state_dict()

        def load_state_dict(self, state_dict):
            self.optimizer.load_state_dict(state_dict)

        def zero_grad(self, set_to_none=True):
            self.optimizer.zero_grad(set_to_none=set_to_none)

        def step(self, closure=None):
            if self.nxd_config["sequence_parallel"]:
                grads.allreduce_sequence_parallel_gradients(self)
            settings = self.nxd_config["optimizer_config"]
            if settings["grad_clipping"]:
                params = [p for group in self.param_groups for p in group["params"]]
                norm = settings["max_grad_norm"] if self.zero1_max_norm is None else self.zero1_max_norm
                self.grad_norm = grads.clip_grad_norm(params, norm)
            return self.optimizer.step(closure)

    def initialize_parallel_optimizer(nxd_config, optimizer_class, parameters, **defaults):
        """Mirrors ``neuronx_distributed.trainer.initialize_parallel_optimizer``; under ZeRO-1 the real one builds
        ``NeuronZero1Optimizer`` (torch-xla's ZeRO), which receives the keyword arguments, ``max_norm`` included
        (torch-xla's default 1.0), and clips at it rather than at ``optimizer_config``'s ``max_grad_norm``."""
        recorder.record("initialize_parallel_optimizer", optimizer_class=optimizer_class, **defaults)
        zero1_max_norm = None
        if nxd_config["optimizer_config"]["zero_one_enabled"]:
            zero1_max_norm = defaults.pop("max_norm", 1.0)
        return NxDOptimizer(optimizer_class(parameters, **defaults), nxd_config, zero1_max_norm)

    def save_checkpoint(checkpoint_dir_str, tag, model=None, optimizer=None, user_content=None, **options):
        """Mirrors ``neuronx_distributed.trainer.save_checkpoint``'s file layout (``model/`` and ``optim/``, one
        file per tensor/pipeline rank, ``user_content.pt``), without xser, ZeRO-1 shards or ``newest``."""
        recorder.record(
            "save_checkpoint", checkpoint_dir_str=checkpoint_dir_str, tag=tag, optimizer=optimizer, **options
        )
        folder = Path(checkpoint_dir_str) / tag
        for part, state in (("model", model.state_dict()), ("optim", optimizer and optimizer.state_dict())):
            (folder / part).mkdir(parents=True, exist_ok=True)
            torch.save(state, folder / part / _rank_file())
        torch.save(user_content, folder / "user_content.pt")

    def load_checkpoint(path, tag=None, model=None, optimizer=None, scheduler=None, **options):
        """Mirrors ``neuronx_distributed.trainer.load_checkpoint``: the optimizer first, then the model."""
        recorder.record("load_checkpoint", path=path, tag=tag, model=model, optimizer=optimizer)
        folder = Path(path) / tag
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(folder / "optim" / _rank_file(), weights_only=True))
        if model is not None:
            model.load_state_dict(torch.load(folder / "model" / _rank_file(), weights_only=True))
        return torch.load(folder / "user_content.pt", weights_only=True)

    _register(
        patch,
        {
            "neuronx_distributed.trainer": dict(
                neuronx_distributed_config=neuronx_distributed_config,
                initialize_parallel_model=initialize_parallel_model,
                initialize_parallel_optimizer=initialize_parallel_optimizer,
                save_checkpoint=save_checkpoint,
                load_checkpoint=load_checkpoint,
            )
        },
    )
    return recorder


def install_torch_xla(patch: pytest.MonkeyPatch, recorder: Recorder) -> None:
    """Stand in for the torch-xla calls of bmojo's XLA trainer (``bmojo.train.xla.import_torch_xla``), recording
    them: the device is the CPU, step closures run at the next ``sync`` (after the step's graph, as on XLA) and
    the runtime's world is ``torch.distributed``'s (gloo)."""
    closures: list = []

    def device():
        """Mirrors ``torch_xla.device``."""
        return torch.device("cpu")

    def sync():
        """Mirrors ``torch_xla.sync``: the graph cut, after which the step closures run."""
        recorder.record("sync")
        while closures:
            function, args = closures.pop(0)
            function(*args)

    def add_step_closure(closure, args=(), run_async=False):
        """Mirrors ``torch_xla.core.xla_model.add_step_closure``."""
        recorder.record("add_step_closure")
        closures.append((closure, args))

    _register(
        patch,
        {
            "torch_xla": dict(device=device, sync=sync),
            "torch_xla.core": {},
            "torch_xla.core.xla_model": dict(add_step_closure=add_step_closure),
            "torch_xla.debug": {},
            "torch_xla.debug.metrics": dict(metric_data=lambda name: None, counter_names=lambda: []),
            "torch_xla.runtime": dict(world_size=dist.get_world_size, global_ordinal=dist.get_rank),
        },
    )
