"""What the pretraining geometry costs: training throughput of one member at several (sequence, window) pairs,
side by side in one run.

    python bench/geometry.py [--geometries 2048:2048 2048:512 8192:2048] [--members W F B] [--tokens 8192]

The 130m-1.4b presets once trained at T = 2048 with window 2048, where no query sees a fading key or a memory
entry; they now train at T = 2048 with window 512 (the B'MOJO-F release keeps window 2048 and trains at 8192).
Every step holds ``--tokens`` tokens (batch = tokens / T), so tokens/s compare the same work; steps go
round-robin over all (member, geometry) pairs, and each geometry is reported relative to the first one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from throughput import build_model, make_step

from bmojo import BmojoConfig
from bmojo.eval.family import (
    FAMILY,
    add_run_arguments,
    median_seconds,
    parameter_fields,
    start_run,
    write_report,
)


def geometry(text: str) -> tuple[int, int]:
    """``T:w`` -> (sequence length, window)."""
    seq_len, window = (int(part) for part in text.split(":"))
    return seq_len, window


def member_config(args: argparse.Namespace, member: str, window: int) -> BmojoConfig:
    """A small member with the presets' memory settings (memory blocks of 256, 256 entries, 4 candidates)."""
    return BmojoConfig(
        layer_pattern=member,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        window_size=window,
        ssm_state_size=16,
        ssm_head_dim=32,
        ssm_chunk_size=64,
        memory_size=256,
        memory_topk=4,
        memory_block=256,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=Path("bench/results/geometry.json"))
    parser.add_argument("--geometries", type=geometry, nargs="+", default=[(2048, 2048), (2048, 512), (8192, 2048)])
    parser.add_argument("--members", nargs="+", default=["A", "W", "F", "B"], choices=FAMILY)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per step (batch = tokens / T)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    device = start_run(args)
    steps, configs = {}, {}
    for member in args.members:
        for seq_len, window in args.geometries:
            key = f"{member} T={seq_len} w={window}"
            configs[key] = (member, seq_len, window, member_config(args, member, window))
            model = build_model(configs[key][3], compile_blocks=False)
            steps[key] = make_step(model, max(1, args.tokens // seq_len), seq_len, args.vocab_size, device)
    seconds = median_seconds(steps, args.repeats)
    tokens_per_s = {
        key: max(1, args.tokens // seq_len) * seq_len / seconds[key] for key, (_, seq_len, _, _) in configs.items()
    }
    first = {}  # each member's first geometry: what its others are measured against
    for key, (member, *_rest) in configs.items():
        first.setdefault(member, tokens_per_s[key])
    rows = []
    print(f"{'member':<7} {'T':>6} {'window':>7} {'tokens/s':>9} {'vs first':>9}")
    for key, (member, seq_len, window, config) in configs.items():
        ratio = tokens_per_s[key] / first[member]
        row = {"member": member, "seq_len": seq_len, "window": window, "step_s": seconds[key]}
        row |= {"tokens_per_s": tokens_per_s[key], "vs_first": ratio, **parameter_fields(config)}
        rows.append(row)
        print(f"{member:<7} {seq_len:>6} {window:>7} {row['tokens_per_s']:>9.0f} {ratio:>9.2f}")
    model = {"hidden_size": args.hidden_size, "num_hidden_layers": args.layers, "memory_size": 256}
    write_report(args.json, "geometry", device, model=model, tokens_per_step=args.tokens, results=rows)


if __name__ == "__main__":
    main()
