"""The PyTorch engine: the parallel plan on ``torch.distributed`` (gloo on CPU, nccl on GPU).

Order of application (as in torchtitan): pipeline split -> tensor/sequence parallelism -> activation
checkpointing -> FSDP2 over the data-parallel ranks. The mesh is ``[pp, dp, tp]``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import loss_parallel

from bmojo.model.modeling import BmojoForCausalLM
from bmojo.parallel.checkpoint import load_sharded, save_sharded
from bmojo.parallel.layout import Layout
from bmojo.parallel.plan import ParallelPlan, bmojo_plan, check_plan_fits
from bmojo.parallel.stage import CausalLMStage
from bmojo.parallel.tensor_parallel import (
    apply_tensor_parallel,
    from_tensor_parallel_local,
    sum_shared_rows,
    tensor_parallel_local,
)


@dataclass
class StepLosses:
    """Mean over the step's micro-batches and data-parallel ranks, the same on every rank: floats from this
    engine, device tensors from the NxD engine (read at logging points only)."""

    lm_loss: float | torch.Tensor
    aux_loss: float | torch.Tensor  # weighted, as added to the loss


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, tp_mesh: DeviceMesh | None
) -> torch.Tensor:
    """Next-token cross-entropy. logits: [B, T, V'] (this rank's vocabulary shard), labels: [B, T] unshifted,
    -100 ignored. With ``tp_mesh`` the softmax spans the vocabulary shards (call inside ``loss_parallel()``).
    """
    shifted = logits[:, :-1].flatten(0, 1).float()
    targets = labels[:, 1:].flatten()
    if tp_mesh is None:
        return F.cross_entropy(shifted, targets, ignore_index=-100)
    shifted = DTensor.from_local(shifted, tp_mesh, [Shard(1)], run_check=False)
    return F.cross_entropy(shifted, targets, ignore_index=-100).to_local()


class TorchEngine:
    """Runs one rank's share of a :class:`BmojoForCausalLM` under ``layout``.

    Call :meth:`parallelize` with the full model (built identically on every rank, e.g. from one seed), build
    the optimizer over :meth:`parameters`, then per optimizer step :meth:`train_step`,
    :meth:`clip_grad_norm_` and ``optimizer.step()``.
    """

    def __init__(self, layout: Layout, device: torch.device | str = "cpu"):
        if not dist.is_initialized():
            raise RuntimeError("TorchEngine needs torch.distributed initialised first (torchrun sets it up)")
        if dist.get_world_size() != layout.world_size:
            raise ValueError(
                f"the layout needs pp*dp*tp = {layout.world_size} processes but {dist.get_world_size()} were started"
            )
        self.layout = layout
        self.device = torch.device(device)
        self.mesh = init_device_mesh(
            self.device.type,
            (layout.pipeline_parallel, layout.data_parallel, layout.tensor_parallel),
            mesh_dim_names=("pp", "dp", "tp"),
        )
        self.pp_rank, self.dp_rank, self.tp_rank = layout.coordinates(dist.get_rank())
        self.tp_mesh = self.mesh["tp"] if layout.tensor_parallel > 1 else None
        self.plan: ParallelPlan | None = None
        self.stage: CausalLMStage | None = None
        self._schedule = None
        self._recorded: list[tuple[torch.Tensor, torch.Tensor]] = []

    # ------------------------------------------------------------------ build
    def parallelize(self, model: BmojoForCausalLM, seq_len: int | None = None) -> CausalLMStage:
        """Keep this rank's share of ``model`` and wire its collectives. Returns the local stage module."""
        layout = self.layout
        check_plan_fits(model.config, layout.tensor_parallel, layout.sequence_parallel, seq_len)
        if model.config.tie_word_embeddings and layout.pipeline_parallel > 1:
            raise ValueError(
                "tie_word_embeddings=True puts the shared embedding on the first and the last pipeline stage; "
                "set model.tie_word_embeddings=false to train with pipeline_parallel_size > 1"
            )
        self.plan = bmojo_plan(model)
        units = self.plan.stage_units(layout.pipeline_parallel)[self.pp_rank]
        stage = CausalLMStage(model, self.plan, units).to(self.device)
        if self.tp_mesh is not None:
            apply_tensor_parallel(stage, self.plan, self.tp_mesh, layout.sequence_parallel)
        stage.activation_checkpointing = layout.activation_checkpointing
        if layout.data_parallel > 1:
            reshard = not (layout.zero1 or layout.pipeline_parallel > 1)
            for unit in stage.units():
                fully_shard(unit, mesh=self.mesh["dp"], reshard_after_forward=reshard)
            fully_shard(stage, mesh=self.mesh["dp"], reshard_after_forward=reshard)
        self.stage = stage
        if layout.pipeline_parallel > 1:
            self._schedule = self._build_schedule(stage)
        return stage

    def _build_schedule(self, stage: CausalLMStage):
        pipeline_stage = PipelineStage(
            stage, self.pp_rank, self.layout.pipeline_parallel, self.device, group=self.mesh["pp"].get_group()
        )
        schedule_class = Schedule1F1B if self.layout.schedule == "1f1b" else ScheduleGPipe
        return schedule_class(pipeline_stage, self.layout.microbatches, loss_fn=self._loss_fn)

    def _loss_fn(self, output: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        logits, aux = output
        lm = vocab_parallel_cross_entropy(logits, labels, self.tp_mesh)
        weighted_aux = aux * self.stage.config.aux_loss_weight
        self._recorded.append((lm.detach(), weighted_aux.detach()))
        return lm + weighted_aux

    # ------------------------------------------------------------------ parameters
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters under the model's FQNs (each shared parameter once)."""
        yield from self.stage.named_parameters()

    def parameters(self) -> Iterator[nn.Parameter]:
        for _, param in self.named_parameters():
            yield param

    # ------------------------------------------------------------------ step
    def train_step(self, batches: torch.Tensor, labels: torch.Tensor | None = None) -> StepLosses:
        """Forward and backward over one optimizer step. batches: [microbatches, B, T] token ids, this data-parallel
        rank's share; labels: the same shape, unshifted, -100 ignored (None: the inputs). Gradients are left in
        ``.grad``, averaged over micro-batches and ranks.
        """
        return self._run(batches, labels, train=True)

    @torch.no_grad()
    def eval_step(self, batches: torch.Tensor, labels: torch.Tensor | None = None) -> StepLosses:
        """Losses of ``batches`` ([microbatches, B, T], this data-parallel rank's share) without gradients."""
        return self._run(batches, labels, train=False)

    def _run(self, batches: torch.Tensor, labels: torch.Tensor | None, train: bool) -> StepLosses:
        if batches.ndim != 3 or batches.shape[0] != self.layout.microbatches:
            raise ValueError(
                f"expected [microbatches={self.layout.microbatches}, batch, seq] token ids, "
                f"got shape {tuple(batches.shape)}"
            )
        if labels is not None and labels.shape != batches.shape:
            raise ValueError(f"labels of shape {tuple(labels.shape)} for token ids of shape {tuple(batches.shape)}")
        batches = batches.to(self.device)
        labels = batches if labels is None else labels.to(self.device)
        self._recorded.clear()
        self.stage.train(train)
        with loss_parallel() if self.tp_mesh is not None else nullcontext():
            if self._schedule is None:
                for micro, micro_labels in zip(batches, labels, strict=True):
                    loss = self._loss_fn(self.stage(micro), micro_labels)
                    if train:
                        (loss / len(batches)).backward()
            else:
                flat = batches.flatten(0, 1)
                inputs = (flat,) if self.stage.is_first else ()
                run = self._schedule.step if train else self._schedule.eval
                run(*inputs, target=labels.flatten(0, 1) if self.stage.is_last else None, return_outputs=False)
        if train:
            self._finish_gradients()
        return self._step_losses()

    def _step_losses(self) -> StepLosses:
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # on the device: nccl reduces no CPU tensor
        # The pipeline's first step also calls the loss on placeholder outputs to size its buffers: the step's
        # own losses are the last ``microbatches`` recorded.
        recorded = self._recorded[-self.layout.microbatches :]
        for lm, aux in recorded:
            sums += torch.stack([lm.double(), aux.double()])
        if recorded:
            sums /= len(recorded)
        if self.layout.pipeline_parallel > 1:
            # Only the last stage computed the loss: it reaches the other stages by a sum over the pipeline.
            dist.all_reduce(sums, group=self.mesh["pp"].get_group())
        if self.layout.data_parallel > 1:
            dist.all_reduce(sums, group=self.mesh["dp"].get_group())
            sums /= self.layout.data_parallel
        return StepLosses(lm_loss=float(sums[0]), aux_loss=float(sums[1]))

    def _finish_gradients(self) -> None:
        """Give every DTensor gradient its parameter's placements (a vocab-parallel embedding's comes back
        replicated), and add up over tensor-parallel ranks the gradients each rank computed only for its own heads:
        replicated ``partial_grad`` parameters and B/C rows shared by several ranks.
        """
        if self.tp_mesh is None:
            return
        group, size = self.tp_mesh.get_group(), self.layout.tensor_parallel
        for name, param in self.named_parameters():
            grad = param.grad
            if grad is None:
                continue
            if isinstance(grad, DTensor) and grad.placements != param.placements:
                param.grad = grad = grad.redistribute(placements=param.placements)
            spec = self.plan.spec(name)
            if spec.partial_grad:
                dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, group=group)
            if spec.shared_rows(size):
                whole = tensor_parallel_local(grad)
                sum_shared_rows(whole, spec, self.tp_rank, size, group)
                if isinstance(grad, DTensor):
                    grad.to_local().copy_(from_tensor_parallel_local(whole, grad))

    def clip_grad_norm_(self, max_norm: float | None) -> float:
        """Global L2 norm of the gradients over every rank's share, each element counted once; clips in place."""
        tp_size = self.layout.tensor_parallel
        # Squares of: tensor-sharded slices, replicated tensors, and slices gathered whole over data parallelism.
        sharded, replicated, whole = (torch.zeros((), dtype=torch.float64, device=self.device) for _ in range(3))
        grads = []
        for name, param in self.named_parameters():
            if param.grad is None:
                continue
            grads.append(param.grad)
            spec = self.plan.spec(name)
            if tp_size > 1 and spec.shared_rows(tp_size):
                squares = tensor_parallel_local(param.grad).detach().double().pow(2)
                for start, stop, parts in spec.shared_rows(tp_size):
                    squares.narrow(spec.dim, start, stop - start).mul_(parts / tp_size)  # kept by tp/parts ranks
                whole += squares.sum()
                continue
            local = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
            square = local.detach().double().pow(2).sum()
            if self._tensor_sharded(name, param):
                sharded += square
            else:
                replicated += square
        if self.tp_mesh is not None:
            dist.all_reduce(sharded, group=self.tp_mesh.get_group())
            dist.all_reduce(whole, group=self.tp_mesh.get_group())
        total = sharded + replicated
        if self.layout.data_parallel > 1:  # FSDP2 keeps one dim-0 slice of every gradient per rank
            dist.all_reduce(total, group=self.mesh["dp"].get_group())
        total += whole
        if self.layout.pipeline_parallel > 1:
            dist.all_reduce(total, group=self.mesh["pp"].get_group())
        norm = float(total.sqrt())
        # The same coefficient as torch.nn.utils.clip_grad_norm_, so one process and many clip alike.
        scale = 1.0 if max_norm is None else min(1.0, max_norm / (norm + 1e-6))
        if math.isfinite(norm) and scale < 1.0:
            for grad in grads:
                grad.mul_(scale)
        return norm

    # ------------------------------------------------------------------ checkpoints
    def save(self, folder: Path, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Write weights and optimizer state with the layout (collective); see :mod:`bmojo.parallel.checkpoint`."""
        save_sharded(folder, self, optimizer)

    def load(self, folder: Path, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Restore what :meth:`save` wrote; a checkpoint of another tensor/pipeline split names its converter."""
        load_sharded(folder, self, optimizer)

    def _tensor_sharded(self, name: str, param: torch.Tensor) -> bool:
        if isinstance(param, DTensor) and "tp" in (param.device_mesh.mesh_dim_names or ()):
            tp_dim = param.device_mesh.mesh_dim_names.index("tp")
            return param.placements[tp_dim].is_shard()
        return self.tp_mesh is not None and self.plan.spec(name).sharded
