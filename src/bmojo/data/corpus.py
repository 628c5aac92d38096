"""Document sources: the embedded standard-library corpus, local files and hub datasets.

Every source yields a ``datasets.Dataset`` with one column, ``text``, one document a row. Problems with the
input surface here, before any worker touches it, as :class:`DataError` naming the file and the fix.
"""

from __future__ import annotations

import codecs
import glob
import logging
import os
import sysconfig
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from bmojo.data.config import DataConfig, DataSource

logger = logging.getLogger(__name__)

SUFFIX_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".py": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}
_UTF8_CHUNK = 1 << 20


class DataError(ValueError):
    """The training data cannot be used as configured; the message says what to change."""


@dataclass
class CorpusReport:
    """What was read and what was skipped, and why."""

    documents: int = 0
    characters: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count

    def summary(self) -> str:
        skipped = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
        return f"{self.documents} documents, {self.characters:,} characters" + (
            f" (skipped: {skipped})" if skipped else ""
        )


def stdlib_documents() -> list[str]:
    """The standard library's ``.py`` sources (sorted by path) and ``pydoc_data`` documentation topics."""
    import pydoc_data.topics

    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(
        path
        for path in root.rglob("*.py")
        if not {"site-packages", "dist-packages"} & set(path.relative_to(root).parts)
    )
    documents = []
    for path in paths:
        try:
            documents.append(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue  # a handful of deliberately non-UTF-8 test fixtures; the corpus does not need them
    documents.extend(topic for _, topic in sorted(pydoc_data.topics.topics.items()))
    return documents


def resolve_files(patterns: list[str]) -> list[Path]:
    """Expand files, folders (recursively) and glob patterns; every entry must match something."""
    if not patterns:
        raise DataError("data.source=files needs data.paths, e.g. 'data.paths=[corpus/*.jsonl]'")
    files: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if os.path.isdir(expanded):
            matches = sorted(p for p in Path(expanded).rglob("*") if p.suffix in SUFFIX_FORMATS)
        else:
            matches = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        if not matches:
            raise DataError(
                f"data file not found: {pattern!r} matches no file (cwd {os.getcwd()}); "
                "fix data.paths (relative paths are taken from where you launch)"
            )
        files.extend(matches)
    return sorted(set(files))


def file_format(path: Path, configured: str | None) -> str:
    if configured:
        if configured not in ("text", "json", "parquet"):
            raise DataError(f"data.format={configured!r} is not one of text, json, parquet")
        return configured
    try:
        return SUFFIX_FORMATS[path.suffix.lower()]
    except KeyError:
        raise DataError(
            f"cannot tell the format of {path} from its suffix; set data.format to text, json or parquet"
        ) from None


def file_problem(path: Path, fmt: str) -> str | None:
    """Why ``path`` cannot be read as ``fmt`` (None when it can); empty files are ``"empty"``."""
    try:
        if path.stat().st_size == 0:
            return "empty"
        if fmt == "parquet":
            import pyarrow.parquet

            pyarrow.parquet.ParquetFile(path)
            return None
        decoder_offset = 0
        with open(path, "rb") as handle:
            decoder = codecs.getincrementaldecoder("utf-8")()
            while chunk := handle.read(_UTF8_CHUNK):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as error:
                    return f"not UTF-8 (bad byte at offset {decoder_offset + error.start})"
                decoder_offset += len(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return "not UTF-8 (truncated character at the end)"
    except OSError as error:
        return f"unreadable ({error.strerror or error})"
    except Exception as error:  # pyarrow raises its own types for a corrupt file
        return f"unreadable as {fmt} ({error})"
    return None


def _load_files(config: DataConfig, report: CorpusReport) -> datasets.Dataset:
    by_format: dict[str, list[str]] = {}
    for path in resolve_files(list(config.paths)):
        fmt = file_format(path, config.format)
        problem = file_problem(path, fmt)
        if problem == "empty":
            report.skipped["empty files"] += 1
            logger.warning("skipping empty file %s", path)
            continue
        if problem is not None:
            if not config.skip_bad_files:
                raise DataError(
                    f"{path}: {problem}; fix or remove the file, or set data.skip_bad_files=true to skip it"
                    + (" (convert with: iconv -f latin1 -t utf-8)" if "UTF-8" in problem else "")
                )
            report.skipped["unreadable or non-UTF-8 files"] += 1
            logger.warning("skipping %s: %s", path, problem)
            continue
        by_format.setdefault(fmt, []).append(str(path))
    if not by_format:
        raise DataError(f"empty corpus: no usable file among data.paths={list(config.paths)} ({report.summary()})")
    parts = []
    for fmt, files in sorted(by_format.items()):
        kwargs = {"sample_by": "document"} if fmt == "text" else {}
        try:
            part = datasets.load_dataset(fmt, data_files=files, split="train", cache_dir=config.cache_dir, **kwargs)
        except Exception as error:
            raise DataError(f"could not read {fmt} files {files}: {error}") from error
        parts.append(_text_column(part, config.text_field, f"{fmt} files {files}"))
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def _text_column(dataset: datasets.Dataset, text_field: str, where: str) -> datasets.Dataset:
    if text_field not in dataset.column_names:
        raise DataError(f"{where} have no column {text_field!r}; columns: {dataset.column_names}; set data.text_field")
    dataset = dataset.select_columns([text_field])
    return dataset.rename_column(text_field, "text") if text_field != "text" else dataset


def _load_hub(config: DataConfig) -> datasets.Dataset:
    if not config.hub_name:
        raise DataError("data.source=hub needs data.hub_name")
    try:
        dataset = datasets.load_dataset(
            config.hub_name, config.hub_config, split=config.hub_split, cache_dir=config.cache_dir
        )
    except Exception as error:
        raise DataError(
            f"could not load hub dataset {config.hub_name!r} (split {config.hub_split!r}): {error}; "
            "without network, download it elsewhere and use data=files"
        ) from error
    return _text_column(dataset, config.text_field, f"hub dataset {config.hub_name}")


def load_documents(config: DataConfig, seed: int) -> tuple[datasets.Dataset, CorpusReport]:
    """The configured documents as a ``text`` column, empty ones dropped, sampled to the configured caps."""
    report = CorpusReport()
    if config.source == DataSource.stdlib:
        documents = datasets.Dataset.from_dict({"text": stdlib_documents()})
    elif config.source == DataSource.files:
        documents = _load_files(config, report)
    else:
        documents = _load_hub(config)
    total = len(documents)
    documents = documents.filter(lambda row: bool(row["text"] and row["text"].strip()), desc="drop empty")
    if len(documents) < total:
        report.skipped["empty documents"] += total - len(documents)
    if config.shuffle:
        documents = documents.shuffle(seed=seed)
    documents = _cap(documents, config.max_documents, config.max_chars)
    report.documents = len(documents)
    if config.source != DataSource.hub:  # a hub corpus can be far larger than memory
        report.characters = sum(len(text) for batch in documents.iter(batch_size=1024) for text in batch["text"])
    if report.documents == 0:
        raise DataError(f"empty corpus: no document has any text ({report.summary()})")
    return documents, report


def _cap(documents: datasets.Dataset, max_documents: int | None, max_chars: int | None) -> datasets.Dataset:
    count = len(documents) if max_documents is None else min(max_documents, len(documents))
    if max_chars is not None:
        characters, index = 0, 0
        for batch in documents.select(range(count)).iter(batch_size=256):
            for text in batch["text"]:
                characters += len(text)
                index += 1
                if characters >= max_chars:
                    return documents.select(range(index))
    return documents.select(range(count)) if count < len(documents) else documents
