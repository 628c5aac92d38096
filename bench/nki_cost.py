"""Per-engine instruction counts and the estimated trn1 time of the NKI kernels, from the NKI interpreter.

    python bench/nki_cost.py [--seq-len 8192 --heads 32 --head-dim 64 --state-dim 128 ...]
                             [--trace-only] [--json bench/results/nki_cost.json]

For the chunked ``ssm_scan`` kernels (forward, backward) and, at the same channels x state x length, the
VectorE-bound selective-scan design (forward; one ``tensor_tensor_scan`` per state per channel tile), it
prints every engine's instruction counts (static: the program, each ``affine_range``/``sequential_range``
body once; executed: every instruction run) and modelled busy time, the estimate (the busiest engine: engines
overlap) and the engine that bounds the kernel. Times come from the cost model of
``neuron_kernels/interpreter/cost.py`` (public trn1 figures); they are estimates, not measurements.

The chunked kernels run on random inputs and their outputs and gradients are checked against the ``torch``
backend (about 2 minutes of NumPy at the default size); ``--trace-only`` skips the computing and only checks
every instruction against the hardware rules and counts it (the counts are the same). The selective-scan
baseline is always traced: its per-step scans are far too slow to execute in NumPy at this size.

The ``eidetic_gather`` kernels (forward gather, backward duplicate-combining scatter) run at B x T of the
scan, ``--gather-selected`` rows per batch row (padded to whole 128-row tiles, as the op wrapper does) and
``--gather-features`` features in ``--gather-dtype``, with indices drawn from a few hundred tokens so that
most of them repeat; executed, their outputs are checked against the ``torch`` backend.
"""

from __future__ import annotations

import os

# Many small matmuls: a multi-threaded BLAS spends more time synchronising than computing.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from bmojo.ops import eidetic_gather  # noqa: E402
from bmojo.ops.ssm_scan import ssm_scan  # noqa: E402
from neuron_kernels.eidetic_gather.kernels import ROWS_PER_TILE, eidetic_gather_bwd, eidetic_gather_fwd  # noqa: E402
from neuron_kernels.interpreter import ShapeOnly, TypedArray, cost, run_kernel  # noqa: E402
from neuron_kernels.ssm_scan.backward import ssm_scan_bwd  # noqa: E402
from neuron_kernels.ssm_scan.forward import ssm_scan_fwd  # noqa: E402
from neuron_kernels.ssm_scan.selective_scan import selective_scan_fwd  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--state-dim", type=int, default=128)
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--gather-selected", type=int, default=1056, help="rows gathered per batch row (S)")
    parser.add_argument("--gather-features", type=int, default=2048, help="features per gathered row (F)")
    parser.add_argument("--gather-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--trace-only", action="store_true", help="count instructions without computing")
    parser.add_argument("--json", type=Path, default=Path("bench/results/nki_cost.json"))
    return parser.parse_args()


