"""Decode latency per token and cache memory against context length, every family member side by side.

    python bench/decode.py [--contexts 512 1024 2048 4096 8192] [--tokens 16] [--batch 1] [--json ...]

For each context length L, every member (equal parameter count) prefills ``--batch`` sequences of L random
tokens with the parallel form, then decodes ``--tokens`` tokens one at a time from its cache; the median time
of one decode step (all sequences of the batch) is reported with the cache size after the prefill (bytes of
every tensor the cache holds). Members alternate token by token so a slow spell of a shared machine hits them
alike. ``--compile`` decodes every member through its compiled step (``compile_decoding``); the variants it
compiles in its first tokens are left out of the timing by ``--warmup`` tokens first. ``--store-topk R`` adds
``B+store``: B with an in-storage memory that each query reads ``R`` entries from (no parameters of its own; its
store grows with the context, and it decodes eagerly); ``--store-index hnsw`` (or ``flat``) also times that
store searched through a faiss index (``B+store:hnsw``).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from bmojo import BmojoConfig, BmojoForCausalLM
from bmojo.eval.family import (
    FAMILY,
    add_run_arguments,
    add_size_arguments,
    family_configs,
    median_seconds,
    parameter_count,
    size_fields,
    start_run,
    synchronize,
    write_report,
)


def tensor_bytes(state: object) -> int:
    """Bytes of all tensors reachable through dataclass fields and lists (a cache's recurrent state)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if dataclasses.is_dataclass(state):
        return sum(tensor_bytes(getattr(state, f.name)) for f in dataclasses.fields(state))
    if isinstance(state, list | tuple):
        return sum(tensor_bytes(item) for item in state)
    return 0


def decode_step(model: BmojoForCausalLM, cache, tokens: torch.Tensor, device: torch.device):
    """Each call decodes the next of ``tokens`` ([N, B, 1]) from ``cache``, finished on the device."""
    remaining = iter(tokens)

    def step() -> None:
        model(next(remaining), cache=cache, use_cache=True)
        synchronize(device)

    return step


@torch.no_grad()
def bench_context(args: argparse.Namespace, context: int, models: dict[str, BmojoForCausalLM]) -> dict:
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab_size, (args.batch, context), generator=generator).to(args.device)
    # One warm-up token a member in median_seconds' first round, plus --warmup more before it.
    next_tokens = torch.randint(0, args.vocab_size, (args.warmup + args.tokens + 1, args.batch, 1), generator=generator)
    next_tokens = next_tokens.to(args.device)
    steps, rows = {}, {}
    for member, model in models.items():
        cache = model(prompt, use_cache=True).cache
        rows[member] = {"cache_bytes": tensor_bytes(cache.states)}
        steps[member] = decode_step(model, cache, next_tokens, args.device)
        for _ in range(args.warmup):
            steps[member]()
    # One token a round for every member: the first warms up, the next ``--tokens`` are timed.
    seconds = median_seconds(steps, args.tokens)
    for member, row in rows.items():
        row["ms_per_token"] = 1e3 * seconds[member]
    if "A" in rows:
        for row in rows.values():
            row["vs_A"] = row["ms_per_token"] / rows["A"]["ms_per_token"]
    return {"context": context, "members": rows}


def build_models(args: argparse.Namespace, configs: dict) -> dict[str, BmojoForCausalLM]:
    """Every member once, for all contexts (a compiled step compiles once, not once per context)."""
    models = {}
    for member, config in configs.items():
        torch.manual_seed(0)
        models[member] = BmojoForCausalLM(config).eval().to(args.device)
        if args.compile and not config.store_topk:  # the store needs eager steps
            models[member].compile_decoding()
    return models


def print_table(results: list[dict]) -> None:
    header = f"{'context':>8} {'member':<7} {'ms/token':>9} {'vs A':>6} {'cache KiB':>10}"
    print(header)
    print("-" * len(header))
    for result in results:
        for member, row in result["members"].items():
            ratio = f"{row['vs_A']:6.2f}" if "vs_A" in row else f"{'-':>6}"
            print(
                f"{result['context']:>8} {member:<7} {row['ms_per_token']:>9.2f} {ratio} "
                f"{row['cache_bytes'] / 1024:>10.1f}"
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=Path("bench/results/decode.json"))
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--members", nargs="+", default=list(FAMILY), choices=FAMILY)
    parser.add_argument("--tokens", type=int, default=16, help="decoded tokens per context (median reported)")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together (ms is per step of all)")
    parser.add_argument("--compile", action="store_true", help="decode through compiled steps (compile_decoding)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed tokens first (default: 0, or 4 compiled)")
    parser.add_argument("--store-topk", type=int, default=0, help="also time B with an in-storage memory (R > 0)")
    parser.add_argument("--store-index", default="dense", choices=["dense", "flat", "hnsw"], help="and through faiss")
    add_run_arguments(parser)
    add_size_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.device = start_run(args)
    if args.warmup is None:
        args.warmup = 4 if args.compile else 0
    configs = family_configs(tuple(args.members), **size_fields(args))
    if args.store_topk:
        reference = configs.get("B") or family_configs(("B",), **size_fields(args))["B"]
        configs["B+store"] = BmojoConfig(**{**reference.to_diff_dict(), "store_topk": args.store_topk})
        if args.store_index != "dense":  # the same store searched through a faiss index from its first entry
            index = {"store_index": args.store_index, "store_index_from": 0}
            configs[f"B+store:{args.store_index}"] = BmojoConfig(**{**configs["B+store"].to_diff_dict(), **index})
    models = build_models(args, configs)
    results = []
    for context in args.contexts:
        results.append(bench_context(args, context, models))
        print_table(results[-1:])
    write_report(
        args.json,
        "decode",
        args.device,
        decoded_tokens=args.tokens,
        batch=args.batch,
        compiled=args.compile,
        warmup_tokens=args.warmup,
        model=size_fields(args),
        parameters={member: parameter_count(config) for member, config in configs.items()},
        results=results,
    )


if __name__ == "__main__":
    main()
