"""Checkpoints (DESIGN §7): atomic folders, a ``latest`` pointer written last, keep-last-N.

Layout of ``<run_dir>/checkpoints/``::

    step_00000100/  model.safetensors  model_config.json  optimizer.pt  trainer_state.pt  config.yaml  tokenizer/
    latest          the name of the newest complete checkpoint

A run of several processes writes, instead of ``model.safetensors`` and ``optimizer.pt``, the shards of its
parallel engine (``layout.json``, ``tp_rank_XX_pp_rank_XX.pt``; see ``bmojo.parallel.checkpoint``); its weights
load whole from there too.

A checkpoint is written into a hidden temporary folder and renamed into place, and only then does
``latest`` move, so a run killed at any moment leaves the previous checkpoint intact and pointed to.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from bmojo import BmojoConfig, BmojoForCausalLM
from bmojo.parallel.checkpoint import LAYOUT_FILE
from bmojo.parallel.convert import full_model_state

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint or model folder cannot be used; the message says what was expected."""


@dataclass
class TrainingState:
    """What a checkpoint restores besides the weights."""

    optimizer: dict
    scheduler: dict
    trainer: dict  # step, token counter, data cursors, RNG states, skipped-step counters


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_text_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_dir(path.parent)


def step_folders(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    state: TrainingState,
    config_yaml: str,
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically, point ``latest`` at it, prune to ``keep_last``."""
    root.mkdir(parents=True, exist_ok=True)
    final, temporary = checkpoint_paths(root, step)
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    _write_files(temporary, model, tokenizer, state, config_yaml)
    return publish_checkpoint(temporary, final, keep_last)


def checkpoint_paths(root: Path, step: int) -> tuple[Path, Path]:
    """The folder of checkpoint ``step`` under ``root``, and the hidden temporary folder it is written into first."""
    final = root / f"{_PREFIX}{step:08d}"
    return final, root / f".{final.name}.tmp"


def publish_checkpoint(temporary: Path, final: Path, keep_last: int) -> Path:
    """Turn the fully written ``temporary`` folder into checkpoint ``final``: flush, rename, move ``latest``, prune."""
    root = final.parent
    for path in temporary.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    if final.exists():  # the same step saved again (e.g. at the end of a run that resumed on it)
        shutil.rmtree(final)
    os.replace(temporary, final)
    _fsync_dir(root)
    _write_text_atomically(root / LATEST, final.name + "\n")
    for old in step_folders(root)[: -max(1, keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_files(
    folder: Path, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, state: TrainingState, config_yaml: str
) -> None:
    save_model(model, str(folder / "model.safetensors"))
    model.config.to_json_file(str(folder / "model_config.json"))
    torch.save(state.optimizer, folder / "optimizer.pt")
    torch.save({"scheduler": state.scheduler, **state.trainer}, folder / "trainer_state.pt")
    (folder / "config.yaml").write_text(config_yaml)
    tokenizer.save_pretrained(str(folder / "tokenizer"))


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``latest`` names; the newest complete folder if the pointer is missing or stale."""
    for stale in root.glob(f".{_PREFIX}*.tmp") if root.is_dir() else []:
        logger.warning("removing %s, left by a run stopped while writing a checkpoint", stale)
        shutil.rmtree(stale, ignore_errors=True)
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if (target / "trainer_state.pt").is_file():
            return target
        logger.warning("%s names a missing checkpoint %s; using the newest complete one", pointer, target.name)
    folders = step_folders(root)
    return folders[-1] if folders else None


def load_training_state(folder: Path, model: torch.nn.Module) -> TrainingState:
    """Load the weights into ``model`` (in place) and return the optimizer, scheduler and trainer state."""
    if is_sharded_checkpoint(folder):
        raise CheckpointError(
            f"{folder} was written by a run of several processes (sharded, {LAYOUT_FILE}): resume it with "
            "torchrun and the same parallel recipe, or start a new run from its weights with "
            f"trainer.init_from={folder}"
        )
    load_model(model, str(folder / "model.safetensors"))
    trainer = torch.load(folder / "trainer_state.pt", weights_only=True)
    scheduler = trainer.pop("scheduler")
    optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
    return TrainingState(optimizer=optimizer, scheduler=scheduler, trainer=trainer)


def is_sharded_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds the per-rank shards of a parallel run rather than one ``model.safetensors``."""
    return (Path(folder) / LAYOUT_FILE).is_file()


def load_weights(model: BmojoForCausalLM, folder: Path) -> None:
    """Checkpoint ``folder``'s weights into ``model``: its ``model.safetensors``, or its shards merged whole."""
    if not is_sharded_checkpoint(folder):
        load_model(model, str(Path(folder) / "model.safetensors"))
        return
    state = full_model_state(folder)
    expected = dict(model.named_parameters())  # each tied weight once, as the shards hold it
    if state.keys() != expected.keys():
        difference = sorted(state.keys() ^ expected.keys())
        raise CheckpointError(f"the shards in {folder} do not hold this model's weights; differing: {difference[:5]}")
    model.load_state_dict(state, strict=False)


def resolve_model_folder(path: str | Path) -> Path:
    """An exported folder or a checkpoint folder, given it or a run folder / ``checkpoints`` folder above it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"model path not found: {path}")
    for candidate in (path, path / CHECKPOINTS):
        if (candidate / "config.json").is_file() or (candidate / "model_config.json").is_file():
            return candidate
        found = latest_checkpoint(candidate) if (candidate / LATEST).exists() or step_folders(candidate) else None
        if found is not None:
            return found
    raise CheckpointError(
        f"{path} is neither an exported model (config.json), a checkpoint (model_config.json), nor a run or "
        "checkpoints folder holding one"
    )


def load_model_and_tokenizer(path: str | Path) -> tuple[BmojoForCausalLM, PreTrainedTokenizerBase]:
    """A model and its tokenizer from an exported folder, a checkpoint, or a run folder's latest checkpoint."""
    folder = resolve_model_folder(path)
    if (folder / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(str(folder))
        tokenizer_folder = folder
    else:
        model = BmojoForCausalLM(BmojoConfig.from_json_file(str(folder / "model_config.json")))
        load_weights(model, folder)
        tokenizer_folder = folder / "tokenizer"
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    except Exception as error:
        raise CheckpointError(f"no usable tokenizer saved with the model in {tokenizer_folder}: {error}") from error
    return model, tokenizer
