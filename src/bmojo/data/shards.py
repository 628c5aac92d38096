"""Writing prepared folders: documents -> tokenizer -> token shards -> manifest, over worker processes.

Shard ``k`` holds documents ``[k * shard_documents, (k + 1) * shard_documents)`` of the recipe's (shuffled,
capped) document order, so the shards are the same whatever the number of workers. Each shard is written under
a temporary name and renamed, then its record (``shard_XXXXX.json``) is written; an interrupted prepare redoes
only the shards without a whole record. The manifest is written last. Nothing is written before the folder's
recipe has been checked against the run's.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from bmojo.data.config import DataConfig, DataSource
from bmojo.data.corpus import DataError, load_documents, resolve_files
from bmojo.data.packing import DOCS_PER_PACK, check_packing, tokenize_texts
from bmojo.data.prepared import (
    FORMAT_VERSION,
    HELD_OUT_RULE,
    MANIFEST,
    PLAN,
    TOKENIZER,
    inspect_shard,
    read_json,
    recipe_fields,
    refuse_differences,
    shard_stem,
    token_dtype,
    tokenizer_hash,
    write_json_atomically,
)
from bmojo.data.tokenizer import build_tokenizer, load_pretrained_tokenizer

logger = logging.getLogger(__name__)

DEFAULT_SHARD_DOCUMENTS = 100_000  # ~50-200 MB of tokens a shard for web-like documents
_JOB: SimpleNamespace | None = None  # what a worker process needs, inherited when it is forked
_LEFT_ALONE = "nothing was changed: prepare into a new folder, or rerun with the overrides it was prepared from"


@dataclass
class PrepareResult:
    folder: Path
    documents: int
    tokens: int
    shards: int
    shards_written: int  # by this call; the others were there already
    seconds: float
    manifest_written: bool = True  # False when the folder was finished already (nothing written)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def source_files(config: DataConfig) -> list[dict]:
    """What the documents were read from: each file with its size, or the hub dataset / embedded corpus."""
    if config.source == DataSource.files:
        return [{"path": str(path.resolve()), "bytes": path.stat().st_size} for path in resolve_files(config.paths)]
    if config.source == DataSource.hub:
        return [{"hub": config.hub_name, "config": config.hub_config, "split": config.hub_split}]
    return [{"stdlib": sys.version.split()[0]}]


def tokenizer_for_documents(documents: datasets.Dataset, config: DataConfig) -> PreTrainedTokenizerBase:
    """The tokenizer ``data.tokenizer`` names; a BPE (``data.tokenizer=bpe``) is trained on ``documents``' texts."""
    texts = (text for batch in documents.iter(batch_size=256) for text in batch["text"])
    return build_tokenizer(config.tokenizer, texts, config.bpe_vocab_size)


def _check_folder(folder: Path) -> dict | None:
    """The manifest or plan already in ``folder`` (None for a new or empty folder); refuses any other folder."""
    found = read_json(folder / MANIFEST) or read_json(folder / PLAN)
    # Hidden files are this module's temporary ones, left by a prepare stopped before its plan was written.
    visible = folder.is_dir() and any(not path.name.startswith(".") for path in folder.iterdir())
    if found is None and folder.exists() and (not folder.is_dir() or visible):
        raise DataError(f"{folder} exists and is not a prepared folder; pick a new or empty folder for data.prepared")
    return found


def _shard_done(folder: Path, index: int, dtype: np.dtype, manifest: dict | None) -> dict | None:
    """The shard's record (from the manifest, else its own) when the shard is whole on disk; None when it has
    to be (re)written."""
    if manifest is not None:
        record = manifest["shards"][index]
    else:
        record = read_json(folder / f"{shard_stem(index)}.json")
    return record if record is not None and inspect_shard(folder, record, dtype.itemsize)[0] is None else None


def _write_shard(index: int, report: Callable[[int, int], None] | None = None) -> dict:
    """Tokenize shard ``index`` of the job into its files; ``report(documents, tokens)`` after each group."""
    job = _JOB
    report = report or (lambda documents, tokens: job.queue.put((documents, tokens)))
    first = index * job.shard_documents
    documents = job.documents.select(range(first, min(first + job.shard_documents, len(job.documents))))
    stem = job.folder / shard_stem(index)
    partial = stem.with_name(f".{stem.name}.tokens.tmp")
    lengths = []
    with open(partial, "wb") as handle:
        for batch in documents.iter(batch_size=DOCS_PER_PACK):
            ids = tokenize_texts(job.tokenizer, batch["text"])
            lengths.extend(len(doc) for doc in ids)
            np.fromiter((t for doc in ids for t in doc), dtype=job.dtype, count=sum(map(len, ids))).tofile(handle)
            report(len(ids), sum(map(len, ids)))
    os.replace(partial, stem.with_suffix(".tokens"))
    partial_docs = stem.with_name(f".{stem.name}.docs.tmp.npy")
    np.save(partial_docs, np.asarray(lengths, dtype=np.uint32))
    os.replace(partial_docs, stem.with_suffix(".docs.npy"))
    record = {"name": stem.name, "tokens": int(sum(lengths)), "documents": len(lengths)}
    write_json_atomically(stem.with_suffix(".json"), record)
    return record


def _write_shard_in_worker(index: int) -> dict:
    """:func:`_write_shard` in a pool worker, its reports queued; a None follows them (one process's puts arrive
    in order), so the parent knows when the shard's reports are all in."""
    record = _write_shard(index)
    _JOB.queue.put(None)
    return record


