"""The parallel layout of a run: how many ranks split the data, the tensors and the pipeline, and how."""

from __future__ import annotations

from dataclasses import asdict, dataclass

SCHEDULES = ("1f1b", "gpipe")


@dataclass(frozen=True)
class Layout:
    """Ranks form a ``[pp, dp, tp]`` grid, tensor parallelism innermost (NxD's order: TP stays inside a node),
    except for NxD's tensor-parallel size 4 on trn1 (:meth:`coordinates`).

    ``microbatches``: micro-batches per optimizer step (the pipeline's, or gradient accumulation without one).
    ``zero1``: shard optimizer states over data-parallel ranks but keep whole parameters between forward and
    backward (NxD ZeRO-1; FSDP2 with ``reshard_after_forward=False`` on the PyTorch engine).
    """

    data_parallel: int = 1
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    sequence_parallel: bool = False
    microbatches: int = 1
    schedule: str = "1f1b"
    zero1: bool = False
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in ("data_parallel", "tensor_parallel", "pipeline_parallel", "microbatches"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"parallel layout: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"parallel layout: schedule={self.schedule!r} is not one of {SCHEDULES}")
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ValueError(
                "parallel layout: sequence_parallel shards over tensor-parallel ranks; set tensor_parallel > 1"
            )
        if self.pipeline_parallel > 1 and self.microbatches < self.pipeline_parallel:
            raise ValueError(
                f"parallel layout: {self.pipeline_parallel} pipeline stages need at least as many microbatches "
                f"to fill the pipeline, got microbatches={self.microbatches}"
            )

    @property
    def world_size(self) -> int:
        return self.data_parallel * self.tensor_parallel * self.pipeline_parallel

    def coordinates(self, rank: int, trn1_node_size: int | None = None) -> tuple[int, int, int]:
        """(pp, dp, tp) coordinates of global ``rank``.

        ``trn1_node_size``: NeuronCores per node when the ranks are NxD's on trn1. There a tensor-parallel size
        of 4 takes locally connected cores ``node_size / 4`` apart (``[0, 8, 16, 24]`` on a 32-core node) and
        data-parallel ranks run across each node's groups (``parallel_state.initialize_model_parallel``).
        """
        pp, rest = divmod(rank, self.data_parallel * self.tensor_parallel)
        if trn1_node_size is not None and self.tensor_parallel == 4:
            groups_per_node = trn1_node_size // self.tensor_parallel
            node, local = divmod(rest, trn1_node_size)
            tp, lane = divmod(local, groups_per_node)
            return pp, node * groups_per_node + lane, tp
        dp, tp = divmod(rest, self.tensor_parallel)
        return pp, dp, tp

    def sharding(self) -> dict[str, int]:
        """What a checkpoint's shards depend on: resuming needs these equal (data parallelism may change)."""
        return {"tensor_parallel": self.tensor_parallel, "pipeline_parallel": self.pipeline_parallel}

    def to_dict(self) -> dict:
        return asdict(self)
