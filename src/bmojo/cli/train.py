"""``bmojo-train``: train from a Hydra recipe (``recipes/``); overrides and ``-m`` sweeps work as usual."""

from __future__ import annotations

import os

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bmojo.cli.common import user_errors
from bmojo.train import recipes_dir, register_configs, train

register_configs()


@hydra.main(version_base="1.3", config_path=str(recipes_dir()), config_name="config")
def main(config: DictConfig) -> float:
    """Train; returns the final validation loss (what a sweeper optimises)."""
    with user_errors("bmojo-train"):
        run_dir = config.run_dir or HydraConfig.get().runtime.output_dir
        summary = train(config, run_dir)
    if os.environ.get("RANK", "0") != "0":
        return summary.final_val_loss  # under torchrun, process 0 reports for all
    before = f"{summary.initial_val_loss:.4f} -> " if summary.initial_val_loss is not None else ""
    minutes, seconds = divmod(int(summary.timings.get("train_s", 0.0)), 60)
    print(f"\nrun folder:      {summary.run_dir}")
    trained = f"step {summary.step}, training {minutes}m{seconds:02d}s"
    print(f"validation loss: {before}{summary.final_val_loss:.4f}  ({trained})")
    if summary.skipped_steps:
        print(f"skipped steps:   {summary.skipped_steps} (non-finite loss or gradient)")
    print(f"checkpoint:      {summary.checkpoint}")
    if summary.export_dir is not None:
        print(f"exported model:  {summary.export_dir}")
    if summary.sample is not None:
        print(f"sample:\n{summary.sample}\n")
    return summary.final_val_loss


if __name__ == "__main__":
    main()
