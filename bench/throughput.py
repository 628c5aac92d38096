"""Training-step throughput of every family member at equal parameter count, side by side in one run.

    python bench/throughput.py [--seq-lens 512 2048 8192] [--tokens 8192] [--repeats 3] [--json ...]

A step is forward + backward + AdamW update on ``--tokens`` tokens (batch = tokens / T). Members are timed
round-robin (one step of each in turn, ``--repeats`` rounds after a warm-up round), so a slow spell of a
shared machine hits every member alike; the median step is reported, with each member's speed relative to
the Transformer (``A``) and to sliding-window attention (``W``) at the same length.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bmojo import BmojoForCausalLM
from bmojo.eval.family import (
    FAMILY,
    add_run_arguments,
    add_size_arguments,
    family_configs,
    median_seconds,
    parameter_fields,
    size_fields,
    start_run,
    synchronize,
    write_report,
)
from bmojo.train.trainer import compile_blocks as compile_every_block


def make_step(
    model: BmojoForCausalLM, batch: int, seq_len: int, vocab_size: int, device: torch.device, bf16: bool = False
):
    """One training step on fixed random tokens: forward (under bf16 autocast if asked), backward, AdamW update,
    finished on the device."""
    ids = torch.randint(0, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=device.type == "cuda")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        synchronize(device)

    return step


def build_model(config, compile_blocks: bool) -> BmojoForCausalLM:
    """A member in training mode; with ``compile_blocks`` every block ``torch.compile``'d (as torchtitan applies
    it: per block, from outside the model code)."""
    torch.manual_seed(0)
    model = BmojoForCausalLM(config).train()
    if compile_blocks:
        compile_every_block(model)  # as trainer.compile_blocks does
    return model


def bench_length(args: argparse.Namespace, seq_len: int) -> dict:
    batch = max(1, args.tokens // seq_len)
    configs = family_configs(tuple(args.members), **size_fields(args))
    steps = {}
    for member, config in configs.items():
        model = build_model(config, args.compile)
        steps[member] = make_step(model, batch, seq_len, config.vocab_size, args.device, args.bf16)
    seconds = median_seconds(steps, args.repeats)
    rows = {}
    for member, config in configs.items():
        rows[member] = {
            **parameter_fields(config),
            "intermediate_size": config.intermediate_size,
            "step_s": seconds[member],
            "tokens_per_s": batch * seq_len / seconds[member],
        }
    for reference in ("A", "W"):
        if reference in rows:
            for row in rows.values():
                row[f"vs_{reference}"] = row["tokens_per_s"] / rows[reference]["tokens_per_s"]
    return {"seq_len": seq_len, "batch": batch, "members": rows}


def profile_step(args: argparse.Namespace, seq_len: int) -> None:
    """Print where one training step of ``args.profile`` spends its time, operator by operator."""
    config = family_configs((args.profile,), **size_fields(args))[args.profile]
    batch = max(1, args.tokens // seq_len)
    model = build_model(config, args.compile)
    step = make_step(model, batch, seq_len, config.vocab_size, args.device, args.bf16)
    step()
    with torch.profiler.profile() as profiler:
        step()
    print(f"\n{args.profile} at T={seq_len}:")
    # On a GPU what bounds the step is the device's time per kernel, not the host's per operator.
    sort_by = "self_device_time_total" if args.device.type == "cuda" else "self_cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=20))


def print_table(results: list[dict]) -> None:
    header = f"{'T':>6} {'member':<7} {'params':>9} {'step ms':>9} {'tokens/s':>9} {'vs A':>6} {'vs W':>6}"
    print(header)
    print("-" * len(header))
    for result in results:
        for member, row in result["members"].items():
            ratios = " ".join(f"{row[key]:6.2f}" if key in row else f"{'-':>6}" for key in ("vs_A", "vs_W"))
            print(
                f"{result['seq_len']:>6} {member:<7} {row['parameters']:>9,} {row['step_s'] * 1e3:>9.1f} "
                f"{row['tokens_per_s']:>9.0f} {ratios}"
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=Path("bench/results/throughput.json"))
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--members", nargs="+", default=list(FAMILY), choices=FAMILY)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per step (batch = tokens / T)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    add_run_arguments(parser)
    parser.add_argument("--bf16", action="store_true", help="forward under bf16 autocast (default: fp32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every block (compiled in the warm-up)")
    parser.add_argument("--profile", choices=FAMILY, help="also print the top operators of one step of this member")
    add_size_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.device = start_run(args)
    results = []
    for seq_len in args.seq_lens:
        results.append(bench_length(args, seq_len))
        print_table(results[-1:])
        if args.profile:
            profile_step(args, seq_len)
    write_report(
        args.json,
        "throughput",
        args.device,
        autocast="bf16" if args.bf16 else None,
        compiled=args.compile,
        repeats=args.repeats,
        tokens_per_step=args.tokens,
        model=size_fields(args),
        results=results,
    )


if __name__ == "__main__":
    main()
