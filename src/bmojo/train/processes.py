"""How many processes a run was started as, and whether its ``parallel`` recipe agrees.

A run is one process (``parallel=single``, or a data-parallel recipe started alone) or several started by
torchrun, which sets ``WORLD_SIZE``. A recipe and a launch that disagree stop the run before any work, with
the command or setting that fixes it.
"""

from __future__ import annotations

import os

from bmojo.train.config import ParallelConfig

TORCHRUN_HINT = "torchrun --standalone --nproc_per_node {count} -m bmojo.cli.train ..."


def launched_processes() -> int:
    """The processes of this run: torchrun's ``WORLD_SIZE``, 1 when started without it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def processes_needed(parallel: ParallelConfig) -> int:
    """The fewest processes the recipe's layout runs on (a data-parallel size of null counts as 1)."""
    return parallel.tensor_parallel_size * parallel.pipeline_parallel_size * (parallel.data_parallel_size or 1)


def is_one_process_recipe(parallel: ParallelConfig) -> bool:
    """Whether the recipe fixes every size to 1 (``parallel=single``), rather than leaving data parallelism open."""
    return processes_needed(parallel) == 1 and parallel.data_parallel_size == 1


def runs_in_parallel(parallel: ParallelConfig, processes: int) -> bool:
    """Whether ``processes`` processes of this recipe train through a parallel engine; raises if they cannot.

    One process of a recipe that needs several is told to use torchrun; several processes of a one-process
    recipe are refused, since each would train the same model into the same run folder.
    """
    needed = processes_needed(parallel)
    if processes == 1 and needed > 1:
        raise ValueError(
            f"the parallel recipe (tensor_parallel_size={parallel.tensor_parallel_size}, pipeline_parallel_size="
            f"{parallel.pipeline_parallel_size}, data_parallel_size={parallel.data_parallel_size}) needs at least "
            f"{needed} processes but this is one; start it with torchrun, one process per device: "
            f"{TORCHRUN_HINT.format(count=needed)} (docs/parallel.md), or pick parallel=single"
        )
    if processes > 1 and is_one_process_recipe(parallel):
        raise ValueError(
            f"{processes} processes were started (WORLD_SIZE) but parallel=single trains in one: each would train "
            "the same model into the same run folder; start one process, or pick a parallel recipe that spreads "
            "the work over the processes (parallel=dp, tp, sp, pp, zero1)"
        )
    return processes > 1
