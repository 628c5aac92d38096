"""Training on an XLA device: trn1 through the Neuron SDK, or the CPU in the XLA test lane (DESIGN §6).

XLA records the operations of a step lazily and compiles each distinct graph once, so the trainer here
keeps every step the same graph: fixed shapes, no host reads inside the step (losses and counters are read
in a step closure, only at logging points), and non-finite steps neutralised on the device instead of
skipped by a host-side branch. ``torch_xla`` is imported only when a device is asked for.

bf16 follows the Neuron SDK (``XLA_USE_BF16`` / ``XLA_DOWNCAST_BF16`` ended with SDK 2.24): the parameters
are cast to bf16 and the Neuron runtime rounds stochastically (``NEURON_RT_STOCHASTIC_ROUNDING_EN=1``), except
the SSM dynamics and the norm weights, which stay fp32 (:data:`FP32_PARAMETERS`).

Under ``neuron_parallel_compile`` (``NEURON_EXTRACT_GRAPHS_ONLY`` set) a run only traces its graphs and every
value it reads is zero, so such a trial run writes no checkpoint, export or sample.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import torch

from bmojo import BmojoForCausalLM
from bmojo.data import eval_batches
from bmojo.model.layers import GatedRMSNorm, RMSNorm
from bmojo.model.mamba2 import Mamba2Mixer
from bmojo.train.config import Precision
from bmojo.train.device import DeviceError, to_host
from bmojo.train.processes import is_one_process_recipe
from bmojo.train.trainer import Trainer, TrainSummary

logger = logging.getLogger(__name__)

TRIAL_RUN_VARIABLE = "NEURON_EXTRACT_GRAPHS_ONLY"
STOCHASTIC_ROUNDING_VARIABLE = "NEURON_RT_STOCHASTIC_ROUNDING_EN"
RETIRED_BF16_VARIABLES = ("XLA_USE_BF16", "XLA_DOWNCAST_BF16")
# Parameters bf16 training keeps in fp32, by the module that owns them (the modules compute with them in fp32).
# The SSM's decay exp(dt * A) compounds over the sequence, so a rounded A_log or dt_bias shifts every state
# after it: mamba_ssm advises fp32 for the recurrent dynamics. D and the norm weights are a few numbers per
# channel that scale every activation; keeping them costs next to nothing.
FP32_PARAMETERS: dict[type[torch.nn.Module], tuple[str, ...]] = {
    Mamba2Mixer: ("A_log", "dt_bias", "D"),
    RMSNorm: ("weight",),
    GatedRMSNorm: ("weight",),
}


def import_torch_xla() -> SimpleNamespace:
    """``torch_xla`` and the parts of it used here; a :class:`DeviceError` that says where to get it."""
    try:
        import torch_xla
        import torch_xla.core.xla_model as xm
        import torch_xla.debug.metrics as metrics
        import torch_xla.runtime as runtime
    except ImportError:
        raise DeviceError(
            "backend=trn1 (device xla) needs torch-xla, which is not installed here: on trn1 use the Neuron SDK "
            "environment of launch/ (or the Dockerfile); on CPU `make test-xla` builds one (PJRT_DEVICE=CPU); "
            "otherwise use backend=cpu or backend=gpu"
        ) from None
    return SimpleNamespace(torch_xla=torch_xla, xm=xm, metrics=metrics, runtime=runtime)


def xla_device() -> torch.device:
    return import_torch_xla().torch_xla.device()


def sync() -> None:
    """Cut the graph here and launch it (asynchronously); step closures run right after."""
    import_torch_xla().torch_xla.sync()


def is_trial_run() -> bool:
    """True under ``neuron_parallel_compile``, whose trial run returns zeros for every value."""
    return os.environ.get(TRIAL_RUN_VARIABLE, "").lower() not in ("", "0", "false")


def compiled_graphs() -> int:
    """How many graphs this process has compiled so far (torch-xla's ``CompileTime`` samples)."""
    data = import_torch_xla().metrics.metric_data("CompileTime")
    return int(data[0]) if data else 0


def host_fallback_ops() -> dict[str, int]:
    """Operations torch-xla ran on the host instead of in the graph (``aten::`` counters), with their counts.

    Each one copies its inputs to the host and its result back, which splits the step's graph and stalls it.
    ``aten::_local_scalar_dense`` is left out: it counts values read with ``.item()``, as logging does.
    """
    metrics = import_torch_xla().metrics
    names = [name for name in metrics.counter_names() if name.startswith("aten::")]
    return {name: metrics.counter_value(name) for name in names if name != "aten::_local_scalar_dense"}


def configure_precision(precision: Precision) -> None:
    """Check and set the environment of the Neuron runtime for ``precision``, before the device starts."""
    retired = [name for name in RETIRED_BF16_VARIABLES if os.environ.get(name, "0") not in ("", "0")]
    if retired:
        raise DeviceError(
            f"{', '.join(retired)} is no longer honoured by the Neuron SDK (since 2.24); unset it and use "
            "trainer.precision=bf16, which casts the parameters to bf16 with stochastic rounding"
        )
    if precision == Precision.bf16:
        os.environ.setdefault(STOCHASTIC_ROUNDING_VARIABLE, "1")


def fp32_parameters(model: torch.nn.Module) -> set[torch.nn.Parameter]:
    """The parameters of ``model`` that :data:`FP32_PARAMETERS` keeps in fp32 (the inner SSMs of F/B included)."""
    kept = set()
    for module in model.modules():
        for kind, names in FP32_PARAMETERS.items():
            if isinstance(module, kind):
                kept.update(getattr(module, name) for name in names)
    return kept


def cast_parameters_to_bf16(model: torch.nn.Module) -> None:
    """Parameters to bf16 in place, but :func:`fp32_parameters`; buffers (the RoPE frequencies) stay fp32 for
    exact angles. Each parameter keeps its object, so tied weights stay tied."""
    kept = fp32_parameters(model)
    for parameter in model.parameters():
        if parameter not in kept:
            parameter.data = parameter.data.to(torch.bfloat16)


def send_micro_batches(step_blocks: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """One step's blocks ``[accumulation, micro, T]`` as separate device tensors, one per micro-batch.

    Separate transfers make every micro-batch a graph input of its own; indexing one device tensor would
    bake the micro-batch's index into each graph and compile one graph per index. The transfer of step
    ``k + 1`` overlaps the device running step ``k``, whose graph was launched asynchronously.
    """
    return [micro.to(device) for micro in step_blocks]


class XlaTrainer(Trainer):
    """The :class:`Trainer` on an XLA device; a CPU copy of the model serves checkpoints, export and samples."""

    def _setup(self) -> None:
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        if processes > 1 and is_one_process_recipe(self.config.parallel):
            raise ValueError(
                f"{processes} processes were started (WORLD_SIZE) but parallel=single trains in one: each "
                "would train the same model into the same run folder; launch one process "
                "(launch/torchrun.sh --nproc 1) or pick a parallel recipe that spreads the work over the processes"
            )
        configure_precision(self.config.trainer.precision)
        self.trial_run = is_trial_run()
        if self.trial_run:
            logger.warning("%s is set: a graph-tracing trial run; no checkpoint, export or sample", TRIAL_RUN_VARIABLE)
        self._device_counters: tuple[torch.Tensor, torch.Tensor] | None = None
        self._reading: dict[str, float] | None = {}
        self._fallbacks_reported = False
        super()._setup()

    def _place_model(self, model: BmojoForCausalLM) -> BmojoForCausalLM:
        self._host = model
        placed = copy.deepcopy(model)
        if self.config.trainer.precision == Precision.bf16:
            cast_parameters_to_bf16(placed)
        placed = placed.to(self.device)
        placed.tie_weights()  # moving to an XLA device gives every module its own copy of a shared weight
        return placed

    def _host_model(self) -> BmojoForCausalLM:
        self._host.load_state_dict(to_host(self.model.state_dict()))
        return self._host

    def _restore(self, folder: Path) -> None:
        # safetensors cannot address XLA storage: the weights load into the host copy, then go to the device.
        device_model, self.model = self.model, self._host
        try:
            super()._restore(folder)
        finally:
            self.model = device_model
        self.model.load_state_dict(self._host.state_dict())

    def _save(self) -> Path | None:
        if self.trial_run:
            return None
        self._read_counters(*self._counters())
        return super()._save()

    def _counters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Device copies of (skipped steps, non-finite steps in a row), updated inside the step graph."""
        if self._device_counters is None:
            self._device_counters = (
                torch.tensor(self.skipped_steps, device=self.device),
                torch.tensor(self.nonfinite_in_a_row, device=self.device),
            )
        return self._device_counters

    def _read_counters(self, skipped: torch.Tensor, in_a_row: torch.Tensor) -> None:
        self.skipped_steps, self.nonfinite_in_a_row = int(skipped), int(in_a_row)

    def _train_step(self) -> dict[str, float] | None:
        """One optimizer step, one graph per micro-batch (the last one holds the update); reads nothing back
        except at logging steps, through a step closure. None when a logged step was not finite."""
        micro_batches = send_micro_batches(self.loader.next_step(), self.device)
        count = len(micro_batches)
        lm_loss = aux_loss = torch.zeros((), device=self.device)
        for index, micro in enumerate(micro_batches):
            out = self.model(micro, labels=micro)
            (out.loss / count).backward()
            lm_loss = lm_loss + (out.loss - out.aux_loss).detach().float() / count
            aux_loss = aux_loss + out.aux_loss.detach().float() / count
            if index < count - 1:
                sync()  # a graph per micro-batch keeps its size independent of the accumulation count
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.config.trainer.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm or float("inf"))
        finite = torch.isfinite(lm_loss + aux_loss) & torch.isfinite(grad_norm)
        for parameter in parameters:
            if parameter.grad is not None:
                # Deciding to skip would read the device; a non-finite step instead updates from zero gradients
                # (only the optimizer's momentum and weight decay move the weights) and is counted as skipped.
                parameter.grad.masked_fill_(~finite, 0.0)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += count * micro_batches[0].numel()
        return self._end_step(lm_loss, aux_loss, grad_norm, finite, lr)

    def _end_step(
        self, lm_loss: torch.Tensor, aux_loss: torch.Tensor, grad_norm: torch.Tensor, finite: torch.Tensor, lr: float
    ) -> dict[str, float] | None:
        """Count a non-finite step on the device, ask for a read at logging steps and launch the step's graph."""
        skipped, in_a_row = self._counters()
        bad = (~finite).long()
        self._device_counters = (skipped + bad, (in_a_row + 1) * bad)
        self._reading = {}  # what an unlogged step returns: nothing read, nothing known to be skipped
        if self._is_log_step():
            tensors = (lm_loss, aux_loss, grad_norm, finite, *self._device_counters)
            import_torch_xla().xm.add_step_closure(self._read_step, args=(tensors, lr))
        sync()
        return self._reading

    def _read_step(self, tensors: tuple[torch.Tensor, ...], lr: float) -> None:
        """Step closure: runs once the step's graph has run, so reading its values adds no graph."""
        lm_loss, aux_loss, grad_norm, finite, skipped, in_a_row = to_host(tensors)
        self._read_counters(skipped, in_a_row)
        self._reading = None  # a non-finite step, reported as skipped
        if bool(finite):
            reading = {"loss": float(lm_loss), "aux_loss": float(aux_loss), "grad_norm": float(grad_norm)}
            self._reading = {**reading, "lr": lr, "compiled_graphs": compiled_graphs()}
        if not self._fallbacks_reported:
            self._fallbacks_reported = True
            fallbacks = host_fallback_ops()
            if fallbacks:
                logger.warning("operations run on the host, each a round trip inside the step: %s", fallbacks)

    @torch.no_grad()
    def evaluate(self, data=None) -> float:
        """Mean held-out loss; one graph per batch and a single host read at the end."""
        data = data or self.data
        was_training = self.model.training
        self.model.eval()
        total, count = torch.zeros((), device=self.device), 0
        for batch in eval_batches(data.val, self.config.trainer.micro_batch_size, self.config.trainer.eval_batches):
            batch = batch.to(self.device)
            out = self.model(batch, labels=batch, use_cache=False)
            total = total + (out.loss - out.aux_loss).float() * batch.shape[0]
            count += batch.shape[0]
            sync()
        self.model.train(was_training)
        return float(total) / count

    def _loop(self, cfg) -> TrainSummary:
        if self.trial_run:
            cfg = dataclasses.replace(cfg, export_at_end=False, sample_tokens=0)
        return super()._loop(cfg)
