"""``bmojo-export``: write a run's (or a checkpoint's) model as a Hugging Face folder."""

from __future__ import annotations

import argparse

from bmojo.cli.common import user_errors
from bmojo.train import export_model, load_model_and_tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="bmojo-export",
        description="Export a run's latest checkpoint (or a given checkpoint) to a folder that "
        "transformers' AutoModelForCausalLM.from_pretrained loads after `import bmojo`, or in any process with "
        "trust_remote_code=True (the folder carries the small modules its config's auto_map names).",
    )
    parser.add_argument("source", help="a run folder, its checkpoints/ folder, or one checkpoint folder")
    parser.add_argument("out_dir", help="the folder to write (replaced if it exists)")
    args = parser.parse_args(argv)
    with user_errors("bmojo-export"):
        model, tokenizer = load_model_and_tokenizer(args.source)
        out = export_model(model, tokenizer, args.out_dir)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"exported {model.config.layer_pattern} model ({parameters:,} parameters) to {out}")


if __name__ == "__main__":
    main()
