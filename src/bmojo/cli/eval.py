"""``bmojo-eval``: held-out loss and perplexity of a model at several context lengths."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from omegaconf import OmegaConf

from bmojo.cli.common import user_errors
from bmojo.data import DataConfig, eval_batches, prepare_data
from bmojo.train import load_model_and_tokenizer
from bmojo.train.checkpoint import resolve_model_folder


def training_data_config(model_folder: Path) -> DataConfig:
    """The data section of the run that produced ``model_folder`` (its saved config.yaml), else the default."""
    base = OmegaConf.structured(DataConfig)
    for candidate in (model_folder / "config.yaml", model_folder.parent / "config.yaml"):
        if candidate.is_file():
            return OmegaConf.merge(base, OmegaConf.load(candidate).get("data", {}))
    return base


@torch.no_grad()
def evaluate_lengths(model, tokenizer, data: DataConfig, lengths: list[int], batch_size: int, batches: int, seed: int):
    """``[(length, mean next-token loss)]`` on the held-out split packed at each length."""
    model.eval()
    results = []
    for length in lengths:
        data.seq_len = length
        _, packed = prepare_data(data, seed, tokenizer)
        total, count = 0.0, 0
        for batch in eval_batches(packed.val, batch_size, batches):
            out = model(batch, labels=batch)
            total += float(out.loss - out.aux_loss) * batch.shape[0]
            count += batch.shape[0]
        results.append((length, total / count))
    return results


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
    parser.add_argument("--batches", type=int, default=8, help="held-out batches per length")
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
        results = evaluate_lengths(
            model, tokenizer, OmegaConf.to_object(data), args.lengths, args.batch_size, args.batches, args.seed
        )
    print(f"{'length':>8} {'loss':>8} {'perplexity':>11}")
    for length, loss in results:
        print(f"{length:>8} {loss:>8.4f} {math.exp(loss):>11.2f}")
    if args.json:
        args.json.write_text(json.dumps([{"length": n, "loss": v, "perplexity": math.exp(v)} for n, v in results]))


if __name__ == "__main__":
    main()