def _save_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    partial = folder / f".{TOKENIZER}.tmp"
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer.save_pretrained(str(partial))
    os.replace(partial, folder / TOKENIZER)


def _run_shards(todo: list[int], workers: int, bar: tqdm) -> dict[int, dict]:
    """Write the shards ``todo``; returns their records by index."""
    started, tokens = time.perf_counter(), 0

    def report(documents: int, new_tokens: int) -> None:
        nonlocal tokens
        tokens += new_tokens
        bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - started, 1e-9):,.0f}", refresh=False)
        bar.update(documents)

    if workers == 1 or len(todo) == 1:
        return {index: _write_shard(index, report) for index in todo}
    # Forked workers inherit the documents (memory-mapped Arrow) and the tokenizer instead of pickling them.
    context = multiprocessing.get_context("fork")
    _JOB.queue = context.Queue()
    with context.Pool(min(workers, len(todo))) as pool:
        pending = pool.map_async(_write_shard_in_worker, todo, chunksize=1)
        finished = 0
        while finished < len(todo):  # every shard's last report has arrived when its None has
            try:
                update = _JOB.queue.get(timeout=0.2)
            except queue.Empty:
                if pending.ready() and not pending.successful():
                    break  # a worker failed: its shard sends no None
                continue
            if update is None:
                finished += 1
            else:
                report(*update)
        return dict(zip(todo, pending.get(), strict=True))  # get() re-raises a worker's error


def prepare_folder(
    config: DataConfig,
    seed: int,
    folder: str | Path,
    workers: int = 1,
    shard_documents: int = DEFAULT_SHARD_DOCUMENTS,
    tokenizer: PreTrainedTokenizerBase | None = None,
    progress: bool = True,
) -> PrepareResult:
    """Tokenize the recipe's documents into ``folder`` (see :mod:`bmojo.data.prepared`); resumes a folder that
    an interrupted call left, returns at once for a finished one, refuses one prepared from another recipe."""
    global _JOB
    folder = Path(folder)
    started = time.perf_counter()
    check_packing(config.seq_len, config.val_fraction)
    if config.source == DataSource.mqar or config.streaming:
        raise DataError("bmojo-prepare tokenizes text corpora: data.source=mqar and data.streaming=true have none")
    if workers < 1 or shard_documents < 1 or shard_documents % DOCS_PER_PACK:
        raise DataError(
            f"--workers={workers} must be at least 1 and --shard-documents={shard_documents} a positive multiple "
            f"of {DOCS_PER_PACK} (so that no packing group straddles two shards)"
        )
    found = _check_folder(folder)
    plan = {
        "format": FORMAT_VERSION,
        "recipe": recipe_fields(config, seed),
        "shard_documents": shard_documents,
        "sources": source_files(config),
    }
    if found is not None:
        refuse_differences(folder, found, plan, _LEFT_ALONE)
        manifest = read_json(folder / MANIFEST)
        shards = range(len(manifest["shards"])) if manifest else ()
        if manifest and all(_shard_done(folder, i, np.dtype(manifest["dtype"]), manifest) for i in shards):
            return PrepareResult(folder, manifest["documents"], manifest["tokens"], len(shards), 0, 0.0, False)
    documents, report = load_documents(config, seed)
    logger.info("corpus: %s", report.summary())
    plan["documents"] = len(documents)
    if found is not None and tokenizer is None and (folder / TOKENIZER).is_dir():
        tokenizer = load_pretrained_tokenizer(str(folder / TOKENIZER))  # as the interrupted prepare trained it
    elif tokenizer is None:
        tokenizer = tokenizer_for_documents(documents, config)
    dtype = token_dtype(tokenizer)
    plan |= {"tokenizer": config.tokenizer, "tokenizer_hash": tokenizer_hash(tokenizer), "dtype": dtype.name}
    if found is not None:
        refuse_differences(folder, found, plan, _LEFT_ALONE)  # other documents, or another tokenizer than the folder's
    folder.mkdir(parents=True, exist_ok=True)
    if found is None:
        write_json_atomically(folder / PLAN, plan)
    if not (folder / TOKENIZER).is_dir():
        _save_tokenizer(tokenizer, folder)
    shards = -(-len(documents) // shard_documents)
    manifest = read_json(folder / MANIFEST)  # a finished folder: only missing or damaged shards are redone
    done = {index: _shard_done(folder, index, dtype, manifest) for index in range(shards)}
    todo = [index for index, record in done.items() if record is None]
    skipped = sum(done[index]["documents"] for index in done if index not in todo)
    _JOB = SimpleNamespace(
        documents=documents, tokenizer=tokenizer, folder=folder, dtype=dtype, shard_documents=shard_documents
    )
    bar = tqdm(total=len(documents), initial=skipped, unit="doc", desc="prepare", disable=not progress, mininterval=1.0)
    try:
        written = _run_shards(todo, workers, bar)
    finally:
        bar.close()
        _JOB = None
    records = [done[index] or written[index] for index in range(shards)]
    tokens = sum(record["tokens"] for record in records)
    finished = plan | {
        "tokens": tokens,
        "shards": records,
        "held_out": {"val_fraction": config.val_fraction, "rule": HELD_OUT_RULE},
    }
    write_json_atomically(folder / MANIFEST, finished)
    for record_file in [folder / PLAN, *(folder / f"{shard_stem(index)}.json" for index in range(shards))]:
        record_file.unlink(missing_ok=True)  # the manifest holds every record now
    return PrepareResult(folder, len(documents), tokens, shards, len(todo), time.perf_counter() - started)
