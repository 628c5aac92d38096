"""The family side by side at equal size: each member's MLP width is chosen to match a parameter budget."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bmojo import BmojoConfig, BmojoForCausalLM
from bmojo.train.host_memory import host_memory_kept, keep_freed_host_memory

FAMILY = ("A", "W", "M", "MW", "F", "B")
MEMBER_NAMES = {
    "A": "Transformer",
    "W": "sliding window",
    "M": "Mamba-2 mixer + SwiGLU",
    "MW": "Mamba-2 + SWA",
    "F": "B'MOJO-F",
    "B": "B'MOJO",
}


def parameter_counts(config: BmojoConfig) -> tuple[int, int]:
    """(language-model, auxiliary-only) parameters of the model ``config`` describes, built on the meta device
    (no memory, no time). Auxiliary-only parameters (B's innovation predictor) get no gradient from the
    language-model loss, so they are counted apart."""
    with torch.device("meta"):
        return BmojoForCausalLM(config).parameter_counts()


def parameter_fields(config: BmojoConfig) -> dict[str, int]:
    """A benchmark row's parameter columns: ``parameters`` (language model) and ``auxiliary_parameters``."""
    language_model, auxiliary = parameter_counts(config)
    return {"parameters": language_model, "auxiliary_parameters": auxiliary}


def parameter_count(config: BmojoConfig) -> int:
    """Language-model parameters of the model ``config`` describes: the budget members are matched on."""
    return parameter_counts(config)[0]


def match_parameters(layer_pattern: str, target: int, multiple: int = 8, **fields) -> BmojoConfig:
    """``BmojoConfig(layer_pattern=..., **fields)`` with the ``intermediate_size`` (a multiple of ``multiple``)
    that brings its parameter count closest to ``target``. Parameters grow linearly with the MLP width, so
    two counts give the slope."""
    fields.pop("intermediate_size", None)
    base = parameter_count(BmojoConfig(layer_pattern=layer_pattern, intermediate_size=multiple, **fields))
    slope = parameter_count(BmojoConfig(layer_pattern=layer_pattern, intermediate_size=2 * multiple, **fields)) - base
    steps = max(0, round((target - base) / slope))
    return BmojoConfig(layer_pattern=layer_pattern, intermediate_size=multiple * (1 + steps), **fields)


def family_configs(members: tuple[str, ...] = FAMILY, reference: str = "B", **fields) -> dict[str, BmojoConfig]:
    """Each member at the language-model parameter count of ``reference`` built from ``fields`` (its own MLP width
    kept)."""
    target = parameter_count(BmojoConfig(layer_pattern=reference, **fields))
    return {member: match_parameters(member, target, **fields) for member in members}


def add_size_arguments(parser: argparse.ArgumentParser) -> None:
    """The model-size options the family benchmarks share (``--hidden-size``, ``--window``, ...)."""
    size = parser.add_argument_group("model size (shared; each member's MLP width matches the parameters of B)")
    size.add_argument("--vocab-size", type=int, default=2048)
    size.add_argument("--hidden-size", type=int, default=128)
    size.add_argument("--layers", type=int, default=2)
    size.add_argument("--heads", type=int, default=4)
    size.add_argument("--kv-heads", type=int, default=2)
    size.add_argument("--window", type=int, default=256)
    size.add_argument("--memory-size", type=int, default=64)
    size.add_argument("--memory-topk", type=int, default=4)
    size.add_argument("--ssm-chunk-size", type=int, default=64, help="chunk length of the SSM scan")


def size_fields(args: argparse.Namespace) -> dict:
    """``BmojoConfig`` fields from :func:`add_size_arguments` (memory blocks as long as the window)."""
    return {
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "window_size": args.window,
        "ssm_state_size": 16,
        "ssm_head_dim": 32,
        "ssm_chunk_size": args.ssm_chunk_size,
        "memory_size": args.memory_size,
        "memory_topk": args.memory_topk,
        "memory_block": args.window,
    }


def compose_bench_run(overrides: list[str], run_dir: Path, threads: int | None):
    """The composed recipe of one benchmark training run: quiet (no progress bar, TensorBoard or export)."""
    from bmojo.train import compose_recipe

    quiet = ["trainer.progress_bar=false", "trainer.tensorboard=false", "trainer.export_at_end=false"]
    threads_override = [f"backend.num_threads={threads}"] if threads is not None else []
    return compose_recipe([*overrides, f"run_dir={run_dir}", *quiet, *threads_override])


def add_run_arguments(parser: argparse.ArgumentParser, device: bool = True) -> None:
    """The options every family benchmark takes: ``--threads`` and, where it can run on a GPU, ``--device``."""
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--release-host-memory",
        action="store_true",
        help="leave glibc returning freed blocks to the OS (default: keep them, as training on the CPU does)",
    )
    if device:
        parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")


def start_run(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` and ``--release-host-memory`` and return the device ``--device`` names (the CPU for a
    benchmark without it), with a clear error when it is not there."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not args.release_host_memory:
        keep_freed_host_memory()
    name = getattr(args, "device", "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is visible to PyTorch (torch {torch.__version__})")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name}: the family benchmarks run on cpu or cuda")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a wall-clock time covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """The median wall-clock time of each run over ``repeats`` rounds, after a warm-up round. Runs go
    round-robin, one of each in turn, so a slow spell of a shared machine hits them all alike; each must
    finish its device work itself (:func:`synchronize`)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(repeats + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if round_index:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def write_report(path: Path, bench: str, device: torch.device, **fields) -> None:
    """Write a benchmark's JSON: its kind, what ran it (torch version, device, threads, host allocator), then
    ``fields``."""
    machine = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    )
    report = {"bench": bench, "torch_version": torch.__version__, "device": device.type, "machine": machine}
    report |= {"threads": torch.get_num_threads(), "host_memory_kept": host_memory_kept(), **fields}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