def scan_inputs(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    batch, time_steps, heads, groups = args.batch, args.seq_len, args.heads, args.groups

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    return {
        "x": randn(batch, time_steps, heads, args.head_dim),
        "dt": torch.nn.functional.softplus(randn(batch, time_steps, heads) - 2.0),
        "A": -torch.rand(heads, generator=generator) * 4 - 0.5,
        "B": randn(batch, time_steps, groups, args.state_dim),
        "C": randn(batch, time_steps, groups, args.state_dim),
        "D": randn(heads),
        "initial_state": randn(batch, heads, args.head_dim, args.state_dim),
        "d_y": randn(batch, time_steps, heads, args.head_dim),
        "d_final_state": randn(batch, heads, args.head_dim, args.state_dim),
    }


def kernel_args(tensors: dict[str, torch.Tensor], names: list[str], execute: bool) -> list:
    """Host arrays (execute) or shapes (trace) in kernel argument order."""
    if execute:
        return [tensors[name].numpy() for name in names]
    return [ShapeOnly(tuple(tensors[name].shape), "float32") for name in names]


def check_against_torch(tensors: dict, forward_outputs, backward_outputs, chunk_size: int) -> dict[str, float]:
    """max |kernel - torch backend| / max |torch backend| for the outputs and every gradient."""
    names = ["x", "dt", "A", "B", "C", "D", "initial_state"]
    leaves = [tensors[name].clone().requires_grad_() for name in names]
    y, final_state = ssm_scan(*leaves, chunk_size=chunk_size, backend="torch")
    ((y * tensors["d_y"]).sum() + (final_state * tensors["d_final_state"]).sum()).backward()
    reference = [y, final_state] + [leaf.grad for leaf in leaves]
    got = list(forward_outputs) + list(backward_outputs)
    labels = ["y", "final_state"] + [f"d{name}" for name in names]
    return {
        label: float((torch.from_numpy(g) - r.detach()).abs().max() / r.detach().abs().max())
        for label, g, r in zip(labels, got, reference, strict=True)
    }


def gather_inputs(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """src [B, T, F], index [B, S] over a few hundred tokens (most selected rows repeat), d_out [B, S, F]."""
    generator = torch.Generator().manual_seed(1)
    batch, length, selected, features = args.batch, args.seq_len, args.gather_selected, args.gather_features
    dtype = getattr(torch, args.gather_dtype)
    tokens = torch.randperm(length, generator=generator)[: max(1, selected // 4)]
    index = tokens[torch.randint(0, len(tokens), (batch, selected), generator=generator)]
    return {
        "src": torch.randn(batch, length, features, generator=generator).to(dtype),
        "index": index,
        "d_out": torch.randn(batch, selected, features, generator=generator).to(dtype),
    }


def gather_kernel_args(tensors: dict[str, torch.Tensor], execute: bool) -> tuple[list, list]:
    """(forward, backward) kernel arguments: rows b*T + index padded to whole tiles, d_out padded with zeros."""
    src, index, d_out = tensors["src"], tensors["index"], tensors["d_out"]
    (batch, length, _), selected = src.shape, index.shape[1]
    padded = -(-selected // ROWS_PER_TILE) * ROWS_PER_TILE
    offsets = torch.arange(batch).unsqueeze(1) * length
    rows = (torch.nn.functional.pad(index, (0, padded - selected)) + offsets).to(torch.int32)
    d_out = torch.nn.functional.pad(d_out, (0, 0, 0, padded - selected))
    dtype = str(src.dtype).removeprefix("torch.")

    def host(tensor: torch.Tensor):
        if not execute:
            return ShapeOnly(tuple(tensor.shape), dtype)
        return TypedArray(tensor.float().numpy(), dtype) if dtype == "bfloat16" else tensor.numpy()

    rows_arg = rows.numpy() if execute else ShapeOnly(tuple(rows.shape), "int32")
    return [host(src), rows_arg], [host(d_out), rows_arg, length]


def check_gather_against_torch(tensors: dict[str, torch.Tensor], out, d_src) -> dict[str, float]:
    """max |kernel - torch backend| / max |torch backend| for the gathered rows and the source gradient.

    The reference runs in fp32 on the same (bf16-representable) values: the kernel returns d_src in fp32.
    """
    leaf = tensors["src"].float().requires_grad_()
    want = eidetic_gather(leaf, tensors["index"], backend="torch")
    (want.float() * tensors["d_out"].float()).sum().backward()
    got_out = torch.from_numpy(out)[:, : tensors["index"].shape[1]]
    return {
        label: float((g - r.detach().float()).abs().max() / r.detach().float().abs().max())
        for label, g, r in (("out", got_out, want), ("d_src", torch.from_numpy(d_src), leaf.grad))
    }


def report(name: str, run, wall_s: float) -> dict:
    summary = run.stats.summary()
    print(
        f"\n{name}: estimated {summary['estimated_us']:.0f} µs on one trn1 NeuronCore, bound by {summary['bound_by']}"
    )
    print(f"  {'engine':8} {'static':>8} {'executed':>10} {'busy µs':>10}")
    for engine, stats in summary["engines"].items():
        print(f"  {engine:8} {stats['static_instructions']:>8} {stats['instructions']:>10} {stats['busy_us']:>10.0f}")
    print(f"  {'all':8} {summary['static_instructions']:>8} {summary['executed_instructions']:>10}")
    print(f"  peak SBUF {run.peak_sbuf_bytes_per_partition} B/partition, peak PSUM {run.peak_psum_banks} banks")
    return {
        **summary,
        "peak_sbuf_bytes_per_partition": run.peak_sbuf_bytes_per_partition,
        "peak_psum_banks": run.peak_psum_banks,
        "interpreter_wall_s": wall_s,
    }


def timed(kernel, *args, execute: bool):
    start = time.perf_counter()
    run = run_kernel(kernel, *args, execute=execute)
    return run, time.perf_counter() - start


def main() -> None:
    args = parse_args()
    tensors = scan_inputs(args)
    config = {key: getattr(args, key) for key in ("batch", "seq_len", "heads", "head_dim", "state_dim", "groups")}
    config |= {"chunk_size": args.chunk_size, "dtype": "float32"}
    execute = not args.trace_only
    mode = "executed" if execute else "traced"
    print(f"NKI kernel cost ({mode}), {config}")
    scan_names = ["x", "dt", "A", "B", "C", "D", "initial_state"]
    forward, forward_s = timed(
        ssm_scan_fwd, *kernel_args(tensors, scan_names, execute), args.chunk_size, execute=execute
    )
    backward_names = scan_names + ["d_y", "d_final_state"]
    backward, backward_s = timed(
        ssm_scan_bwd, *kernel_args(tensors, backward_names, execute), args.chunk_size, execute=execute
    )
    batch, time_steps, heads, head_dim, state_dim = (
        args.batch,
        args.seq_len,
        args.heads,
        args.head_dim,
        args.state_dim,
    )
    channel_major = [
        ShapeOnly((batch, heads * head_dim, time_steps), "float32"),
        ShapeOnly((batch, heads, time_steps), "float32"),
        ShapeOnly((heads,), "float32"),
        ShapeOnly((batch, args.groups, state_dim, time_steps), "float32"),
        ShapeOnly((batch, args.groups, state_dim, time_steps), "float32"),
        ShapeOnly((heads,), "float32"),
        ShapeOnly((batch, heads, head_dim, state_dim), "float32"),
    ]
    baseline, baseline_s = timed(selective_scan_fwd, *channel_major, execute=False)
    results = {
        "config": config,
        "mode": mode,
        "cost_model": {
            "clock_hz": cost.CLOCK_HZ,
            "static_overhead_cycles": cost.STATIC_OVERHEAD_CYCLES,
            "fp32_matmul_slowdown": cost.FP32_MATMUL_SLOWDOWN,
            "hbm_bytes_per_s_per_core": cost.HBM_BYTES_PER_S_PER_CORE,
        },
        "ssm_scan_fwd": report("ssm_scan forward (chunked, TensorE matmuls)", forward, forward_s),
        "ssm_scan_bwd": report("ssm_scan backward (chunked, recomputes chunk states)", backward, backward_s),
        "selective_scan_fwd_baseline": report(
            "selective-scan forward baseline (tensor_tensor_scan per state per channel tile, traced)",
            baseline,
            baseline_s,
        ),
    }
    gather = gather_inputs(args)
    gather_forward_args, gather_backward_args = gather_kernel_args(gather, execute)
    gather_forward, gather_forward_s = timed(eidetic_gather_fwd, *gather_forward_args, execute=execute)
    gather_backward, gather_backward_s = timed(eidetic_gather_bwd, *gather_backward_args, execute=execute)
    gather_config = f"S={args.gather_selected}, F={args.gather_features}, {args.gather_dtype}"
    results["gather_config"] = {
        "selected": args.gather_selected,
        "features": args.gather_features,
        "dtype": args.gather_dtype,
    }
    results["eidetic_gather_fwd"] = report(
        f"eidetic_gather forward (indirect DMA gather, {gather_config})", gather_forward, gather_forward_s
    )
    results["eidetic_gather_bwd"] = report(
        f"eidetic_gather backward (duplicates combined on TensorE, one scatter per row, {gather_config})",
        gather_backward,
        gather_backward_s,
    )
    ratio = results["selective_scan_fwd_baseline"]["estimated_us"] / results["ssm_scan_fwd"]["estimated_us"]
    results["baseline_over_chunked_forward"] = ratio
    print(f"\nforward: the selective-scan baseline is estimated {ratio:.1f}x slower than the chunked kernel")
    if execute:
        errors = check_against_torch(tensors, forward.outputs, backward.outputs, args.chunk_size)
        results["max_relative_error_vs_torch"] = errors
        print("max |kernel - torch backend| / max |torch backend|:", {k: f"{v:.1e}" for k, v in errors.items()})
        gather_errors = check_gather_against_torch(gather, gather_forward.outputs, gather_backward.outputs)
        results["eidetic_gather_max_relative_error_vs_torch"] = gather_errors
        print("eidetic_gather, same measure:", {k: f"{v:.1e}" for k, v in gather_errors.items()})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
