"""Launch a scenario on several CPU processes (gloo) and reference training on one process.

``launch(world_size, scenario, **kwargs)`` spawns ``world_size`` ranks that call ``scenario(**kwargs)`` after
initialising ``torch.distributed`` with gloo; an assertion in any rank fails the launch with its traceback.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bmojo import BmojoConfig, BmojoForCausalLM

PATTERN_CONFIG = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    window_size=8,
    ssm_state_size=8,
    ssm_head_dim=8,
    ssm_num_groups=2,
    ssm_chunk_size=16,
    memory_size=4,
    memory_topk=2,
    memory_block=8,
    tie_word_embeddings=False,
)
SEQ_LEN = 32
STEPS = 3
LR = 1e-2
MAX_GRAD_NORM = 0.5  # small enough that clipping acts, so the global norm is checked too


def tiny_model(pattern: str, seed: int = 0, **overrides) -> BmojoForCausalLM:
    torch.manual_seed(seed)
    model = BmojoForCausalLM(BmojoConfig(layer_pattern=pattern, **{**PATTERN_CONFIG, **overrides}))
    return model.float()


def step_batches(step: int, microbatches: int, batch: int, vocab: int = PATTERN_CONFIG["vocab_size"]) -> torch.Tensor:
    """[microbatches, batch, SEQ_LEN] token ids of optimizer step ``step`` (the global batch)."""
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, vocab, (microbatches, batch, SEQ_LEN), generator=generator)


def make_optimizer(params) -> torch.optim.Optimizer:
    # Adam's first step moves a weight by about lr whatever its gradient's size, so a gradient at rounding level
    # (whose sign the ranks' summation order decides) would become an lr-sized weight difference; eps 1e-6 keeps
    # such gradients' steps at rounding level too, and leaves real gradients' steps as they are.
    return torch.optim.AdamW(params, lr=LR, eps=1e-6, weight_decay=0.1, foreach=False)


def reference_training(model: BmojoForCausalLM, microbatches: int, batch: int, steps: int = STEPS):
    """One process: (loss, aux, grad norm, {name: grad before clipping}) for ``steps`` optimizer steps and of
    the model after them (no update there); the model is trained in place.
    """
    optimizer = make_optimizer(model.parameters())
    history = []
    for step in range(steps + 1):
        batches = step_batches(step, microbatches, batch)
        lm_total, aux_total = 0.0, 0.0
        for micro in batches:
            out = model(micro, labels=micro)
            (out.loss / microbatches).backward()
            lm_total += float(out.loss - out.aux_loss) / microbatches
            aux_total += float(out.aux_loss) / microbatches
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM))
        if step < steps:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append((lm_total, aux_total, norm, grads))
    return history


def clone_model(model: BmojoForCausalLM) -> BmojoForCausalLM:
    return copy.deepcopy(model)


def _worker(rank: int, world_size: int, init_file: str, scenario: Callable, kwargs: dict) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        scenario(**kwargs)
    finally:
        dist.destroy_process_group()


def launch(world_size: int, scenario: Callable, **kwargs) -> None:
    """Run ``scenario(**kwargs)`` on ``world_size`` forked ranks; forking reuses the imports already made here,
    which on a small machine take longer than the scenarios themselves.
    """
    with tempfile.TemporaryDirectory() as folder:
        init_file = str(Path(folder) / "rendezvous")
        args = (world_size, init_file, scenario, kwargs)
        mp.start_processes(_worker, args=args, nprocs=world_size, join=True, start_method="fork")
