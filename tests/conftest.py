"""Shared fixtures: a small generated text corpus and recipe composition with tiny, fast settings."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from bmojo.train import recipes_dir, register_configs

WORDS = "the a cat dog bird fish sees eats likes finds red big small old tree house river stone".split()


def sentences(count: int, seed: int) -> list[str]:
    """Short documents of simple sentences: learnable structure, enough to see a loss fall in a few steps."""
    rng = random.Random(seed)
    return [
        " ".join(f"{rng.choice(WORDS)} {rng.choice(WORDS)} {rng.choice(WORDS)}." for _ in range(8))
        for _ in range(count)
    ]


@pytest.fixture
def jsonl_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in sentences(120, seed=0)))
    return path


def tiny_overrides(corpus: Path, run_dir: Path) -> list[str]:
    """A B'MOJO-tiny run on ``corpus`` with the byte tokenizer: a few seconds for a handful of steps."""
    return [
        "model=B_tiny",
        "data=files",
        f"data.paths=[{corpus}]",
        "data.tokenizer=bytes",
        "data.seq_len=64",
        "data.val_fraction=0.1",
        f"run_dir={run_dir}",
        "optim.warmup_steps=2",
        "trainer.max_steps=6",
        "trainer.micro_batch_size=4",
        "trainer.eval_every=1000",
        "trainer.eval_batches=2",
        "trainer.checkpoint_every=1000",
        "trainer.log_every=1",
        "trainer.progress_bar=false",
        "trainer.tensorboard=false",
        "trainer.export_at_end=false",
        "trainer.sample_tokens=0",
    ]


@pytest.fixture
def tiny_run_overrides() -> Callable[[Path, Path], list[str]]:
    return tiny_overrides


@pytest.fixture
def compose_recipe() -> Callable[[list[str]], DictConfig]:
    """Compose ``recipes/config.yaml`` with command-line style overrides."""
    register_configs()

    def _compose(overrides: list[str]) -> DictConfig:
        with initialize_config_dir(str(recipes_dir()), version_base="1.3"):
            return compose("config", overrides=overrides)

    return _compose


@pytest.fixture
def tiny_config(compose_recipe, jsonl_corpus: Path, tmp_path: Path) -> Callable[..., DictConfig]:
    """``tiny_config(*extra_overrides, run="name")``: the tiny run recipe in ``tmp_path/<run>``."""

    def _config(*extra: str, run: str = "run") -> DictConfig:
        return compose_recipe(tiny_overrides(jsonl_corpus, tmp_path / run) + list(extra))

    return _config
