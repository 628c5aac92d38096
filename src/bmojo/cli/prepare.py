"""``bmojo-prepare``: tokenize a recipe's corpus once into a folder of token shards that training memory-maps.

    bmojo-prepare [--workers N] [--shard-documents D] data.prepared=FOLDER [the run's other overrides]

Take the same overrides as the ``bmojo-train`` command that will read the folder (``experiment=...``,
``data=...``, ``seed=...``); training refuses a folder prepared from another recipe. An interrupted prepare
continues where it stopped when rerun.
"""

from __future__ import annotations

import argparse
import os

from omegaconf import OmegaConf

from bmojo.cli.common import user_errors
from bmojo.data import DataError, prepare_folder
from bmojo.data.shards import DEFAULT_SHARD_DOCUMENTS
from bmojo.train import RunConfig, compose_recipe, register_configs


def compose_run_config(overrides: list[str]) -> RunConfig:
    """The recipe ``bmojo-train`` would run with ``overrides``."""
    register_configs()
    return OmegaConf.to_object(compose_recipe(overrides))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="bmojo-prepare",
        description="Tokenize the recipe's documents once into data.prepared=FOLDER (token shards and a "
        "manifest); then train with the same overrides, and every process memory-maps the folder.",
    )
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes (one core each)")
    parser.add_argument(
        "--shard-documents",
        type=int,
        default=DEFAULT_SHARD_DOCUMENTS,
        help=f"documents per shard, a multiple of 1000 (default {DEFAULT_SHARD_DOCUMENTS:,})",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, as for bmojo-train; data.prepared=FOLDER")
    args = parser.parse_args(argv)
    # Parallelism comes from --workers; each worker tokenizes on one core, so N workers use N cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    with user_errors("bmojo-prepare"):
        config = compose_run_config(args.overrides)
        if not config.data.prepared:
            raise DataError("say where to write the shards: data.prepared=FOLDER (on storage every node reads)")
        result = prepare_folder(
            config.data, config.seed, config.data.prepared, args.workers, args.shard_documents, progress=not args.quiet
        )
    if not result.manifest_written:
        print(f"{result.folder}: already prepared ({result.tokens:,} tokens in {result.shards} shards)")
        return
    if result.shards_written == 0:
        print(
            f"{result.folder}: all {result.shards} shards were there ({result.tokens:,} tokens from "
            f"{result.documents:,} documents); wrote the missing manifest"
        )
        return
    print(
        f"{result.folder}: {result.tokens:,} tokens from {result.documents:,} documents in {result.shards} shards "
        f"({result.shards_written} written now) in {result.seconds:.1f} s, {result.tokens_per_s:,.0f} tokens/s "
        f"with {args.workers} worker(s)"
    )


if __name__ == "__main__":
    main()
