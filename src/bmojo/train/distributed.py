"""Training on several processes through a parallel engine (docs/parallel.md, "Training on several processes").

torchrun starts one process per device. Each builds the same model from the run's seed, keeps its share of it
through the engine of ``backend.engine`` under the layout of the ``parallel`` group, and reads its
data-parallel share of every step. Losses, gradient norms and the decision to skip a step come out of the
engine identical on every process, so all of them take the same path through the loop. Process 0 alone
prints, writes metrics, the run's config and tokenizer, the checkpoint's metadata and the export.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from bmojo import BmojoConfig, BmojoForCausalLM
from bmojo.data import DataError, DataSource, PackedData, prepare_data, prepare_folder, training_loader
from bmojo.data.prepared import prepared_config
from bmojo.parallel.checkpoint import LAYOUT_FILE
from bmojo.parallel.setup import build_engine, layout_from_config
from bmojo.train.checkpoint import (
    CHECKPOINTS,
    CheckpointError,
    checkpoint_paths,
    is_sharded_checkpoint,
    load_model_and_tokenizer,
    load_weights,
    publish_checkpoint,
)
from bmojo.train.config import Device, Engine, RunConfig
from bmojo.train.device import autocast, rng_state, seed_everything, select_device, set_rng_state
from bmojo.train.export import export_model, generate_sample
from bmojo.train.metrics import MetricsLog
from bmojo.train.processes import is_one_process_recipe, launched_processes, runs_in_parallel
from bmojo.train.schedule import lr_multiplier
from bmojo.train.trainer import Trainer, TrainSummary, build_model, check_memory_reachable

logger = logging.getLogger(__name__)

PREPARED = "prepared"  # the run folder's token shards, when the recipe names no data.prepared
# How long the other processes wait for process 0 to prepare PREPARED (on one core), in a gloo group of their own:
# the default group's timeout (NCCL's 10 minutes, gloo's 30) would stop any run whose corpus takes longer.
PREPARE_TIMEOUT = timedelta(hours=24)


def select_trainer(config: RunConfig) -> type[Trainer]:
    """The trainer for this recipe and launch: one process, one XLA device, or several processes (through the
    PyTorch engine on CPUs and GPUs, the NxD engine on trn1)."""
    # torch-xla and neuronx-distributed are imported only when asked for.
    backend = config.backend
    parallel = backend.device != Device.xla or not is_one_process_recipe(config.parallel)
    # The XLA trainer refuses several processes of a one-process recipe itself, with the trn1 launcher's option.
    parallel = parallel and runs_in_parallel(config.parallel, launched_processes())
    if parallel and (backend.device == Device.xla) != (backend.engine == Engine.nxd):
        raise ValueError(
            f"backend.device={backend.device.value} with backend.engine={backend.engine.value}: several processes "
            "train on trn1 through the NxD engine (backend=trn1 sets device xla and engine nxd) and on CPUs or "
            "GPUs through the torch engine (backend=cpu or backend=gpu)"
        )
    if parallel and backend.engine == Engine.nxd:
        from bmojo.train.nxd import NxDTrainer

        return NxDTrainer
    if backend.device == Device.xla:
        from bmojo.train.xla import XlaTrainer

        return XlaTrainer
    return ParallelTrainer if parallel else Trainer


class _NoMetrics:
    """What processes other than 0 log to: nothing."""

    def truncate_after(self, step: int) -> None:
        pass

    def write(self, step: int, **values: float | int | str) -> None:
        pass

    def close(self) -> None:
        pass


class ParallelTrainer(Trainer):
    """The :class:`Trainer` on several processes started by torchrun, through the engine of ``backend.engine``
    (the PyTorch engine here; :class:`bmojo.train.nxd.NxDTrainer` drives the NxD engine on trn1)."""

    # The group of the collectives on host values (objects, barriers, the stop flag): a gloo group, or None for the
    # default group.
    host_group = None

    def fit(self) -> TrainSummary:
        started_here = not dist.is_initialized()
        try:
            return super().fit()
        finally:
            if started_here and dist.is_initialized():
                dist.destroy_process_group()

    # ---------------------------------------------------------------- setup
    def _setup(self) -> None:
        cfg = self.config
        if cfg.trainer.compile_blocks:
            raise ValueError(
                "trainer.compile_blocks compiles one process's model; parallel training does not compile blocks"
            )
        self.device = self._process_device()
        self.rank, world_size = self._start_processes()
        self.is_main = self.rank == 0
        # Hydra names its output folder after the start time, which may differ by a second between processes.
        self.run_dir = Path(self._from_main(str(self.run_dir)))
        self.checkpoint_root = self.run_dir / CHECKPOINTS
        layout = layout_from_config(cfg.parallel, cfg.trainer.grad_accum_steps, world_size)
        self.engine = build_engine(cfg.backend.engine.value, layout, self.device, cfg.trainer.max_grad_norm)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        resume_from = self._from_main(self._resume_folder() if self.is_main else None)
        tokenizer, model = None, None
        if resume_from is not None:
            tokenizer = AutoTokenizer.from_pretrained(str(resume_from / "tokenizer"))
            model = BmojoForCausalLM(BmojoConfig.from_json_file(str(resume_from / "model_config.json")))
        elif cfg.trainer.init_from:
            model, tokenizer = load_model_and_tokenizer(cfg.trainer.init_from)
            if self.is_main:
                logger.info("fine-tuning from %s", cfg.trainer.init_from)
        check_memory_reachable(
            model.config if model else cfg.model, cfg.data.seq_len, cfg.trainer.allow_unreachable_memory
        )
        started = time.perf_counter()
        self.tokenizer, self.data = self._prepare_data(tokenizer)
        self.timings = {"data_s": time.perf_counter() - started}
        model = model or build_model(cfg.model, self.tokenizer)
        if len(self.tokenizer) > model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(self.tokenizer)} entries but the model only {model.config.vocab_size}"
            )
        self.model_config = model.config
        lm_parameters, aux_parameters = model.parameter_counts()
        self.model = self._parallelize(model)
        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_multiplier(cfg.optim, cfg.trainer.max_steps)
        )
        self.loader = training_loader(
            self.data,
            cfg.trainer.micro_batch_size,
            cfg.trainer.grad_accum_steps,
            cfg.seed,
            cfg.data.shuffle,
            rank=self.engine.dp_rank,
            world_size=layout.data_parallel,
        )
        self.step = 0
        self.tokens_seen = 0
        self.skipped_steps = 0
        self.nonfinite_in_a_row = 0
        self._pending_signal: str | None = None
        self.metrics = MetricsLog(self.run_dir, tensorboard=cfg.trainer.tensorboard) if self.is_main else _NoMetrics()
        if resume_from is not None:
            self._restore(resume_from)
        if self.is_main:
            (self.run_dir / "config.yaml").write_text(self.config_yaml)
            self.tokenizer.save_pretrained(str(self.run_dir / "tokenizer"))
            logger.info(
                "model %s: %s language-model parameters (+%s trained only by the auxiliary loss) on %d processes "
                "(%s), %s",
                model.config.layer_pattern,
                f"{lm_parameters:,}",
                f"{aux_parameters:,}",
                layout.world_size,
                ", ".join(f"{key}={value}" for key, value in layout.to_dict().items()),
                self.device.type,
            )

    def _start_processes(self) -> tuple[int, int]:
        """Join the processes' group; returns this process's rank and the number of processes."""
        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        return dist.get_rank(), dist.get_world_size()

    def _parallelize(self, model: BmojoForCausalLM):
        """This process's share of ``model`` through the engine."""
        return self.engine.parallelize(model, self.data.seq_len)

    def _process_device(self) -> torch.device:
        """This process's device: its own GPU (torchrun's ``LOCAL_RANK``) on CUDA, else the CPU."""
        device = select_device(self.config.backend)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        return device

    def _from_main(self, value, group: dist.ProcessGroup | None = None):
        """``value`` as process 0 has it, on every process (over ``group``, else the host values' group)."""
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.host_group if group is None else group)
        return box[0]

    def _prepare_data(self, tokenizer: PreTrainedTokenizerBase | None) -> tuple[PreTrainedTokenizerBase, PackedData]:
        """The data on every process, tokenized once: process 0 prepares a folder of token shards in the run
        folder (training a tokenizer there if one is to be trained; a restart finds the folder done), the
        others wait (up to ``PREPARE_TIMEOUT``), then every process memory-maps it. A prepared folder, a stream
        and a synthetic task have nothing to tokenize up front, so every process opens its own."""
        cfg = self.config
        if cfg.data.prepared or cfg.data.streaming or cfg.data.source == DataSource.mqar:
            return prepare_data(cfg.data, cfg.seed, tokenizer)
        folder = self.run_dir / PREPARED
        waiting = dist.new_group(backend="gloo", timeout=PREPARE_TIMEOUT)  # see PREPARE_TIMEOUT
        failure = None
        if self.is_main:
            try:
                prepare_folder(cfg.data, cfg.seed, folder, tokenizer=tokenizer, progress=cfg.trainer.progress_bar)
            except Exception as error:  # any error (a full disk, a worker's crash), not only a DataError
                failure = error
        # Every process learns of process 0's failure, instead of waiting at a barrier it never reaches.
        try:
            message = self._from_main(None if failure is None else str(failure), group=waiting)
        finally:
            dist.destroy_process_group(waiting)
        if message is not None:
            if failure is not None:
                raise failure
            raise DataError(f"process 0 could not prepare {folder}: {message}")
        return prepare_data(prepared_config(cfg.data, folder), cfg.seed, tokenizer)

    # ---------------------------------------------------------------- checkpoints
    def _save(self) -> Path:
        """Every process writes its shards into the temporary folder; process 0 adds the rest and publishes it."""
        cursors = self._gathered({self.engine.dp_rank: self.loader.state_dict()})
        rngs = self._gathered({self.rank: rng_state()})
        final, temporary = checkpoint_paths(self.checkpoint_root, self.step)
        if self.is_main:
            self.checkpoint_root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(temporary, ignore_errors=True)  # left by a run stopped while writing it
        dist.barrier(group=self.host_group)
        self.engine.save(temporary, self.optimizer)
        if self.is_main:
            trainer_state = {
                "scheduler": self.scheduler.state_dict(),
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "skipped_steps": self.skipped_steps,
                "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "data_cursors": cursors,
                "rng": rngs,
            }
            torch.save(trainer_state, temporary / "trainer_state.pt")
            self.model_config.to_json_file(str(temporary / "model_config.json"))
            (temporary / "config.yaml").write_text(self.config_yaml)
            self.tokenizer.save_pretrained(str(temporary / "tokenizer"))
            publish_checkpoint(temporary, final, self.config.trainer.keep_last)
        dist.barrier(group=self.host_group)
        return final

    def _gathered(self, mine: dict) -> dict:
        """The union of every process's ``mine``."""
        parts: list[dict | None] = [None] * dist.get_world_size(self.host_group)
        dist.all_gather_object(parts, mine, group=self.host_group)
        return {key: value for part in parts for key, value in part.items()}

    def _restore(self, folder: Path) -> None:
        if not is_sharded_checkpoint(folder):
            raise CheckpointError(
                f"{folder} was written by a run of one process: resume it with one process (parallel=single), or "
                f"start a new run folder from its weights with trainer.init_from={folder}"
            )
        sizes = ("data_parallel", "tensor_parallel", "pipeline_parallel")
        written = json.loads((folder / LAYOUT_FILE).read_text())["layout"]
        ours = self.engine.layout.to_dict()
        if any(written[size] != ours[size] for size in sizes):
            # The data cursors and RNG states are per rank, so even another data-parallel size cannot continue.
            raise CheckpointError(
                f"{folder} was written with {', '.join(f'{size}={written[size]}' for size in sizes)} but this run has "
                f"{', '.join(f'{size}={ours[size]}' for size in sizes)}: resume it with that layout and number of "
                f"processes, or start a new run folder from its weights with trainer.init_from={folder}"
            )
        self.engine.load(folder, self.optimizer)
        state = torch.load(folder / "trainer_state.pt", weights_only=True)
        cursors, rngs = state["data_cursors"], state["rng"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.skipped_steps = int(state["skipped_steps"])
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        self.loader.load_state_dict(cursors[self.engine.dp_rank])
        set_rng_state(rngs[self.rank])
        self.metrics.truncate_after(self.step)

    # ---------------------------------------------------------------- steps
    def _labels(self, blocks: torch.Tensor) -> torch.Tensor:
        """Labels of ``[..., B, T]`` blocks (a synthetic task masks all but its answers)."""
        return self.data.labels(blocks.flatten(0, -2)).view_as(blocks)

    @torch.no_grad()
    def evaluate(self, data: PackedData | None = None) -> float:
        """Mean next-token loss over the held-out blocks a one-process run with the same global batch evaluates.

        Every evaluation step takes ``microbatches x data-parallel ranks x micro_batch_size`` blocks, so a
        held-out tail that fills no whole step is left out.
        """
        total, steps = 0.0, 0
        for blocks in self._eval_steps(data or self.data):
            with autocast(self.device, self.config.trainer.precision):
                total += self.engine.eval_step(blocks, self._labels(blocks)).lm_loss
            steps += 1
        return total / steps

    def _eval_steps(self, data: PackedData) -> Iterator[torch.Tensor]:
        """This process's share ``[microbatches, micro_batch_size, T]`` of each evaluation step's blocks."""
        layout, micro = self.engine.layout, self.config.trainer.micro_batch_size
        per_step = layout.microbatches * layout.data_parallel * micro
        steps = min(math.ceil(self.config.trainer.eval_batches / layout.microbatches), len(data.val) // per_step)
        if steps == 0:
            raise DataError(
                f"only {len(data.val)} held-out blocks, fewer than one evaluation step of {per_step} (micro batch "
                f"{micro} x accumulation {layout.microbatches} x data-parallel ranks {layout.data_parallel}); raise "
                "data.val_fraction or lower trainer.micro_batch_size"
            )
        for index in range(steps):
            ids = np.asarray(data.val[index * per_step : (index + 1) * per_step]["input_ids"])
            # [accumulation, rank, micro] as the training loader lays a step out
            blocks = torch.as_tensor(ids, dtype=torch.long).view(layout.microbatches, layout.data_parallel, micro, -1)
            yield blocks[:, self.engine.dp_rank]

    def _train_step(self) -> dict[str, float] | None:
        step_blocks = self.loader.next_step()
        with autocast(self.device, self.config.trainer.precision):
            losses = self.engine.train_step(step_blocks, self._labels(step_blocks))
        grad_norm = self.engine.clip_grad_norm_(self.config.trainer.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        # The same values on every process, so every process skips the same steps.
        finite = math.isfinite(losses.lm_loss + losses.aux_loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += self.loader.global_batch * self.data.seq_len
        self._agree_on_stop()
        if not finite:
            self.skipped_steps += 1
            self.nonfinite_in_a_row += 1
            return None
        self.nonfinite_in_a_row = 0
        return {"loss": losses.lm_loss, "aux_loss": losses.aux_loss, "grad_norm": grad_norm, "lr": lr}

    # ---------------------------------------------------------------- loop
    def _report(self, message: str) -> None:
        if self.is_main:
            super()._report(message)

    def _request_stop(self, signum: int, frame: object) -> None:
        """Note the signal; the processes stop together, after the step in which any of them got one."""
        if self._pending_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self._pending_signal = signal.Signals(signum).name

    def _agree_on_stop(self) -> None:
        """Stop every process once any has been signalled: a process leaving the loop alone would stall the rest."""
        if self._stop_signal is not None:
            return
        # On the default group the flag lives on the device (nccl reduces no CPU tensor); a host group is gloo.
        device = self.device if self.host_group is None else torch.device("cpu")
        signalled = torch.tensor([self._pending_signal is not None], dtype=torch.int32, device=device)
        dist.all_reduce(signalled, op=dist.ReduceOp.MAX, group=self.host_group)
        if signalled.item():
            self._stop_signal = self._pending_signal or "a signal to another process"
            self._report(f"{self._stop_signal}: finishing this step, saving a checkpoint and exiting")

    def _loop(self, cfg) -> TrainSummary:
        """The loop of :class:`Trainer`, with the bar on process 0 and the export from the final shards."""
        quiet = dataclasses.replace(
            cfg, progress_bar=cfg.progress_bar and self.is_main, export_at_end=False, sample_tokens=0
        )
        summary = super()._loop(quiet)
        if not summary.stopped_early and self.is_main and (cfg.export_at_end or cfg.sample_tokens > 0):
            model = BmojoForCausalLM(self.model_config)
            load_weights(model, summary.checkpoint)
            if cfg.export_at_end:
                summary.export_dir = export_model(model, self.tokenizer, self.run_dir / "export")
            if cfg.sample_tokens > 0:
                summary.sample = generate_sample(
                    model, self.tokenizer, cfg.sample_prompt, cfg.sample_tokens, seed=self.config.seed
                )
        # The other processes wait, so that none closes the process group under process 0.
        dist.barrier(group=self.host_group)
        return summary
