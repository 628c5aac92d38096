"""Training: structured configs, the trainer, checkpoints, export."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bmojo.train.checkpoint import CheckpointError, load_model_and_tokenizer
from bmojo.train.config import RunConfig, compose_recipe, recipes_dir, register_configs
from bmojo.train.device import DeviceError
from bmojo.train.distributed import select_trainer
from bmojo.train.export import export_model, generate_sample
from bmojo.train.trainer import NonFiniteLossError, Trainer, TrainSummary, build_model

__all__ = [
    "CheckpointError",
    "DeviceError",
    "NonFiniteLossError",
    "RunConfig",
    "TrainSummary",
    "Trainer",
    "build_model",
    "export_model",
    "generate_sample",
    "load_model_and_tokenizer",
    "compose_recipe",
    "recipes_dir",
    "register_configs",
    "train",
]


def train(config: DictConfig | RunConfig, run_dir: str | Path | None = None) -> TrainSummary:
    """Run training for a composed recipe; ``run_dir`` defaults to ``config.run_dir``, else ``runs/<name>``."""
    if isinstance(config, DictConfig):
        config_yaml = OmegaConf.to_yaml(config, resolve=True)
        config = OmegaConf.to_object(config)
    else:
        config_yaml = OmegaConf.to_yaml(OmegaConf.structured(config))
    run_dir = Path(run_dir or config.run_dir or Path("runs") / config.name)
    return select_trainer(config)(config, run_dir, config_yaml).fit()
