"""Op speed against the references: forward + backward time of each backend, side by side in one run.

    python bench/ops.py [--repeats 5] [--json bench/results/ops.json] [--seq-len 4096 ...]

Each case builds its inputs once, times one forward + backward per backend (warm-up first, then the median
of ``--repeats``) and reports the speed-up of every backend over the case's reference backend. To add an
op, write a ``make_<op>_case`` function returning a :class:`Case` and list it in :func:`build_cases`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bmojo.ops.ssm_scan import ssm_scan


@dataclass
class Case:
    """One op at one size: ``step(backend)`` runs a forward and a backward on fixed inputs."""

    op: str
    config: dict
    backends: tuple[str, ...]
    reference: str
    step: Callable[[str], None]


def make_ssm_scan_case(args: argparse.Namespace) -> Case:
    config = {
        "batch": args.batch,
        "seq_len": args.seq_len,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "state_dim": args.state_dim,
        "groups": args.groups,
        "chunk_size": args.chunk_size,
        "dtype": "float32",
    }
    generator = torch.Generator().manual_seed(0)
    batch, time_steps, heads, groups = args.batch, args.seq_len, args.heads, args.groups

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    inputs = {
        "x": randn(batch, time_steps, heads, args.head_dim),
        "dt": torch.nn.functional.softplus(randn(batch, time_steps, heads) - 2.0),
        "A": -torch.rand(heads, generator=generator) * 4 - 0.5,
        "B": randn(batch, time_steps, groups, args.state_dim),
        "C": randn(batch, time_steps, groups, args.state_dim),
        "D": randn(heads),
        "initial_state": randn(batch, heads, args.head_dim, args.state_dim),
    }
    for tensor in inputs.values():
        tensor.requires_grad_()
    grad_y = randn(*inputs["x"].shape)
    grad_state = randn(*inputs["initial_state"].shape)

    def step(backend: str) -> None:
        y, final_state = ssm_scan(**inputs, chunk_size=args.chunk_size, backend=backend)
        torch.autograd.backward((y, final_state), (grad_y, grad_state))
        for tensor in inputs.values():
            tensor.grad = None

    return Case("ssm_scan", config, ("naive", "torch"), "naive", step)


def build_cases(args: argparse.Namespace) -> list[Case]:
    return [make_ssm_scan_case(args)]


def median_seconds(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up: allocator, first-call dispatch
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_case(case: Case, repeats: int) -> dict:
    times = {backend: median_seconds(lambda b=backend: case.step(b), repeats) for backend in case.backends}
    speedups = {b: times[case.reference] / times[b] for b in case.backends if b != case.reference}
    return {
        "op": case.op,
        "config": case.config,
        "reference": case.reference,
        "fwd_bwd_s": times,
        "speedup": speedups,
    }


def print_table(results: list[dict]) -> None:
    header = f"{'op':<10} {'backend':<8} {'fwd+bwd ms':>11} {'speed-up':>9}  config"
    print(header)
    print("-" * len(header))
    for result in results:
        config = " ".join(f"{key}={value}" for key, value in result["config"].items())
        for backend, seconds in result["fwd_bwd_s"].items():
            speedup = result["speedup"].get(backend)
            ratio = f"{speedup:8.1f}x" if speedup is not None else f"{'(ref)':>9}"
            print(f"{result['op']:<10} {backend:<8} {seconds * 1e3:11.1f} {ratio}  {config}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=Path("bench/results/ops.json"), help="where to write results")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per backend (median is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    sizes = parser.add_argument_group("ssm_scan sizes")
    sizes.add_argument("--batch", type=int, default=2)
    sizes.add_argument("--seq-len", type=int, default=2048)
    sizes.add_argument("--heads", type=int, default=8)
    sizes.add_argument("--head-dim", type=int, default=64)
    sizes.add_argument("--state-dim", type=int, default=64)
    sizes.add_argument("--groups", type=int, default=1)
    sizes.add_argument("--chunk-size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = [run_case(case, args.repeats) for case in build_cases(args)]
    print_table(results)
    report = {
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
