"""MQAR sweep: train each family member on the ``mqar_*`` recipes and measure recall on fresh examples.

    python bench/mqar.py --members A W M MW F B --fillers periodic noise --pairs 8
    python bench/mqar.py --members B --pairs 4 8 12 --memory-sizes 24      # K against a fixed memory
    python bench/mqar.py --members B --pairs 8 --memory-sizes 8 16 24     # the memory against a fixed K
    python bench/mqar.py --layout zoology --members A W M MW F B --pairs 8 --override data.seq_len=64

Every point of the grid (member x filler x K x M) is one training run of ``experiment=mqar_<member>`` with
those overrides (plus any ``--override``), in ``--runs/<point>``. ``--layout zoology`` trains on Zoology's
layout instead (``data=mqar_zoology``: random filler over the whole vocabulary, so ``--fillers`` does not apply
and the points are named ``zoology``); its result is written to
``--runs/<point>.json`` as soon as it finishes, and points with a result are skipped, so an interrupted sweep
resumes where it stopped and several sweeps can share one folder. After each point the results of the folder
are gathered into ``--json`` (the input of ``bmojo-report``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bmojo.eval.family import FAMILY, compose_bench_run, parameter_fields
from bmojo.eval.mqar import evaluate_mqar
from bmojo.train import load_model_and_tokenizer, register_configs, train


def point_name(member: str, filler: str, pairs: int, memory_size: int | None, tag: str = "") -> str:
    memory = f"_M{memory_size}" if memory_size is not None else ""
    return f"{member}_{filler}{'_' + tag if tag else ''}_K{pairs}{memory}"


def run_point(args: argparse.Namespace, member: str, filler: str, pairs: int, memory_size: int | None) -> dict:
    """Train one member at one grid point (``memory_size`` None: the member has no eidetic memory)."""
    run_dir = args.runs / point_name(member, filler, pairs, memory_size, args.tag)
    data = ["data=mqar_zoology"] if args.layout == "zoology" else [f"data.mqar.filler={filler}"]
    overrides = [
        f"experiment=mqar_{member}",
        *data,
        f"data.mqar.num_pairs={pairs}",
        *([f"model.memory_size={memory_size}"] if memory_size is not None else []),
        *args.override,
    ]
    config = compose_bench_run(overrides, run_dir, args.threads)
    started = time.perf_counter()
    summary = train(config, run_dir)
    train_s = time.perf_counter() - started
    model, _ = load_model_and_tokenizer(run_dir)
    data = OmegaConf.to_object(config).data
    result = evaluate_mqar(model, data.mqar, data.seq_len, args.test_examples, seed=config.seed)
    zoology = args.layout == "zoology"
    return {
        "member": member,
        "filler": filler,
        "variant": args.tag,
        "num_pairs": pairs,
        # Zoology's values are the upper half of its vocabulary.
        "num_values": data.mqar.vocab_size // 2 if zoology else data.mqar.num_values,
        "memory_size": memory_size,
        "store_topk": model.config.store_topk,
        "seq_len": data.seq_len,
        "window": model.config.window_size,
        "gap": None if zoology else data.mqar.gap,
        "power_a": data.mqar.power_a if zoology else None,
        "steps": summary.step,
        **parameter_fields(model.config),
        "accuracy": result.accuracy,
        "queries": result.queries,
        "value_in_memory": result.value_in_memory,
        "final_val_loss": summary.final_val_loss,
        "train_s": train_s,
        "overrides": overrides,
    }


def gather(args: argparse.Namespace) -> None:
    """Write every finished point of the runs folder into one report for bmojo-report."""
    runs = [json.loads(path.read_text()) for path in sorted(args.runs.glob("*.json"))]
    report = {
        "bench": "mqar",
        "torch_version": torch.__version__,
        "threads": args.threads or torch.get_num_threads(),
        "test_examples": args.test_examples,
        "chance": min((1 / run["num_values"] for run in runs), default=None),  # guessing one of the values
        "runs": runs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", nargs="+", default=list(FAMILY), choices=FAMILY)
    parser.add_argument("--layout", default="gapped", choices=["gapped", "zoology"], help="the data layout")
    parser.add_argument("--fillers", nargs="+", default=["periodic"], choices=["periodic", "noise"])
    parser.add_argument("--pairs", type=int, nargs="+", default=[8], help="K values")
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[24], help="M values (B'MOJO only)")
    parser.add_argument("--override", nargs="*", default=[], help="extra recipe overrides for every run")
    parser.add_argument("--tag", default="", help="names a variant made by --override (in run names and results)")
    parser.add_argument("--test-examples", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads of each run")
    parser.add_argument("--runs", type=Path, default=Path("runs/mqar_sweep"), help="one folder and JSON per point")
    parser.add_argument("--json", type=Path, default=Path("bench/results/mqar.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    register_configs()
    args.runs.mkdir(parents=True, exist_ok=True)
    for filler in ["zoology"] if args.layout == "zoology" else args.fillers:
        for pairs in args.pairs:
            for member in args.members:
                # Only B'MOJO has an eidetic memory; the other members run once per (filler, K).
                for memory_size in args.memory_sizes if member == "B" else [None]:
                    name = point_name(member, filler, pairs, memory_size, args.tag)
                    result_path = args.runs / f"{name}.json"
                    if result_path.exists():
                        continue
                    result = run_point(args, member, filler, pairs, memory_size)
                    result_path.write_text(json.dumps(result, indent=1))
                    print(
                        f"{name:<28} accuracy {result['accuracy']:.3f} ({result['train_s'] / 60:.1f} min)",
                        flush=True,
                    )
                    gather(args)
    gather(args)


if __name__ == "__main__":
    main()
