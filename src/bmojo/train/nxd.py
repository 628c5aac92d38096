"""Training on several trn1 NeuronCores through the NxD engine (docs/trn1.md, docs/parallel.md).

:class:`NxDTrainer` is the parallel trainer (model built from the run's seed on every process, data-parallel
shares of every step, checkpoints of every rank's shards published by process 0) on the XLA device, with the
XLA trainer's step: one graph per optimizer step ended by a graph cut, losses and counters read in a step
closure at logging points only, and a non-finite step dropped on the device. The engine builds the model with
``neuronx_distributed_config`` / ``initialize_parallel_model`` and the optimizer with
``initialize_parallel_optimizer`` (ZeRO-1 when the layout asks), which reduces the gradients over
data-parallel ranks and clips them inside ``step``. Host values (objects, barriers, the stop flag) travel over a
gloo group, so no collective reads the device.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging

import torch
import torch.distributed as dist

from bmojo import BmojoForCausalLM
from bmojo.data import PackedData
from bmojo.parallel.nxd_engine import gradient
from bmojo.train.config import Precision
from bmojo.train.distributed import ParallelTrainer
from bmojo.train.trainer import TrainSummary
from bmojo.train.xla import XlaTrainer, cast_parameters_to_bf16, import_torch_xla, sync

logger = logging.getLogger(__name__)


class NxDTrainer(XlaTrainer, ParallelTrainer):
    """The :class:`ParallelTrainer` on trn1 through :class:`bmojo.parallel.nxd_engine.NxDEngine`."""

    def _start_processes(self) -> tuple[int, int]:
        runtime = import_torch_xla().runtime
        if not dist.is_initialized():
            importlib.import_module("torch_xla.distributed.xla_backend")  # registers the "xla" backend
            dist.init_process_group("xla")
        self.host_group = dist.new_group(backend="gloo")
        return runtime.global_ordinal(), runtime.world_size()

    def _parallelize(self, model: BmojoForCausalLM):
        if self.config.trainer.precision == Precision.bf16:
            cast_parameters_to_bf16(model)  # the engine copies each rank's slices into layers of the same dtype
        return super()._parallelize(model)

    def _optimizer(self, optimizer_class: type[torch.optim.Optimizer], groups: list[dict], **defaults):
        return self.engine.build_optimizer(optimizer_class, groups, **defaults)

    def _restore(self, folder) -> None:
        # The engine loads NxD's own checkpoint into the device model: no host copy as on one XLA device.
        ParallelTrainer._restore(self, folder)

    def _train_step(self) -> dict[str, float] | None:
        step_blocks = self.loader.next_step()
        losses = self.engine.train_step(step_blocks, self._labels(step_blocks))
        finite = self.engine.finite(losses)
        for _, parameter in self.engine.named_parameters():
            grad = gradient(parameter)
            if grad is not None:
                # As on one XLA device: a non-finite step updates from zero gradients, decided on the device.
                grad.masked_fill_(~finite, 0.0)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()  # NxD's: reduces over data-parallel ranks, clips, keeps the norm before clipping
        grad_norm = self.optimizer.grad_norm
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += self.loader.global_batch * self.data.seq_len
        reading = self._end_step(losses.lm_loss, losses.aux_loss, grad_norm, finite, lr)
        self._agree_on_stop()
        return reading

    @torch.no_grad()
    def evaluate(self, data: PackedData | None = None) -> float:
        """Mean held-out loss over the blocks :meth:`ParallelTrainer.evaluate` takes; a graph per evaluation step
        and one host read at the end."""
        total, steps = torch.zeros((), device=self.device), 0
        for blocks in self._eval_steps(data or self.data):
            total = total + self.engine.eval_step(blocks, self._labels(blocks)).lm_loss
            steps += 1
            sync()
        return float(total) / steps

    def _loop(self, cfg) -> TrainSummary:
        if cfg.export_at_end or cfg.sample_tokens > 0:
            if self.is_main:
                logger.warning(
                    "no export or sample at the end: the checkpoints hold NxD's own per-rank files; merge one with "
                    "python -m bmojo.parallel.convert (set trainer.export_at_end=false trainer.sample_tokens=0 to "
                    "silence this)"
                )
            cfg = dataclasses.replace(cfg, export_at_end=False, sample_tokens=0)
        return super()._loop(cfg)
