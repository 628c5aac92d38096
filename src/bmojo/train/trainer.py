"""The training loop: accumulation, clipping, bf16 autocast, validation, checkpoints and exact resume."""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from bmojo import BmojoConfig, BmojoForCausalLM
from bmojo.data import PackedData, eval_batches, prepare_data, training_loader
from bmojo.train.checkpoint import (
    CHECKPOINTS,
    CheckpointError,
    TrainingState,
    latest_checkpoint,
    load_model_and_tokenizer,
    load_training_state,
    save_checkpoint,
)
from bmojo.train.config import ModelConfig, Resume, RunConfig
from bmojo.train.device import autocast, rng_state, seed_everything, select_device, set_rng_state, to_host
from bmojo.train.export import export_model, generate_sample
from bmojo.train.metrics import MetricsLog
from bmojo.train.processes import launched_processes, runs_in_parallel
from bmojo.train.schedule import lr_multiplier

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


@dataclass
class TrainSummary:
    run_dir: Path
    step: int
    initial_val_loss: float | None  # None when the run resumed past step 0
    final_val_loss: float
    skipped_steps: int
    stopped_early: bool  # stopped by a signal before max_steps
    checkpoint: Path | None
    export_dir: Path | None = None
    sample: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


def build_model(model_config: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> BmojoForCausalLM:
    """A freshly initialised model; ``vocab_size: null`` becomes the tokenizer's size, padded up."""
    fields = asdict(model_config)
    multiple = fields.pop("pad_vocab_multiple")
    if fields["vocab_size"] is None:
        fields["vocab_size"] = multiple * math.ceil(len(tokenizer) / multiple)
    if fields["vocab_size"] < len(tokenizer):
        raise ValueError(
            f"model.vocab_size={fields['vocab_size']} is smaller than the tokenizer ({len(tokenizer)} entries); "
            "set model.vocab_size=null to size it from the tokenizer"
        )
    eos = tokenizer.eos_token_id
    config = BmojoConfig(**fields, eos_token_id=eos, bos_token_id=tokenizer.bos_token_id or eos, pad_token_id=eos)
    return BmojoForCausalLM(config)


def check_memory_reachable(model: ModelConfig | BmojoConfig, seq_len: int, allow_unreachable: bool = False) -> None:
    """Refuse a training length at which a windowed model's fading or eidetic memory gets no gradient.

    A query at t sees fading keys only once t >= w, and a memory entry only after it has left the window (w
    tokens behind) and its block of Q_e has ended; at a shorter length the SSM inside F/B and B's memory are
    never read, so they get exactly zero gradient (and W is A). F and B need seq_len >= 2w (DESIGN §2.4b), B
    also >= w + Q_e, W more than w tokens. ``allow_unreachable`` (trainer.allow_unreachable_memory) lets it be.
    """
    letters = set(model.layer_pattern)
    window = model.window_size
    needs = []
    if letters & set("FB"):
        needs.append((2 * window, "F and B layers see fading keys only at t >= window"))
    if "B" in letters:
        block = model.memory_block or window
        needs.append((window + block, "B's memory entries are read only once they left the window"))
    if "W" in letters:
        needs.append((window + 1, "W layers are full attention when the sequence fits in the window"))
    if allow_unreachable or not needs:
        return
    shortest, reason = max(needs)
    if seq_len < shortest:
        raise ValueError(
            f"data.seq_len={seq_len} leaves the memory of model {model.layer_pattern!r} with "
            f"model.window_size={window} unreachable ({reason}), so it gets no gradient: train at "
            f"data.seq_len >= {shortest} or lower model.window_size, or set trainer.allow_unreachable_memory=true "
            "if you mean it"
        )


def compile_blocks(model: BmojoForCausalLM) -> None:
    """``torch.compile`` every block in place, as torchtitan applies it: from outside the model code, one block at
    a time (the blocks share their compiled code). Parameter names, and so checkpoints, stay as they are."""
    for block in model.model.layers:
        # Static shapes: a new shape (an evaluation batch, say) compiles a variant of its own. With dynamic
        # shapes, inductor (torch 2.13) fails on this model's symbolic sizes once a second shape appears.
        block.compile(dynamic=False)


class Trainer:
    """Trains one run in ``run_dir`` as ``config`` says, resuming from its latest checkpoint when asked."""

    def __init__(self, config: RunConfig, run_dir: Path, config_yaml: str | None = None) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.config_yaml = config_yaml or OmegaConf.to_yaml(OmegaConf.structured(config))
        self.checkpoint_root = self.run_dir / CHECKPOINTS
        self._stop_signal: str | None = None

    # ---------------------------------------------------------------- setup
    def _setup(self) -> None:
        cfg = self.config
        if runs_in_parallel(cfg.parallel, launched_processes()):
            raise ValueError(
                f"{type(self).__name__} trains in one process; several processes train through bmojo.train.train "
                "(bmojo-train), which picks the parallel trainer"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = select_device(cfg.backend)
        seed_everything(cfg.seed)
        resume_from = self._resume_folder()
        tokenizer, model = None, None
        if resume_from is not None:
            model, tokenizer = load_model_and_tokenizer(resume_from)
        elif cfg.trainer.init_from:
            model, tokenizer = load_model_and_tokenizer(cfg.trainer.init_from)
            logger.info("fine-tuning from %s", cfg.trainer.init_from)
        check_memory_reachable(
            model.config if model else cfg.model, cfg.data.seq_len, cfg.trainer.allow_unreachable_memory
        )
        started = time.perf_counter()
        self.tokenizer, self.data = prepare_data(cfg.data, cfg.seed, tokenizer)
        self.timings = {"data_s": time.perf_counter() - started}
        self.model = self._place_model(model or build_model(cfg.model, self.tokenizer))
        if cfg.trainer.compile_blocks:
            self._compile_blocks()
        if len(self.tokenizer) > self.model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(self.tokenizer)} entries but the model only {self.model.config.vocab_size}"
            )
        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_multiplier(cfg.optim, cfg.trainer.max_steps)
        )
        self.loader = training_loader(
            self.data, cfg.trainer.micro_batch_size, cfg.trainer.grad_accum_steps, cfg.seed, cfg.data.shuffle
        )
        self.step = 0
        self.tokens_seen = 0
        self.skipped_steps = 0
        self.nonfinite_in_a_row = 0
        self.metrics = MetricsLog(self.run_dir, tensorboard=cfg.trainer.tensorboard)
        if resume_from is not None:
            self._restore(resume_from)
        (self.run_dir / "config.yaml").write_text(self.config_yaml)
        self.tokenizer.save_pretrained(str(self.run_dir / "tokenizer"))
        lm_count, aux_count = self.model.parameter_counts()
        logger.info(
            "model %s: %s language-model parameters (+%s trained only by the auxiliary loss) on %s",
            self.model.config.layer_pattern,
            f"{lm_count:,}",
            f"{aux_count:,}",
            self.device,
        )

    def _resume_folder(self) -> Path | None:
        found = latest_checkpoint(self.checkpoint_root)
        mode = self.config.trainer.resume
        if found is None and mode == Resume.must:
            raise CheckpointError(f"trainer.resume=must but {self.checkpoint_root} holds no checkpoint")
        if found is not None and mode == Resume.never:
            raise CheckpointError(
                f"{self.run_dir} already holds checkpoints and trainer.resume=never; pick another run folder "
                "(hydra.run.dir=...) or set trainer.resume=auto to continue it"
            )
        if found is not None:
            logger.info("resuming from %s", found)
        return found

    def _place_model(self, model: BmojoForCausalLM) -> BmojoForCausalLM:
        """The model on the training device, ready for the optimizer to be built over its parameters."""
        return model.to(self.device)

    def _compile_blocks(self) -> None:
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(
                f"trainer.compile_blocks compiles for the CPU or CUDA, not {self.device.type}; set it to false"
            )
        compile_blocks(self.model)
        logger.info("compiling %d blocks in the first steps", len(self.model.model.layers))

    def _host_model(self) -> BmojoForCausalLM:
        """The model holding the current weights, as checkpoints, export and sampling read it."""
        return self.model

    def _build_optimizer(self) -> torch.optim.Optimizer:
        optim = self.config.optim
        if optim.name != "adamw":
            raise ValueError(f"optim.name={optim.name!r} is not supported; use adamw")
        # Matrices decay; norms, biases and the SSM's per-head scalars (A_log, D, dt_bias) do not.
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for _, p in named if p.ndim >= 2], "weight_decay": optim.weight_decay},
            {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0},
        ]
        return self._optimizer(
            torch.optim.AdamW,
            groups,
            lr=optim.lr,
            betas=tuple(optim.betas),
            eps=optim.eps,
            foreach=self.device.type != "cpu",
        )

    def _optimizer(self, optimizer_class: type[torch.optim.Optimizer], groups: list[dict], **defaults):
        """The optimizer over ``groups`` (an engine that wraps its optimizer builds it instead)."""
        return optimizer_class(groups, **defaults)

    def _restore(self, folder: Path) -> None:
        state = load_training_state(folder, self.model)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        trainer = state.trainer
        self.step = int(trainer["step"])
        self.tokens_seen = int(trainer["tokens_seen"])
        self.skipped_steps = int(trainer["skipped_steps"])
        self.nonfinite_in_a_row = int(trainer["nonfinite_in_a_row"])
        self.loader.load_state_dict(trainer["data_cursors"][self.loader.rank])
        set_rng_state(trainer["rng"])
        self.metrics.truncate_after(self.step)

    def _save(self) -> Path:
        state = TrainingState(
            optimizer=to_host(self.optimizer.state_dict()),
            scheduler=self.scheduler.state_dict(),
            trainer={
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "skipped_steps": self.skipped_steps,
                "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "data_cursors": {self.loader.rank: self.loader.state_dict()},
                "rng": rng_state(),
            },
        )
        return save_checkpoint(
            self.checkpoint_root,
            self.step,
            self._host_model(),
            self.tokenizer,
            state,
            self.config_yaml,
            self.config.trainer.keep_last,
        )

    # ---------------------------------------------------------------- steps
    @torch.no_grad()
    def evaluate(self, data: PackedData | None = None) -> float:
        """Mean next-token loss (without the auxiliary loss) over the held-out blocks."""
        data = data or self.data
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        for batch in eval_batches(data.val, self.config.trainer.micro_batch_size, self.config.trainer.eval_batches):
            batch = batch.to(self.device)
            with autocast(self.device, self.config.trainer.precision):
                out = self.model(batch, labels=data.labels(batch))
            total += float(out.loss - out.aux_loss) * batch.shape[0]
            count += batch.shape[0]
        self.model.train(was_training)
        return total / count

    def _is_log_step(self) -> bool:
        """Whether the step just taken is logged; the XLA trainer reads device values at these steps only."""
        cfg = self.config.trainer
        return self.step % cfg.log_every == 0 or self.step == cfg.max_steps

    def _train_step(self) -> dict[str, float] | None:
        """One optimizer step over ``grad_accum_steps`` micro-batches; None when it was skipped."""
        step_blocks = self.loader.next_step().to(self.device)
        accum = step_blocks.shape[0]
        lm_loss, aux_loss = 0.0, 0.0
        finite = True
        for micro in step_blocks:
            with autocast(self.device, self.config.trainer.precision):
                out = self.model(micro, labels=self.data.labels(micro))
            (out.loss / accum).backward()
            loss_value, aux_value = float(out.loss.detach()), float(out.aux_loss.detach())
            finite = finite and math.isfinite(loss_value)
            lm_loss += (loss_value - aux_value) / accum
            aux_loss += aux_value / accum
        max_norm = self.config.trainer.max_grad_norm
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm or math.inf))
        lr = self.scheduler.get_last_lr()[0]
        if finite and math.isfinite(grad_norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += step_blocks.numel()
        if not (finite and math.isfinite(grad_norm)):
            self.skipped_steps += 1
            self.nonfinite_in_a_row += 1
            return None
        self.nonfinite_in_a_row = 0
        return {"loss": lm_loss, "aux_loss": aux_loss, "grad_norm": grad_norm, "lr": lr}

    # ---------------------------------------------------------------- loop
    def _report(self, message: str) -> None:
        """Print a line of progress above the progress bar."""
        tqdm.write(message)

    def _request_stop(self, signum: int, frame: object) -> None:
        if self._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self._stop_signal = signal.Signals(signum).name
        tqdm.write(f"{self._stop_signal}: finishing this step, saving a checkpoint and exiting")

    def fit(self) -> TrainSummary:
        """Train to ``trainer.max_steps`` (or until SIGTERM / Ctrl-C) and return what happened."""
        self._setup()
        cfg = self.config.trainer
        previous_handlers = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                previous_handlers[signum] = signal.signal(signum, self._request_stop)
            except ValueError:  # not the main thread: leave signals to the caller
                break
        try:
            return self._loop(cfg)
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            self.metrics.close()

    def _loop(self, cfg) -> TrainSummary:
        initial_val = None
        if self.step == 0:
            initial_val = self.evaluate()
            self.metrics.write(0, val_loss=initial_val)
            self._report(f"validation loss before training: {initial_val:.4f}")
        self.model.train()
        checkpoint = None
        tokens_per_step = self.loader.global_batch * self.data.seq_len
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            disable=not cfg.progress_bar,
            unit="step",
            desc="train",
            mininterval=1.0,
        )
        window_start, window_steps = time.perf_counter(), 0
        started = time.perf_counter()
        stop_at = cfg.max_steps if cfg.steps_this_run is None else min(cfg.max_steps, self.step + cfg.steps_this_run)
        while self.step < stop_at and self._stop_signal is None:
            result = self._train_step()
            bar.update(1)
            window_steps += 1
            if result is None:
                if self.nonfinite_in_a_row >= cfg.max_nonfinite_in_a_row:
                    bar.close()
                    raise NonFiniteLossError(
                        f"the loss or gradient was not finite for {self.nonfinite_in_a_row} steps in a row (last at "
                        f"step {self.step}, {self.skipped_steps} skipped in all); lower optim.lr, keep "
                        "trainer.max_grad_norm set, or check the data. The last good checkpoint is in "
                        f"{self.checkpoint_root}"
                    )
                self._report(f"step {self.step}: non-finite loss or gradient, update skipped")
                continue
            if self._is_log_step():
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_steps * tokens_per_step / max(elapsed, 1e-9)
                window_start, window_steps = time.perf_counter(), 0
                self.metrics.write(
                    self.step, **result, tokens=self.tokens_seen, tokens_per_s=tokens_per_s, skipped=self.skipped_steps
                )
                bar.set_postfix(loss=f"{result['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            if self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                val = self.evaluate()
                self.metrics.write(self.step, val_loss=val)
                self._report(f"step {self.step}: validation loss {val:.4f}")
            if self.step % cfg.checkpoint_every == 0 and self.step < cfg.max_steps:
                checkpoint = self._save()
        bar.close()
        self.timings["train_s"] = time.perf_counter() - started
        if checkpoint is None or not checkpoint.name.endswith(f"{self.step:08d}"):
            checkpoint = self._save()
        final_val = self.evaluate()
        self.metrics.write(self.step, val_loss=final_val)
        stopped_early = self.step < cfg.max_steps
        summary = TrainSummary(
            run_dir=self.run_dir,
            step=self.step,
            initial_val_loss=initial_val,
            final_val_loss=final_val,
            skipped_steps=self.skipped_steps,
            stopped_early=stopped_early,
            checkpoint=checkpoint,
            timings=self.timings,
        )
        if stopped_early:
            reason = self._stop_signal or "trainer.steps_this_run reached"
            self._report(f"stopped at step {self.step} ({reason}); checkpoint {checkpoint}; rerun to resume")
            return summary
        if cfg.export_at_end:
            summary.export_dir = export_model(self._host_model(), self.tokenizer, self.run_dir / "export")
        if cfg.sample_tokens > 0:
            summary.sample = generate_sample(
                self._host_model(), self.tokenizer, cfg.sample_prompt, cfg.sample_tokens, seed=self.config.seed
            )
        return summary
