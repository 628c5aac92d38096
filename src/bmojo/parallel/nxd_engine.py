"""The NxD engine (trn1): the parallel plan applied with neuronx-distributed's layers, trainer API and checkpoints.

``neuronx_distributed`` is imported only when an :class:`NxDEngine` is created, so this module imports on any
machine. Every parallel linear is built from the plan: column layers never gather (``gather_output=False``),
row layers take the column layers' shards (``input_is_parallel=True``) and, under sequence parallelism,
reduce-scatter along dim 1 when their output returns to the residual stream. The model keeps ``[B, T, D]``:
NxD's sequence-first default is overridden with ``sequence_dimension=1`` and residual branches gather the whole
sequence at their input (as the PyTorch engine does). Weights are copied from the plain model, so a run starts
from exactly the weights a single process would.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

from bmojo.config import BmojoConfig
from bmojo.model.modeling import BmojoForCausalLM
from bmojo.parallel.checkpoint import LAYOUT_FILE, LayoutMismatchError, describe_layout
from bmojo.parallel.convert import NXD_TAG
from bmojo.parallel.layout import Layout
from bmojo.parallel.plan import Output, ParallelPlan, ShardSpec, bmojo_plan, check_plan_fits
from bmojo.parallel.ssm_shard import localize_ssm_sizes, share_norm_groups
from bmojo.parallel.stage import CausalLMWithLoss
from bmojo.parallel.tensor_parallel import divide_attributes, sum_shared_rows
from bmojo.parallel.torch_engine import StepLosses

INSTALL_HINT = (
    "the NxD engine needs neuronx-distributed from the Neuron SDK 2.28 environment (torch-neuronx 2.9, "
    "neuronx-distributed 0.17; see launch/ and the Dockerfile); on CPU or GPU use backend.engine=torch"
)


class _RemovedHFTracer(torch.fx.Tracer):
    """Registered as ``transformers.utils.fx.HFTracer`` where transformers (5 and later) no longer has it."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("transformers 5 removed HFTracer; the NxD engine traces with tracer_cls='torch'")


def _register_removed_hf_tracer() -> None:
    """NxD 0.17 imports ``transformers.utils.fx.HFTracer`` at module level (``pipeline/trace.py``, reached from
    ``import neuronx_distributed``), and transformers 5 removed that module. The engine traces with NxD's torch
    tracer, so a module whose ``HFTracer`` refuses to be built lets NxD import."""
    if importlib.util.find_spec("transformers") is None or "transformers.utils.fx" in sys.modules:
        return
    if importlib.util.find_spec("transformers.utils.fx") is not None:
        return
    module = types.ModuleType("transformers.utils.fx")
    module.HFTracer = _RemovedHFTracer
    sys.modules["transformers.utils.fx"] = module


def import_nxd_layers() -> SimpleNamespace:
    """The parts of ``neuronx_distributed.parallel_layers`` the plan is applied with, imported now."""
    _register_removed_hf_tracer()
    try:
        from neuronx_distributed.parallel_layers import grads, layers, mappings, parallel_state, utils
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return SimpleNamespace(grads=grads, layers=layers, mappings=mappings, state=parallel_state, utils=utils)


def import_nxd() -> SimpleNamespace:
    """:func:`import_nxd_layers` and NxD's trainer API (``neuronx_distributed.trainer``; they need torch-xla)."""
    api = import_nxd_layers()
    try:
        api.nxd = importlib.import_module("neuronx_distributed.trainer")
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return api


def gradient(param: torch.Tensor) -> torch.Tensor | None:
    """The gradient NxD's optimizer will read: ``param.grad``, or ``param.main_grad`` where ZeRO-1's fp32
    accumulation hooks moved it (they leave ``grad`` None after backward), as NxD's own gradient reads do."""
    return param.grad if param.grad is not None else getattr(param, "main_grad", None)


def _replace(root: nn.Module, fqn: str, module: nn.Module) -> None:
    owner_name, _, name = fqn.rpartition(".")
    setattr(root.get_submodule(owner_name) if owner_name else root, name, module)


def _copy_slice(target: torch.Tensor, full: torch.Tensor, spec: ShardSpec, rank: int, size: int) -> None:
    with torch.no_grad():
        target.copy_(spec.local(full.detach(), rank, size))


