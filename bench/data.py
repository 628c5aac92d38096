"""Pretraining data at scale: bmojo-prepare's throughput, the prepared loader's throughput against what a 130m
training step consumes, and the loader's resident memory at two corpus sizes.

    python bench/data.py [--workdir /tmp/bmojo_data_bench] [--sizes-gb 0.25 1.0] [--keep] [--json ...]

1. Writes a synthetic, text-like corpus (seeded word salad: words of 1-10 letters drawn by a Zipf law, with
   punctuation and line breaks) as jsonl files of ``--file-mb`` each; the smaller corpus is the first files
   of the larger.
2. Trains a byte-level BPE (``--vocab-size`` entries) on the first ``--bpe-sample-mb`` of text and passes it as
   ``data.tokenizer=<its folder>``.
3. Runs ``bmojo-prepare`` on the largest corpus with 1 and 2 workers (wall time of the whole command, after
   a first read has put the corpus in the ``datasets`` cache, so both runs start alike) and checks that both
   folders hold the same bytes; prepares the smaller corpus too.
4. In a fresh process per corpus, serves ``--loader-steps`` steps of ``--micro-batch`` blocks of
   ``--seq-len`` from the prepared folder (the training loader, shuffled) and records tokens/s and the
   process's resident memory (VmRSS; RssAnon excludes the pages of the memory-mapped shards).
5. Times one forward + backward of B'MOJO-130m (vocabulary 50304) on one micro-batch of ``--seq-len`` tokens:
   the tokens/s a 130m training step consumes on this machine, to set against the loader.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "data.json"


def write_corpus(folder: Path, total_mb: float, file_mb: float, seed: int = 0) -> list[Path]:
    """Jsonl files of word-salad documents (about 2 KB each) adding up to ``total_mb``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    vocabulary = np.array(["".join(rng.choice(letters, size=rng.integers(1, 11))) for _ in range(20000)])
    files, written, index = [], 0, 0
    while written < total_mb * 1e6:
        path = folder / f"part{index:03d}.jsonl"
        if not path.exists():
            lines = []
            size = 0
            while size < file_mb * 1e6:
                words = vocabulary[np.minimum(rng.zipf(1.2, size=rng.integers(200, 500)), len(vocabulary)) - 1]
                text = " ".join(words.tolist()).replace(" e ", ". ").replace(" t ", ",\n")
                lines.append(json.dumps({"text": text}))
                size += len(text) + 12
            path.write_text("\n".join(lines) + "\n")
        written += path.stat().st_size
        files.append(path)
        index += 1
    return files


def train_sample_tokenizer(files: list[Path], folder: Path, vocab_size: int, sample_mb: float) -> Path:
    from bmojo.data import train_bpe

    def sample():
        read = 0
        for path in files:
            for line in path.open():
                text = json.loads(line)["text"]
                read += len(text)
                yield text
                if read >= sample_mb * 1e6:
                    return

    train_bpe(sample(), vocab_size).save_pretrained(str(folder))
    return folder


def data_overrides(files: list[Path], tokenizer: Path, cache: Path, folder: Path, seq_len: int) -> list[str]:
    paths = ",".join(str(path) for path in files)
    return [
        "data=files",
        f"data.paths=[{paths}]",
        f"data.tokenizer={tokenizer}",
        f"data.cache_dir={cache}",
        f"data.seq_len={seq_len}",
        "data.val_fraction=0.005",
        f"data.prepared={folder}",
    ]


def run_prepare(overrides: list[str], workers: int, shard_documents: int) -> float:
    """Wall seconds of ``bmojo-prepare --workers N`` on ``overrides``."""
    command = [sys.executable, "-m", "bmojo.cli.prepare", "--workers", str(workers), "--quiet"]
    command += ["--shard-documents", str(shard_documents), *overrides]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"bmojo-prepare failed:\n{result.stderr[-4000:]}")
    print(result.stdout.strip())
    return time.perf_counter() - started


def memory_kb() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0])
    return fields


def measure_loader(overrides: list[str], steps: int, micro_batch: int) -> dict:
    """Serve ``steps`` shuffled steps from the prepared folder; runs in a fresh process (``--measure-loader``)."""
    from bmojo.cli.prepare import compose_run_config
    from bmojo.data import prepare_data, training_loader

    config = compose_run_config(overrides)
    before = memory_kb()
    _, data = prepare_data(config.data, config.seed)
    loader = training_loader(data, micro_batch, 1, config.seed)
    loader.next_step()
    started = time.perf_counter()
    for _ in range(steps):
        batch = loader.next_step()
    seconds = time.perf_counter() - started
    return {
        "blocks": len(data.train),
        "tokens_per_s": steps * batch.numel() / seconds,
        "rss_before_open_kb": before,
        "rss_after_kb": memory_kb(),
    }


