"""A recording stand-in for ``neuronx_distributed``: the API surface the NxD engine calls, with real signatures.

It serves the main lane's tests of what the engine asks of NxD (arguments, call order, the trainer loop over
several processes at TP=2) without torch-xla; each function names the NxD function it mirrors. What NxD really
does is tested on its real source: the layers at TP=2 in its CPU mode (``tests/test_nxd_reference.py``), its
trainer API, ZeRO-1, checkpoints and pipeline tracer on torch-xla's CPU device (``tests/test_xla_nxd.py``).

Parallel layers allocate this rank's slice shapes and record their arguments; with a tensor-parallel size of 1
they compute what NxD computes (no collectives are needed), so a model built through the stand-in can be run.
``parallel_cross_entropy`` subtracts the maximum in place like NxD's, to catch callers that do not clone.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Record:
    name: str
    kwargs: dict
    module: object = None


@dataclass
class FakeNxD:
    tp_rank: int = 0
    tp_size: int = 1
    calls: list[Record] = field(default_factory=list)

    def record(self, name: str, module: object = None, **kwargs) -> Record:
        entry = Record(name, kwargs, module)
        self.calls.append(entry)
        return entry

    def named(self, name: str) -> list[Record]:
        return [call for call in self.calls if call.name == name]


def install(monkeypatch, tp_rank: int = 0, tp_size: int = 1) -> FakeNxD:
    """Put the stand-in into ``sys.modules`` (undone by ``monkeypatch``) and return its recorder."""
    fake = FakeNxD(tp_rank, tp_size)

    class ColumnParallelLinear(nn.Module):
        """Mirrors ``neuronx_distributed.parallel_layers.layers.ColumnParallelLinear``."""

        def __init__(
            self,
            input_size,
            output_size,
            bias=True,
            gather_output=True,
            dtype=torch.float32,
            device=None,
            stride=1,
            init_method=None,
            sequence_parallel_enabled=False,
            sequence_dimension=None,
            **kwargs,
        ):
            super().__init__()
            fake.record(
                "ColumnParallelLinear",
                self,
                input_size=input_size,
                output_size=output_size,
                bias=bias,
                gather_output=gather_output,
                sequence_parallel_enabled=sequence_parallel_enabled,
                sequence_dimension=sequence_dimension,
                **kwargs,
            )
            self.weight = nn.Parameter(torch.empty(output_size // fake.tp_size, input_size, dtype=dtype))
            self.bias = nn.Parameter(torch.empty(output_size // fake.tp_size, dtype=dtype)) if bias else None

        def forward(self, x):
            return F.linear(x, self.weight, self.bias)

    class RowParallelLinear(nn.Module):
        """Mirrors ``neuronx_distributed.parallel_layers.layers.RowParallelLinear``."""

        def __init__(
            self,
            input_size,
            output_size,
            bias=True,
            input_is_parallel=False,
            dtype=torch.float32,
            device=None,
            stride=1,
            init_method=None,
            sequence_parallel_enabled=False,
            sequence_dimension=None,
            **kwargs,
        ):
            super().__init__()
            if sequence_parallel_enabled and not input_is_parallel:
                raise RuntimeError("To enable `sequence_parallel_enabled`, `input_is_parallel` must be `True`")
            fake.record(
                "RowParallelLinear",
                self,
                input_size=input_size,
                output_size=output_size,
                bias=bias,
                input_is_parallel=input_is_parallel,
                sequence_parallel_enabled=sequence_parallel_enabled,
                sequence_dimension=sequence_dimension,
                **kwargs,
            )
            self.weight = nn.Parameter(torch.empty(output_size, input_size // fake.tp_size, dtype=dtype))
            self.bias = nn.Parameter(torch.empty(output_size, dtype=dtype)) if bias else None

        def forward(self, x):
            return F.linear(x, self.weight, self.bias)

    class ParallelEmbedding(nn.Module):
        """Mirrors ``neuronx_distributed.parallel_layers.layers.ParallelEmbedding``."""

        def __init__(
            self,
            num_embeddings,
            embedding_dim,
            padding_idx=None,
            max_norm=None,
            norm_type=2.0,
            scale_grad_by_freq=False,
            sparse=False,
            init_method=None,
            device=None,
            dtype=torch.float32,
            shard_across_embedding=False,
            pad=False,
            sequence_parallel_enabled=False,
            sequence_dimension=None,
            **kwargs,
        ):
            super().__init__()
            # Like NxD's: only the sequence-first default reduce-scatters (and transposes to [T, B, D]).
            self.sequence_first = sequence_parallel_enabled and not sequence_dimension
            fake.record(
                "ParallelEmbedding",
                self,
                num_embeddings=num_embeddings,
                embedding_dim=embedding_dim,
                shard_across_embedding=shard_across_embedding,
                sequence_parallel_enabled=sequence_parallel_enabled,
                sequence_dimension=sequence_dimension,
                **kwargs,
            )
            self.weight = nn.Parameter(torch.empty(num_embeddings // fake.tp_size, embedding_dim, dtype=dtype))

        def forward(self, ids):
            out = F.embedding(ids, self.weight)
            return out.transpose(0, 1) if self.sequence_first else out

    def parallel_cross_entropy(vocab_parallel_logits, target, label_smoothing=0.0):
        """Mirrors ``neuronx_distributed.parallel_layers.loss_functions.parallel_cross_entropy``."""
        fake.record("parallel_cross_entropy", shape=tuple(vocab_parallel_logits.shape))
        vocab_parallel_logits.sub_(vocab_parallel_logits.max(dim=-1, keepdim=True).values.detach())
        flat = F.cross_entropy(vocab_parallel_logits.flatten(0, -2), target.flatten().clamp(min=0), reduction="none")
        return flat.view(target.shape)

    def gather_from_sequence_parallel_region(
        input_, sequence_dimension=0, to_model_parallel=True, process_group=None, tile_cc=False
    ):
        """Mirrors ``neuronx_distributed.parallel_layers.mappings.gather_from_sequence_parallel_region``."""
        fake.record(
            "gather_from_sequence_parallel_region",
            sequence_dimension=sequence_dimension,
            to_model_parallel=to_model_parallel,
        )
        return input_

    def reduce_scatter_to_sequence_parallel_region(input_, sequence_dimension=0, process_group=None, dtype=None):
        """Mirrors ``neuronx_distributed.parallel_layers.mappings.reduce_scatter_to_sequence_parallel_region``."""
        fake.record("reduce_scatter_to_sequence_parallel_region", sequence_dimension=sequence_dimension)
        return input_

    def copy_to_tensor_model_parallel_region(input_, process_group=None):
        """Mirrors ``neuronx_distributed.parallel_layers.mappings.copy_to_tensor_model_parallel_region``."""
        fake.record("copy_to_tensor_model_parallel_region")
        return input_

    def reduce_from_tensor_model_parallel_region(input_, process_group=None):
        """Mirrors ``neuronx_distributed.parallel_layers.mappings.reduce_from_tensor_model_parallel_region``."""
        fake.record("reduce_from_tensor_model_parallel_region")
        return input_

    def set_tensor_model_parallel_attributes(tensor, is_parallel, dim, stride, num_partitions=-1, rank_ordering=None):
        """Mirrors ``neuronx_distributed.parallel_layers.utils.set_tensor_model_parallel_attributes``."""
        fake.record("set_tensor_model_parallel_attributes", tensor, is_parallel=is_parallel, dim=dim, stride=stride)
        tensor.tensor_model_parallel, tensor.partition_dim, tensor.partition_stride = is_parallel, dim, stride

    class NxDPPModel(nn.Module):
        """Mirrors ``neuronx_distributed.pipeline.NxDPPModel``; only records its arguments (its runtime needs
        several XLA devices)."""

        def __init__(self, module, transformer_layer_cls=None, num_microbatches=1, **kwargs):
            super().__init__()
            fake.record(
                "NxDPPModel",
                self,
                transformer_layer_cls=transformer_layer_cls,
                num_microbatches=num_microbatches,
                **kwargs,
            )
            self.original_torch_module = module

    def neuronx_distributed_config(
        tensor_parallel_size=1,
        pipeline_parallel_size=1,
        expert_parallel_size=1,
        context_parallel_size=1,
        pipeline_config=None,
        optimizer_config=None,
        activation_checkpoint_config=None,
        pad_model=False,
        sequence_parallel=False,
        model_init_config=None,
        lora_config=None,
        mixed_precision_config=None,
        sequential_move_factor=11,
        lnc_size=1,
    ):
        """Mirrors ``neuronx_distributed.trainer.neuronx_distributed_config``."""
        config = dict(
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            pipeline_config=pipeline_config,
            optimizer_config=optimizer_config,
            activation_checkpoint_config=activation_checkpoint_config,
            sequence_parallel=sequence_parallel,
        )
        fake.record("neuronx_distributed_config", **config)
        return config

    def initialize_parallel_model(nxd_config, model_fn, include_buffers=False, *model_args, **model_kwargs):
        """Mirrors ``neuronx_distributed.trainer.initialize_parallel_model, without its move to the XLA device``."""
        fake.record("initialize_parallel_model", include_buffers=include_buffers)
        model = model_fn(*model_args, **model_kwargs)
        if nxd_config["pipeline_parallel_size"] > 1:
            model = NxDPPModel(model, **nxd_config["pipeline_config"])
        return model

    class NxDOptimizer(torch.optim.Optimizer):
        """Mirrors ``neuronx_distributed.trainer.optimizer.NxDOptimizer``: wraps the optimizer, clips in
        ``step`` and keeps the norm before clipping."""

        def __init__(self, optimizer, nxd_config):  # no Optimizer.__init__, as in NxD
            self.optimizer, self.nxd_config, self.grad_norm = optimizer, nxd_config, None
            self.zero1_max_norm = None

        param_groups = property(lambda self: self.optimizer.param_groups)
        state = property(lambda self: self.optimizer.state)
        defaults = property(lambda self: self.optimizer.defaults)

        def state_dict(self):
            return self.optimizer.state_dict()

        def load_state_dict(self, state_dict):
            self.optimizer.load_state_dict(state_dict)

        def zero_grad(self, set_to_none=True):
            self.optimizer.zero_grad(set_to_none=set_to_none)

        def step(self, closure=None):
            settings = self.nxd_config["optimizer_config"]
            if settings["grad_clipping"]:
                params = [p for group in self.param_groups for p in group["params"]]
                norm = settings["max_grad_norm"] if self.zero1_max_norm is None else self.zero1_max_norm
                self.grad_norm = torch.nn.utils.clip_grad_norm_(params, norm)
            return self.optimizer.step(closure)

    def initialize_parallel_optimizer(nxd_config, optimizer_class, parameters, **defaults):
        """Mirrors ``neuronx_distributed.trainer.initialize_parallel_optimizer``."""
        fake.record("initialize_parallel_optimizer", optimizer_class=optimizer_class, **defaults)
        optimizer = NxDOptimizer(None, nxd_config)
        if nxd_config["optimizer_config"]["zero_one_enabled"]:
            # As NxD builds NeuronZero1Optimizer: its keyword arguments reach it, and it clips at its max_norm
            # (torch-xla's default 1.0), not at optimizer_config's max_grad_norm.
            optimizer.zero1_max_norm = defaults.pop("max_norm", 1.0)
        optimizer.optimizer = optimizer_class(parameters, **defaults)
        return optimizer

    def save_checkpoint(
        checkpoint_dir_str,
        tag,
        model=None,
        optimizer=None,
        scheduler=None,
        user_content=None,
        num_workers=8,
        use_xser=False,
        num_kept_ckpts=None,
        async_save=False,
        zero1_optimizer=False,
        use_zero1_dcp=False,
        avoid_saving_lower_precision_weights=False,
    ):
        """Mirrors ``neuronx_distributed.trainer.save_checkpoint``."""
        fake.record(
            "save_checkpoint",
            checkpoint_dir_str=checkpoint_dir_str,
            tag=tag,
            zero1_optimizer=zero1_optimizer,
            user_content=user_content,
            optimizer=optimizer,
        )
        # NxD's file names (trainer/checkpoint.py _get_path): one model file per (tp, pp) rank.
        rank_file = f"dp_rank_00_tp_rank_{fake.tp_rank:02d}_pp_rank_00.pt"
        folder = Path(checkpoint_dir_str) / tag
        for part, state in (("model", model.state_dict()), ("optim", optimizer and optimizer.state_dict())):
            (folder / part).mkdir(parents=True, exist_ok=True)
            torch.save(state, folder / part / rank_file)
        torch.save(user_content, folder / "user_content.pt")

    def load_checkpoint(
        path, tag=None, model=None, optimizer=None, scheduler=None, num_workers=8, strict=True, use_zero1_dcp=False
    ):
        """Mirrors ``neuronx_distributed.trainer.load_checkpoint``."""
        fake.record("load_checkpoint", path=path, tag=tag, model=model, optimizer=optimizer)
        folder, rank_file = Path(path) / tag, f"dp_rank_00_tp_rank_{fake.tp_rank:02d}_pp_rank_00.pt"
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(folder / "optim" / rank_file, weights_only=True))
        if model is not None:
            model.load_state_dict(torch.load(folder / "model" / rank_file, weights_only=True))
        return torch.load(folder / "user_content.pt", weights_only=True)

    state = types.SimpleNamespace(
        get_tensor_model_parallel_rank=lambda: fake.tp_rank,
        get_tensor_model_parallel_size=lambda: fake.tp_size,
        get_tensor_model_parallel_group=lambda: None,
        get_data_parallel_rank=lambda: 0,
        get_data_parallel_group=lambda: None,
        is_global_rank_zero=lambda: True,
    )
    modules = {
        "neuronx_distributed": {},
        "neuronx_distributed.trainer": dict(
            neuronx_distributed_config=neuronx_distributed_config,
            initialize_parallel_model=initialize_parallel_model,
            initialize_parallel_optimizer=initialize_parallel_optimizer,
            save_checkpoint=save_checkpoint,
            load_checkpoint=load_checkpoint,
        ),
        "neuronx_distributed.parallel_layers": {},
        "neuronx_distributed.parallel_layers.grads": {},
        "neuronx_distributed.parallel_layers.layers": dict(
            ColumnParallelLinear=ColumnParallelLinear,
            RowParallelLinear=RowParallelLinear,
            ParallelEmbedding=ParallelEmbedding,
        ),
        "neuronx_distributed.parallel_layers.loss_functions": dict(parallel_cross_entropy=parallel_cross_entropy),
        "neuronx_distributed.parallel_layers.mappings": dict(
            gather_from_sequence_parallel_region=gather_from_sequence_parallel_region,
            reduce_scatter_to_sequence_parallel_region=reduce_scatter_to_sequence_parallel_region,
            copy_to_tensor_model_parallel_region=copy_to_tensor_model_parallel_region,
            reduce_from_tensor_model_parallel_region=reduce_from_tensor_model_parallel_region,
        ),
        "neuronx_distributed.parallel_layers.parallel_state": vars(state),
        "neuronx_distributed.parallel_layers.utils": dict(
            set_tensor_model_parallel_attributes=set_tensor_model_parallel_attributes
        ),
        "neuronx_distributed.pipeline": dict(NxDPPModel=NxDPPModel),
    }
    for name, attributes in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, name, module)
    for name in modules:
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, sys.modules[name])
    # It binds parallel_cross_entropy at import: imported afresh, it binds this stand-in's.
    monkeypatch.delitem(sys.modules, "bmojo.parallel.nxd_loss", raising=False)
    return fake


def install_torch_xla(monkeypatch, fake: FakeNxD, world_size: int, ordinal: int = 0) -> None:
    """Stand in for the few ``torch_xla`` calls the trainer makes, recording them into ``fake``.

    The device is the CPU; step closures run at the next ``sync`` (after the step's graph, as on XLA); the runtime
    reports ``world_size`` processes and this one's ``ordinal``.
    """
    closures: list = []

    def device():
        fake.record("device")
        return torch.device("cpu")

    def sync():
        fake.record("sync")
        while closures:
            function, args = closures.pop(0)
            function(*args)

    def add_step_closure(closure, args=(), run_async=False):
        fake.record("add_step_closure")
        closures.append((closure, args))

    modules = {
        "torch_xla": dict(device=device, sync=sync),
        "torch_xla.core": {},
        "torch_xla.core.xla_model": dict(add_step_closure=add_step_closure),
        "torch_xla.debug": {},
        "torch_xla.debug.metrics": dict(metric_data=lambda name: None, counter_names=lambda: []),
        "torch_xla.runtime": dict(world_size=lambda: world_size, global_ordinal=lambda: ordinal),
    }
    for name, attributes in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, name, module)
    for name in modules:
        parent, _, child = name.rpartition(".")
        if parent:
            monkeypatch.setattr(sys.modules[parent], child, sys.modules[name], raising=False)