class _ContiguousGradient(torch.autograd.Function):
    """Identity forward; the backward makes the incoming gradient contiguous."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _contiguous_at_both_ends(layer: nn.Module) -> None:
    """NxD's parallel linears flatten their 3-D input and output gradient with ``view`` in the backward, which
    fails on the transposed views the SSM's convolution produces: both are made contiguous at the layer."""
    layer.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
    layer.register_forward_hook(lambda _module, _args, output: _ContiguousGradient.apply(output))


def _batch_first(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
    """[T/tp, B, D] -> [B, T/tp, D]: the sequence-parallel embedding's output in the model's layout."""
    return output.transpose(0, 1)


class _PlanApplier:
    """Replaces the plan's modules of ``model`` by NxD parallel layers holding this rank's slices."""

    def __init__(self, api: SimpleNamespace, plan: ParallelPlan, sequence_parallel: bool):
        self.api, self.plan, self.sequence_parallel = api, plan, sequence_parallel
        self.rank = api.state.get_tensor_model_parallel_rank()
        self.size = api.state.get_tensor_model_parallel_size()

    def apply(self, model: nn.Module) -> None:
        for rule in self.plan.rules:
            module = model.get_submodule(rule.fqn)
            handler = getattr(self, f"_{rule.role.value}")
            handler(model, rule, module)
        if model.config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight

    def _linear_slices(self, fqn: str, source: nn.Linear, target: nn.Module, copy: bool = True) -> nn.Module:
        _contiguous_at_both_ends(target)
        if not copy:
            return target
        _copy_slice(target.weight, source.weight, self.plan.spec(f"{fqn}.weight"), self.rank, self.size)
        if source.bias is not None:
            _copy_slice(target.bias, source.bias, self.plan.spec(f"{fqn}.bias"), self.rank, self.size)
        return target

    def _column_layer(self, fqn: str, source: nn.Linear, sequence_parallel: bool, copy: bool = True) -> nn.Module:
        layer = self.api.layers.ColumnParallelLinear(
            source.in_features,
            source.out_features,
            bias=source.bias is not None,
            gather_output=False,
            dtype=source.weight.dtype,
            sequence_parallel_enabled=sequence_parallel,
            sequence_dimension=1 if sequence_parallel else None,
        )
        return self._linear_slices(fqn, source, layer, copy)

    def _row_layer(self, fqn: str, source: nn.Linear, output: Output) -> nn.Module:
        scatter = self.sequence_parallel and output == Output.residual
        if scatter and source.bias is not None:
            raise ValueError(f"{fqn}: a row-parallel layer that reduce-scatters its output cannot have a bias here")
        # Under SP the partial sums are reduce-scattered along dim 1 after the layer (reduce_output=False) rather
        # than inside it: the gathered gradient of NxD's reduce-scatter along dim 1 is a transposed view, which the
        # layer's backward flattens with view (contiguous on XLA, not on the CPU).
        layer = self.api.layers.RowParallelLinear(
            source.in_features,
            source.out_features,
            bias=source.bias is not None,
            input_is_parallel=True,
            dtype=source.weight.dtype,
            reduce_output=not scatter,
        )
        layer = self._linear_slices(fqn, source, layer)
        if scatter:
            reduce_scatter = self.api.mappings.reduce_scatter_to_sequence_parallel_region
            layer.register_forward_hook(lambda _module, _args, out: reduce_scatter(out, sequence_dimension=1))
        return layer

    def _column(self, model: nn.Module, rule, module: nn.Linear) -> None:
        # Inside a residual branch, whose input is already whole (see _branch).
        _replace(model, rule.fqn, self._column_layer(rule.fqn, module, sequence_parallel=False))

    def _row(self, model: nn.Module, rule, module: nn.Linear) -> None:
        _replace(model, rule.fqn, self._row_layer(rule.fqn, module, rule.output))

    def _vocab_embedding(self, model: nn.Module, rule, module: nn.Embedding) -> None:
        # NxD's embedding reduce-scatters its partial lookups only along its default sequence dimension 0, after
        # turning [B, T, D] into [T, B, D]; any other sequence_dimension returns this rank's partial lookup
        # unreduced. So it runs sequence-first and its [T/tp, B, D] output is turned back into [B, T/tp, D].
        layer = self.api.layers.ParallelEmbedding(
            module.num_embeddings,
            module.embedding_dim,
            dtype=module.weight.dtype,
            sequence_parallel_enabled=self.sequence_parallel,
            sequence_dimension=0 if self.sequence_parallel else None,
        )
        _copy_slice(layer.weight, module.weight, self.plan.spec(f"{rule.fqn}.weight"), self.rank, self.size)
        if self.sequence_parallel:
            layer.register_forward_hook(_batch_first)
        _replace(model, rule.fqn, layer)

    def _vocab_head(self, model: nn.Module, rule, module: nn.Linear) -> None:
        head = self._column_layer(rule.fqn, module, sequence_parallel=False)
        # The final norm's output is sequence-sharded under SP: gathered before the head, as a branch's input is
        # (NxD's own gather inside the head, along dim 1, hands its backward a transposed view it cannot flatten).
        self._gather_sequence_before(head)
        _replace(model, rule.fqn, head)

    def _sequence_norm(self, model: nn.Module, rule, module: nn.Module) -> None:
        if self.sequence_parallel:
            # NxD's optimizer sums these gradients over tensor-parallel ranks (each saw part of the sequence).
            for param in module.parameters():
                param.sequence_parallel_enabled = True

    def _branch(self, model: nn.Module, rule, module: nn.Module) -> None:
        self._gather_sequence_before(module)

    def _gather_sequence_before(self, module: nn.Module) -> None:
        """Under SP, ``module`` gets the whole sequence [B, T, D] of its sequence-sharded input [B, T/tp, D]."""
        if not self.sequence_parallel:
            return
        gather = self.api.mappings.gather_from_sequence_parallel_region

        def whole_sequence(_module: nn.Module, args: tuple) -> tuple:
            # to_model_parallel=False: the column layers inside already sum the input gradient over ranks.
            whole = gather(args[0], sequence_dimension=1, to_model_parallel=False)
            return (whole.contiguous(), *args[1:])

        module.register_forward_pre_hook(whole_sequence)

    def _heads(self, model: nn.Module, rule, module: nn.Module) -> None:
        divide_attributes(module, rule.divide, self.size)

    def _ssm(self, model: nn.Module, rule, module: nn.Module) -> None:
        prefix = rule.fqn
        in_spec = self.plan.spec(f"{prefix}.in_proj.weight")
        local_rows = in_spec.local(module.in_proj.weight.detach(), self.rank, self.size).shape[0]
        # With fewer B/C groups than ranks each rank keeps its group whole, so a rank's rows are not out/size:
        # the layer is sized from the local rows (its weights are copied from the plan's slices anyway).
        source = nn.Linear(module.in_proj.in_features, local_rows * self.size, bias=False)
        in_proj = self._column_layer(f"{prefix}.in_proj", source, sequence_parallel=False, copy=False)
        _copy_slice(in_proj.weight, module.in_proj.weight, in_spec, self.rank, self.size)
        module.in_proj = in_proj
        module.out_proj = self._row_layer(f"{prefix}.out_proj", module.out_proj, rule.output)
        for name, spec in self.plan.param_specs.items():
            if not name.startswith(prefix + ".") or ".in_proj." in name or ".out_proj." in name:
                continue
            relative = name[len(prefix) + 1 :]
            owner_name, _, param_name = relative.rpartition(".")
            owner = module.get_submodule(owner_name)
            full = getattr(owner, param_name)
            local = nn.Parameter(spec.local(full.detach(), self.rank, self.size), requires_grad=full.requires_grad)
            self.api.utils.set_tensor_model_parallel_attributes(local, is_parallel=True, dim=spec.dim, stride=1)
            setattr(owner, param_name, local)
        mappings = self.api.mappings

        def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
            # Summed forward (reduce) and backward (copy): every rank feeds and reads the group statistic.
            return mappings.copy_to_tensor_model_parallel_region(mappings.reduce_from_tensor_model_parallel_region(x))

        share_norm_groups(module, module.num_groups, self.rank, self.size, sum_over_ranks)
        localize_ssm_sizes(module, self.size)


def build_parallel_model(
    api: SimpleNamespace,
    plan: ParallelPlan,
    config: BmojoConfig,
    weights: dict[str, torch.Tensor] | None,
    sequence_parallel: bool,
) -> CausalLMWithLoss:
    """This rank's model: ``plan`` applied with NxD's layers (``api``: :func:`import_nxd_layers`) to a model of
    ``config`` holding ``weights`` (a full state dict; None: the config's initialisation), with the
    vocab-parallel loss. NxD's tensor-parallel groups must be initialised. forward(input_ids [B, T], labels
    [B, T]) -> (loss, weighted auxiliary loss), both scalars."""
    from bmojo.parallel.nxd_loss import VocabParallelLMLoss

    model = BmojoForCausalLM(config)
    if weights is not None:
        model.load_state_dict(weights)
    _PlanApplier(api, plan, sequence_parallel).apply(model)
    return CausalLMWithLoss(model, plan, VocabParallelLMLoss())


class NxDEngine:
    """Builds, trains and checkpoints a B'MOJO model through NxD's trainer API, with the interface of
    :class:`~bmojo.parallel.torch_engine.TorchEngine` (the parallel trainer drives both).

    Usage on a Neuron host (one process per NeuronCore under torchrun, ``init_process_group("xla")`` first)::

        engine = NxDEngine(layout, max_grad_norm=1.0)
        model = engine.parallelize(full_model)            # NxDModel (NxDPPModel inside when pipelined)
        optimizer = engine.build_optimizer(torch.optim.AdamW, param_groups, lr=3e-4)
        losses = engine.train_step(batches); optimizer.step(); optimizer.zero_grad(); xm.mark_step()

    Losses stay device tensors (read them in a step closure); NxD's optimizer reduces the gradients over
    data-parallel ranks and clips them at ``max_grad_norm`` (its ``grad_norm`` is the norm before clipping).
    """

    def __init__(self, layout: Layout, max_grad_norm: float | None = 1.0):
        self.api = import_nxd()
        self.layout = layout
        self.max_grad_norm = max_grad_norm
        self.plan: ParallelPlan | None = None
        self.model = None
        self.nxd_config: dict | None = None

    def _pipeline_config(self, plan: ParallelPlan) -> dict:
        return {
            "transformer_layer_cls": plan.unit_class,
            "num_microbatches": self.layout.microbatches,
            "output_loss_value_spec": (True, False),
            "input_names": ["input_ids", "labels"],
            "pipeline_cuts": plan.pipeline_cuts(self.layout.pipeline_parallel),
            "leaf_module_cls": [cls.__name__ for cls in plan.leaf_classes],
            "tracer_cls": "torch",
            "use_zero1_optimizer": self.layout.zero1,
            # The mean loss on every stage, averaged over data-parallel ranks, left on the device.
            "broadcast_and_average_loss": True,
            "return_loss_on_cpu": False,
        }

    def parallelize(self, model: BmojoForCausalLM, seq_len: int | None = None):
        """The parallel model holding this rank's share of ``model``'s weights (built alike on every rank)."""
        return self.build(model.config, weights=model.state_dict(), seq_len=seq_len)

    def build(self, config: BmojoConfig, weights: dict[str, torch.Tensor] | None = None, seq_len: int | None = None):
        """The parallel model. ``weights``: a full state dict to start from (else the config's initialisation)."""
        layout = self.layout
        if layout.schedule != "1f1b":
            raise ValueError("the NxD engine runs NxD's 1F1B pipeline schedule; set parallel.schedule=1f1b")
        if config.tie_word_embeddings and layout.pipeline_parallel > 1:
            raise ValueError(
                "NxD's pipeline cannot share the embedding between the first and last stage (its known issue: the "
                "shared weight gets no gradient); set model.tie_word_embeddings=false"
            )
        check_plan_fits(config, layout.tensor_parallel, layout.sequence_parallel, seq_len)
        with torch.device("meta"):
            self.plan = bmojo_plan(BmojoForCausalLM(config))
        self.nxd_config = self.api.nxd.neuronx_distributed_config(
            tensor_parallel_size=layout.tensor_parallel,
            pipeline_parallel_size=layout.pipeline_parallel,
            pipeline_config=self._pipeline_config(self.plan) if layout.pipeline_parallel > 1 else None,
            optimizer_config={
                "zero_one_enabled": layout.zero1,
                "grad_clipping": True,
                "max_grad_norm": self._clip_norm,
            },
            activation_checkpoint_config=self.plan.unit_class if layout.activation_checkpointing else None,
            sequence_parallel=layout.sequence_parallel,
        )
        self.model = self.api.nxd.initialize_parallel_model(self.nxd_config, self._model_fn, False, config, weights)
        return self.model

    def _model_fn(self, config: BmojoConfig, weights: dict[str, torch.Tensor] | None) -> CausalLMWithLoss:
        return build_parallel_model(self.api, self.plan, config, weights, self.layout.sequence_parallel)

    def build_optimizer(self, optimizer_class: type[torch.optim.Optimizer], param_groups, **defaults):
        """``NxDOptimizer``: ZeRO-1 when the layout asks, gradient clipping at ``max_grad_norm``."""
        if self.layout.zero1:
            # NxD hands the ZeRO-1 optimizer its own settings but not optimizer_config's max_grad_norm, so it
            # would clip at torch-xla's default of 1; its keyword arguments reach the ZeRO-1 optimizer.
            defaults = {**defaults, "max_norm": self._clip_norm}
        return self.api.nxd.initialize_parallel_optimizer(self.nxd_config, optimizer_class, param_groups, **defaults)

    @property
    def _clip_norm(self) -> float:
        """Clipping at infinity when none is asked for still gives the optimizer's grad_norm."""
        return math.inf if self.max_grad_norm is None else self.max_grad_norm

    def named_parameters(self):
        """This rank's parameters, as NxD's model reports them."""
        return self.model.named_parameters()

    @property
    def dp_rank(self) -> int:
        return self.api.state.get_data_parallel_rank()

    @property
    def device(self) -> torch.device:
        """Where NxD put the model (the XLA device)."""
        return next(self.model.parameters()).device

    def train_step(self, batches: torch.Tensor, labels: torch.Tensor | None = None) -> StepLosses:
        """Forward and backward of one optimizer step. batches: [microbatches, B, T] token ids (on any device),
        this data-parallel rank's share; labels: the same shape, unshifted, -100 ignored (None: the inputs).

        Returns device tensors, the mean over micro-batches and data-parallel ranks (reading them here would cut
        the graph). Under pipeline parallelism NxD returns only the loss it trained on, so ``lm_loss`` holds the
        weighted auxiliary loss too and ``aux_loss`` is zero.
        """
        return self._run(batches, labels, train=True)

    @torch.no_grad()
    def eval_step(self, batches: torch.Tensor, labels: torch.Tensor | None = None) -> StepLosses:
        """The losses of ``batches`` without gradients, as :meth:`train_step` returns them."""
        return self._run(batches, labels, train=False)

    def _run(self, batches: torch.Tensor, labels: torch.Tensor | None, train: bool) -> StepLosses:
        if batches.ndim != 3 or batches.shape[0] != self.layout.microbatches:
            raise ValueError(
                f"expected [microbatches={self.layout.microbatches}, batch, seq] token ids, "
                f"got shape {tuple(batches.shape)}"
            )
        labels = batches if labels is None else labels
        device = self.device
        self.model.train(train)
        if self.layout.pipeline_parallel > 1:
            run = self.model.run_train if train else self.model.run_eval
            loss = run(input_ids=batches.flatten(0, 1).to(device), labels=labels.flatten(0, 1).to(device))
            losses = torch.stack([loss.detach().float().to(device), torch.zeros((), device=device)])
        else:
            losses = torch.zeros(2, device=device)
            count = len(batches)
            # One transfer per micro-batch: each is a graph input of its own.
            for micro, micro_labels in zip(batches, labels, strict=True):
                loss, weighted_aux = self.model(input_ids=micro.to(device), labels=micro_labels.to(device))
                if train:
                    (loss / count).backward()
                losses = losses + torch.stack([loss - weighted_aux, weighted_aux]).detach().float() / count
            if self.layout.data_parallel > 1:
                dist.all_reduce(losses, group=self.api.state.get_data_parallel_group())
                losses = losses / self.layout.data_parallel
        if train:
            self._sum_partial_gradients()
        return StepLosses(lm_loss=losses[0], aux_loss=losses[1])

    def finite(self, losses: StepLosses) -> torch.Tensor:
        """A device bool: the step's losses and every rank's gradients are finite, agreed by every rank.

        Computed in the step's graph, so a step can drop its update without a host read: zero the gradients
        (:func:`gradient`) where it is False before ``optimizer.step()`` (NxD reduces and clips them there).
        """
        checks = [torch.isfinite(losses.lm_loss + losses.aux_loss)]
        grads = [gradient(p) for _, p in self.named_parameters()]
        checks += [torch.isfinite(grad).all() for grad in grads if grad is not None]
        bad = (~torch.stack(checks).all()).float()
        dist.all_reduce(bad)
        return bad == 0

    def _sum_partial_gradients(self) -> None:
        if self.layout.tensor_parallel > 1:
            sum_partial_gradients(self.api, self.plan, self.model)

    def save(self, folder: Path, optimizer=None) -> None:
        """Write checkpoint ``folder`` (collective): NxD's checkpoint under the tag ``nxd`` (per-rank files, ZeRO-1
        shards, NxD's ``newest``) and ``layout.json`` recording the layout, written by global rank 0."""
        self.api.nxd.save_checkpoint(
            str(folder), NXD_TAG, model=self.model, optimizer=optimizer, zero1_optimizer=self.layout.zero1
        )
        if self.api.state.is_global_rank_zero():
            (Path(folder) / LAYOUT_FILE).write_text(json.dumps(describe_layout(self, "nxd"), indent=1))

    def load(self, folder: Path, optimizer=None) -> None:
        """Restore what :meth:`save` wrote into ``folder``, under the same tensor/pipeline split."""
        path = Path(folder) / LAYOUT_FILE
        if not path.is_file():
            raise LayoutMismatchError(f"{folder} has no {LAYOUT_FILE}: it was not written by this engine")
        recorded = json.loads(path.read_text())
        if recorded.get("engine") != "nxd":
            raise LayoutMismatchError(
                f"{folder} was written by the {recorded.get('engine')} engine, not NxD: start a new run folder from "
                f"its weights with trainer.init_from={folder}"
            )
        saved = {k: recorded["layout"][k] for k in ("tensor_parallel", "pipeline_parallel")}
        if saved != self.layout.sharding():
            raise LayoutMismatchError(
                f"{folder} was written with {saved} but this run uses {self.layout.sharding()}. Its optimizer "
                "states are NxD's ZeRO-1 shards, which no converter rewrites: resume with "
                f"parallel.tensor_parallel_size={saved['tensor_parallel']} "
                f"parallel.pipeline_parallel_size={saved['pipeline_parallel']}, or start a new run from its "
                f"weights with trainer.init_from={folder}"
            )
        # The model first: NxD loads the optimizer before the model, and ZeRO-1's load_state_dict re-shards its
        # master weights from the parameters as they are then, which a later step would write back.
        self.api.nxd.load_checkpoint(str(folder), tag=NXD_TAG, model=self.model)
        if optimizer is not None:
            self.api.nxd.load_checkpoint(str(folder), tag=NXD_TAG, optimizer=optimizer)


def sum_partial_gradients(api: SimpleNamespace, plan: ParallelPlan, model: nn.Module) -> None:
    """Sum over tensor-parallel ranks the gradients each rank computed only for its own heads: replicated
    ``partial_grad`` parameters and B/C rows shared by several ranks (``api``: :func:`import_nxd_layers`)."""
    group = api.state.get_tensor_model_parallel_group()
    rank, size = api.state.get_tensor_model_parallel_rank(), api.state.get_tensor_model_parallel_size()
    for name, param in model.named_parameters():
        grad = gradient(param)
        if grad is None:
            continue
        spec = plan.spec(_model_name(name))
        if spec.partial_grad:
            dist.all_reduce(grad, group=group)
        sum_shared_rows(grad, spec, rank, size, group)


def _model_name(name: str) -> str:
    """A parameter name of the NxD model as the plan knows it: ``NxDModel`` reports the model's own names, but
    activation checkpointing inserts its wrapper's attribute.
    """
    return name.replace("_checkpoint_wrapped_module.", "")
