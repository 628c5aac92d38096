"""``bmojo-eval``: perplexity at several context lengths (or MQAR recall accuracy), samples; JSON out."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf

from bmojo.cli.common import user_errors
from bmojo.data import DataConfig, DataSource
from bmojo.eval.mqar import evaluate_mqar
from bmojo.eval.perplexity import heldout_perplexity
from bmojo.train import generate_sample, load_model_and_tokenizer
from bmojo.train.checkpoint import resolve_model_folder


def training_data_config(model_folder: Path) -> DataConfig:
    """The data section of the run that produced ``model_folder`` (its saved config.yaml), else the default."""
    base = OmegaConf.structured(DataConfig)
    for candidate in (model_folder / "config.yaml", model_folder.parent / "config.yaml"):
        if candidate.is_file():
            return OmegaConf.merge(base, OmegaConf.load(candidate).get("data", {}))
    return base


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="bmojo-eval",
        description="Perplexity on held-out text at several context lengths (length extrapolation). The data is "
        "the model's training data unless overridden, e.g. data.source=files 'data.paths=[notes/*.txt]'.",
    )
    parser.add_argument("model", help="an exported folder, a run folder or a checkpoint folder")
    parser.add_argument("overrides", nargs="*", help="data.* overrides in recipe syntax")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=8, help="held-out batches of the longest length")
    parser.add_argument("--mqar-examples", type=int, default=256, help="test examples when the data is MQAR")
    parser.add_argument("--samples", type=int, default=0, help="also print this many sampled continuations")
    parser.add_argument("--prompt", default="def ", help="prompt of the samples")
    parser.add_argument("--sample-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1234, help="the seed the run split its data with")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    with user_errors("bmojo-eval"):
        folder = resolve_model_folder(args.model)
        data = training_data_config(folder)
        for override in args.overrides:
            if not override.startswith("data."):
                raise ValueError(f"override {override!r}: only data.* keys can be set here")
        data = OmegaConf.merge(data, OmegaConf.from_dotlist([o[len("data.") :] for o in args.overrides]))
        model, tokenizer = load_model_and_tokenizer(folder)
        data = OmegaConf.to_object(data)
        report: dict = {}
        if data.source == DataSource.mqar:
            mqar = evaluate_mqar(model, data.mqar, data.seq_len, args.mqar_examples, args.batch_size, args.seed)
            report["mqar"] = {"num_pairs": data.mqar.num_pairs, "seq_len": data.seq_len, **asdict(mqar)}
        else:
            results = heldout_perplexity(model, tokenizer, data, args.lengths, args.batch_size, args.batches, args.seed)
            report["perplexity"] = [{**asdict(result), "perplexity": result.perplexity} for result in results]
        report["samples"] = [
            generate_sample(model, tokenizer, args.prompt, args.sample_tokens, seed=i) for i in range(args.samples)
        ]
    if "mqar" in report:
        mqar = report["mqar"]
        print(f"MQAR recall accuracy {mqar['accuracy']:.4f} over {mqar['queries']} queries (K={mqar['num_pairs']})")
        for layer, share in enumerate(mqar["value_in_memory"]):
            print(f"  B layer {layer}: the queried value was in memory for {share:.1%} of the queries")
    else:
        print(f"{'length':>8} {'loss':>8} {'perplexity':>11}")
        for row in report["perplexity"]:
            print(f"{row['length']:>8} {row['loss']:>8.4f} {row['perplexity']:>11.2f}")
    for sample in report["samples"]:
        print(f"sample: {sample}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