def loader_in_fresh_process(overrides: list[str], steps: int, micro_batch: int) -> dict:
    command = [sys.executable, __file__, "--measure-loader", json.dumps(overrides), "--loader-steps", str(steps)]
    command += ["--micro-batch", str(micro_batch)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"loader measurement failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def step_consumption(seq_len: int, repeats: int, model: str) -> dict:
    """Tokens/s of one B'MOJO-130m forward + backward on ``[1, seq_len]`` on this machine (median of repeats)."""
    from bmojo.cli.prepare import compose_run_config
    from bmojo.data import byte_tokenizer
    from bmojo.train.trainer import build_model

    config = compose_run_config([f"model={model}", "model.vocab_size=50304"])
    torch.manual_seed(0)
    network = build_model(config.model, byte_tokenizer()).train()
    ids = torch.randint(0, 50304, (1, seq_len))
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        started = time.perf_counter()
        network(ids, labels=ids).loss.backward()
        times.append(time.perf_counter() - started)
        network.zero_grad(set_to_none=True)
    seconds = float(np.median(times[1:]))
    return {"model": model, "seq_len": seq_len, "fwd_bwd_s": seconds, "tokens_per_s": seq_len / seconds}


def same_bytes(first: Path, second: Path) -> bool:
    names = sorted(p.name for p in first.glob("shard_*"))
    return names == sorted(p.name for p in second.glob("shard_*")) and all(
        (first / name).read_bytes() == (second / name).read_bytes() for name in names
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bmojo_data_bench"))
    parser.add_argument("--sizes-gb", type=float, nargs=2, default=[0.25, 1.0])
    parser.add_argument("--file-mb", type=float, default=125.0)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--bpe-sample-mb", type=float, default=8.0)
    parser.add_argument("--shard-documents", type=int, default=20000, help="small enough to keep 2 workers busy")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--loader-steps", type=int, default=2000)
    parser.add_argument("--step-repeats", type=int, default=2)
    parser.add_argument("--step-model", default="B_130m", help="the model whose step the loader must outpace")
    parser.add_argument("--keep", action="store_true", help="keep the corpus and folders in --workdir")
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--measure-loader", help=argparse.SUPPRESS)  # internal: one loader measurement
    args = parser.parse_args(argv)
    if args.measure_loader:
        print(json.dumps(measure_loader(json.loads(args.measure_loader), args.loader_steps, args.micro_batch)))
        return
    torch.set_num_threads(os.cpu_count() or 1)
    work = args.workdir
    small_gb, large_gb = sorted(args.sizes_gb)
    try:
        started = time.perf_counter()
        files = write_corpus(work / "corpus", large_gb * 1000, args.file_mb)
        small_files = files[: max(1, round(len(files) * small_gb / large_gb))]
        corpus_s = time.perf_counter() - started
        tokenizer = train_sample_tokenizer(files, work / "tokenizer", args.vocab_size, args.bpe_sample_mb)
        cache = work / "hf_cache"

        def overrides(chosen: list[Path], name: str) -> list[str]:
            return data_overrides(chosen, tokenizer, cache, work / name, args.seq_len)

        from bmojo.cli.prepare import compose_run_config
        from bmojo.data import load_documents

        started = time.perf_counter()
        load_documents(compose_run_config(overrides(files, "unused")).data, seed=1234)  # fills the datasets cache
        first_read_s = time.perf_counter() - started
        prepare = {}
        for workers in (1, 2):
            seconds = run_prepare(overrides(files, f"large_w{workers}"), workers, args.shard_documents)
            manifest = json.loads((work / f"large_w{workers}" / "manifest.json").read_text())
            prepare[workers] = {
                "seconds": seconds,
                "tokens": manifest["tokens"],
                "tokens_per_s": manifest["tokens"] / seconds,
                "tokens_per_s_per_worker": manifest["tokens"] / seconds / workers,
            }
        identical = same_bytes(work / "large_w1", work / "large_w2")
        run_prepare(overrides(small_files, "small"), 2, args.shard_documents)
        sizes = {
            "small": sum(p.stat().st_size for p in small_files),
            "large": sum(p.stat().st_size for p in files),
        }
        loader = {
            name: loader_in_fresh_process(overrides(chosen, folder), args.loader_steps, args.micro_batch)
            for name, chosen, folder in (("small", small_files, "small"), ("large", files, "large_w1"))
        }
        step = step_consumption(args.seq_len, args.step_repeats, args.step_model)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report = {
        "bench": "data",
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__},
        "tokenizer": f"byte-level BPE, {args.vocab_size} entries, trained on the first {args.bpe_sample_mb} MB",
        "corpus_bytes": sizes,
        "corpus_write_s": corpus_s,
        "first_read_s": first_read_s,
        "prepare": prepare,
        "identical_with_1_and_2_workers": identical,
        "loader": {name: {**result, "corpus_bytes": sizes[name]} for name, result in loader.items()},
        "step": step,
        "loader_over_step": loader["large"]["tokens_per_s"] / step["tokens_per_s"],
        "settings": {k: str(v) for k, v in vars(args).items() if k != "measure_loader"},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)


def print_table(report: dict) -> None:
    print(f"\n{'prepare':<28}{'tokens':>14}{'seconds':>10}{'tokens/s':>14}{'per worker':>14}")
    for workers, row in report["prepare"].items():
        print(
            f"{f'{workers} worker(s)':<28}{row['tokens']:>14,}{row['seconds']:>10.1f}{row['tokens_per_s']:>14,.0f}"
            f"{row['tokens_per_s_per_worker']:>14,.0f}"
        )
    print(f"same shards with 1 and 2 workers: {report['identical_with_1_and_2_workers']}")
    print(f"\n{'loader':<28}{'corpus MB':>14}{'tokens/s':>14}{'VmRSS MB':>12}{'RssAnon MB':>12}")
    for name, row in report["loader"].items():
        after = row["rss_after_kb"]
        print(
            f"{name:<28}{row['corpus_bytes'] / 1e6:>14,.0f}{row['tokens_per_s']:>14,.0f}"
            f"{after['VmRSS'] / 1024:>12,.0f}{after['RssAnon'] / 1024:>12,.0f}"
        )
    step = report["step"]
    print(
        f"\n{step['model']} forward+backward on [1, {step['seq_len']}]: {step['fwd_bwd_s']:.2f} s, "
        f"{step['tokens_per_s']:,.0f} tokens/s; loader / step = {report['loader_over_step']:,.0f}x"
    )


if __name__ == "__main__":
    main()
