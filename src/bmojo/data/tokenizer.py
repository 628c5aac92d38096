"""Tokenizers: bytes, a byte-level BPE trained on the corpus, or any Hugging Face tokenizer.

All three come back as a ``transformers`` tokenizer with an end-of-text token, so packing, export and
``generate`` treat them alike. The first two need no download and are saved with every run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from bmojo.data.corpus import DataError

logger = logging.getLogger(__name__)

END_OF_TEXT = "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """The printable stand-in of each byte 0..255 used by byte-level BPE (GPT-2's table), in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    codes = {byte: byte for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in codes:
            codes[byte] = 256 + extra
            extra += 1
    return [chr(codes[byte]) for byte in range(256)]


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=END_OF_TEXT, bos_token=END_OF_TEXT, pad_token=END_OF_TEXT
    )
    wrapped.model_max_length = 1 << 30  # documents are packed into blocks, so no per-text limit applies
    return wrapped


def _byte_level(model: models.Model) -> Tokenizer:
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (id = byte value) plus the end-of-text token (id 256)."""
    vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
    tokenizer = _byte_level(models.BPE(vocab=vocab, merges=[]))
    tokenizer.add_special_tokens([END_OF_TEXT])
    return _wrap(tokenizer)


def train_bpe(texts: Iterator[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE with ``vocab_size`` entries (bytes and end-of-text included) trained on ``texts``."""
    if vocab_size < 258:
        raise DataError(f"data.bpe_vocab_size={vocab_size} is below 258 (256 bytes, end of text, one merge)")
    tokenizer = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _wrap(tokenizer)


def load_pretrained_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """A Hugging Face tokenizer by hub name or local folder; it must define an end-of-text token."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as error:
        raise DataError(
            f"could not load tokenizer {name_or_path!r}: {error}; use a local folder, or data.tokenizer=bpe / "
            "bytes, which need no download"
        ) from error
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {name_or_path!r} has no eos_token; packing needs one between documents")
    tokenizer.model_max_length = 1 << 30
    return tokenizer


def build_tokenizer(spec: str, texts: Iterator[str], bpe_vocab_size: int) -> PreTrainedTokenizerBase:
    """The tokenizer ``data.tokenizer`` names; ``texts`` is consumed only to train a BPE."""
    if spec == "bytes":
        return byte_tokenizer()
    if spec == "bpe":
        logger.info("training a byte-level BPE tokenizer (%d entries) on the corpus", bpe_vocab_size)
        return train_bpe(texts, bpe_vocab_size)
    return load_pretrained_tokenizer(spec)
