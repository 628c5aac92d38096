"""``bmojo-generate``: sample text from a run, a checkpoint or an exported model."""

from __future__ import annotations

import argparse

from bmojo.cli.common import user_errors
from bmojo.train import generate_sample, load_model_and_tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bmojo-generate", description="Sample a continuation of a prompt.")
    parser.add_argument("model", help="an exported folder, a run folder or a checkpoint folder")
    parser.add_argument("--prompt", default="def ", help="text to continue (default: %(default)r)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="decode through a compiled step (faster per token after a few seconds of compiling; needs a C++ "
        "compiler on a CPU)",
    )
    args = parser.parse_args(argv)
    with user_errors("bmojo-generate"):
        model, tokenizer = load_model_and_tokenizer(args.model)
        if args.compile:
            model.compile_decoding()
        text = generate_sample(
            model, tokenizer, args.prompt, args.max_new_tokens, args.seed, args.temperature, args.top_k
        )
    print(text)


if __name__ == "__main__":
    main()
