"""Length extrapolation: train each member at one length, measure held-out perplexity at 1x, 2x, 4x and 8x.

    python bench/extrapolation.py [--members A F B] [--multiples 1 2 4 8] [--json ...]
    python bench/extrapolation.py --members B --override model.memory_rope=false --tag no-memory-rope
        --json bench/results/extrapolation_no_memory_rope.json      (one command: memory keys without RoPE)

Each member trains with ``experiment=extrapolation_<member>`` (plus any ``--override``) in ``--runs/<member>``
(``<member>_<tag>`` with ``--tag``; a finished run is reused); then every length reads the same held-out tokens
(the split is packed at the longest length and cut), so perplexities differ only by how much context each token
had.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bmojo.eval.family import FAMILY, compose_bench_run, parameter_fields
from bmojo.eval.perplexity import heldout_perplexity
from bmojo.train import load_model_and_tokenizer, register_configs, train
from bmojo.train.checkpoint import latest_checkpoint


def run_member(args: argparse.Namespace, member: str) -> dict:
    run_dir = args.runs / (f"{member}_{args.tag}" if args.tag else member)
    overrides = [f"experiment=extrapolation_{member}", *args.override]
    config = OmegaConf.to_object(compose_bench_run(overrides, run_dir, args.threads))
    started = time.perf_counter()
    if latest_checkpoint(run_dir / "checkpoints") is None or args.retrain:
        train(config, run_dir)
    train_s = time.perf_counter() - started
    model, tokenizer = load_model_and_tokenizer(run_dir)
    lengths = [config.data.seq_len * multiple for multiple in args.multiples]
    results = heldout_perplexity(
        model, tokenizer, config.data, lengths, args.batch_size, args.blocks // args.batch_size, config.seed
    )
    return {
        "member": member,
        "variant": args.tag,
        "overrides": overrides,
        **parameter_fields(model.config),
        "train_len": config.data.seq_len,
        "steps": config.trainer.max_steps,
        "train_s": train_s,
        "perplexity": [{**asdict(result), "perplexity": result.perplexity} for result in results],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", nargs="+", default=["A", "F", "B"], choices=FAMILY)
    parser.add_argument("--multiples", type=int, nargs="+", default=[1, 2, 4, 8], help="of the training length")
    parser.add_argument("--blocks", type=int, default=16, help="held-out blocks of the longest length")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--override", nargs="*", default=[], help="extra recipe overrides for every run")
    parser.add_argument("--tag", default="", help="names a variant made by --override (run folders, results)")
    parser.add_argument("--retrain", action="store_true", help="train again even where a run exists")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--runs", type=Path, default=Path("runs/extrapolation"))
    parser.add_argument("--json", type=Path, default=Path("bench/results/extrapolation.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    register_configs()
    runs = []
    for member in args.members:
        runs.append(run_member(args, member))
        rows = runs[-1]["perplexity"]
        print(member, " ".join(f"{row['length']}: {row['perplexity']:.2f}" for row in rows), flush=True)
    report = {
        "bench": "extrapolation",
        "torch_version": torch.__version__,
        "train_len": runs[0]["train_len"],
        "runs": runs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
