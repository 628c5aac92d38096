"""Structured configs behind the Hydra recipes in ``recipes/``.

The dataclasses below are the schema of every recipe: Hydra merges the YAML files of ``recipes/`` into
them, so a misspelt key or a value of the wrong type fails at start-up with Hydra's own message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from bmojo.data.config import DataConfig, DataSource

ROOT_CONFIG_NAME = "config"
__all__ = ["DataConfig", "DataSource", "RunConfig", "recipes_dir", "register_configs"]


class Schedule(Enum):
    cosine = "cosine"
    wsd = "wsd"  # warmup, stable, decay
    constant = "constant"


class Precision(Enum):
    fp32 = "fp32"
    bf16 = "bf16"  # bf16 autocast around forward and loss; weights and optimizer state stay fp32


class Resume(Enum):
    auto = "auto"  # resume from the run folder's latest checkpoint when there is one
    never = "never"  # refuse to start in a run folder that already holds checkpoints
    must = "must"  # fail unless there is a checkpoint to resume from


class Device(Enum):
    auto = "auto"  # cuda when available, else cpu
    cpu = "cpu"
    cuda = "cuda"
    xla = "xla"  # Trainium through torch-xla (the trn1 lane)


class KernelBackend(Enum):
    auto = "auto"
    torch = "torch"
    naive = "naive"
    nki = "nki"


@dataclass
class ModelConfig:
    """Fields of :class:`bmojo.BmojoConfig`; ``vocab_size: null`` takes the tokenizer's size."""

    layer_pattern: str = "B"
    vocab_size: int | None = None
    pad_vocab_multiple: int = 64  # a tokenizer-derived vocabulary is rounded up to this multiple
    hidden_size: int = 64
    intermediate_size: int = 128  # 0: blocks without an MLP (the published Mamba-2)
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int = 16
    qk_norm: bool = False
    window_size: int = 32
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    ssm_state_size: int = 16
    ssm_head_dim: int = 16
    ssm_num_groups: int = 1
    ssm_expand: int = 2
    ssm_conv_kernel: int = 4
    ssm_chunk_size: int = 32
    memory_size: int = 16
    memory_topk: int = 2
    memory_block: int | None = None  # None: the window size
    memory_threshold: float = 0.5
    innovation_rank: int | None = None  # None: a full-rank predictor
    aux_loss_weight: float = 0.1
    tie_fading_proj: bool = True  # false: fading keys get their own query, key, value projections and QK-norms
    memory_rope: bool = True  # false: eidetic-memory keys without positional encoding
    store_topk: int = 0  # entries each query of a B layer retrieves from the in-storage memory; 0 = none
    store_rule: str = "all"  # which past tokens the store keeps: all | innovative
    store_index: str = "dense"  # decoding: dense | flat | hnsw (faiss, from store_index_from entries on)
    store_index_from: int = 65536
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    schedule: Schedule = Schedule.cosine
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: share of the steps spent decaying


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    steps_this_run: int | None = None  # stop cleanly (with a checkpoint) after this many steps, e.g. a job's time slot
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0
    precision: Precision = Precision.fp32
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 16  # validation micro-batches per evaluation; the held-out split is capped to it
    checkpoint_every: int = 500
    keep_last: int = 3
    resume: Resume = Resume.auto
    init_from: str | None = None  # a checkpoint folder, a run folder or an exported Hugging Face folder
    max_nonfinite_in_a_row: int = 20
    # Train even where data.seq_len leaves a windowed model's fading or eidetic memory unreachable (no gradient).
    allow_unreachable_memory: bool = False
    export_at_end: bool = True
    sample_prompt: str = "def "
    sample_tokens: int = 64
    progress_bar: bool = True
    tensorboard: bool = True
    compile_blocks: bool = False  # torch.compile every block in place (one process, CPU or CUDA)


@dataclass
class ParallelConfig:
    """How the processes of a run share the work (docs/parallel.md); the engine comes from ``backend.engine``.

    ``bmojo.parallel.setup.layout_from_config`` turns it into a layout, with the trainer's
    ``grad_accum_steps`` as the micro-batches of a step.
    """

    data_parallel_size: int | None = None  # null: every process not taken by tensor/pipeline parallelism
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    sequence_parallel: bool = False  # split norms and the residual stream along the sequence over TP ranks
    schedule: str = "1f1b"  # pipeline schedule: 1f1b or gpipe (torch engine only)
    zero1: bool = False  # shard optimizer states over data-parallel ranks, keep whole parameters
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass


class Engine(Enum):
    """What runs a layout of several processes (``bmojo.parallel.setup.build_engine``)."""

    torch = "torch"  # torch.distributed: gloo on CPU, nccl on CUDA
    nxd = "nxd"  # neuronx-distributed on trn1


@dataclass
class BackendConfig:
    device: Device = Device.auto
    engine: Engine = Engine.torch
    kernels: KernelBackend = KernelBackend.auto
    num_threads: int | None = None  # torch intra-op threads; None: torch's default
    keep_host_memory: bool = True  # CPU: glibc keeps freed memory for reuse (bmojo.train.host_memory)


@dataclass
class RunConfig:
    """The root of every recipe."""

    name: str = "bmojo"
    seed: int = 1234
    run_dir: str | None = None  # None: Hydra's output folder (or ``runs/<name>`` outside Hydra)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)


class MissingSettingError(ValueError):
    """A recipe left a value for the user to give on the command line."""


def _required(key: str, hint: str) -> None:
    raise MissingSettingError(f"this recipe needs {key}=... on the command line: {hint}")


def register_configs() -> None:
    """Register the schema as ``base_config`` and the ``${required:key,hint}`` resolver recipes use.

    A recipe writes ``${required:...}`` (not ``???``, which a merge onto a schema default ignores) for a
    value only the user can give; reading it unset fails with the hint.
    """
    ConfigStore.instance().store(name="base_config", node=RunConfig)
    OmegaConf.register_new_resolver("required", _required, replace=True)


def recipes_dir() -> Path:
    """The recipe tree: ``$BMOJO_RECIPES`` when set, else ``recipes/`` of this source checkout."""
    override = os.environ.get("BMOJO_RECIPES")
    candidate = Path(override) if override else Path(__file__).resolve().parents[3] / "recipes"
    if not (candidate / f"{ROOT_CONFIG_NAME}.yaml").is_file():
        raise FileNotFoundError(
            f"no Hydra recipes found at {candidate}; install bmojo from a source checkout "
            "(pip install -e .) or point BMOJO_RECIPES at a folder holding config.yaml"
        )
    return candidate


def compose_recipe(overrides: list[str]):
    """The recipe tree composed with ``overrides``, as ``bmojo-train`` composes it (a DictConfig; the schema
    must be registered: :func:`register_configs`)."""
    from hydra import compose, initialize_config_dir  # Hydra's compose API is needed only here

    with initialize_config_dir(str(recipes_dir()), version_base="1.3"):
        return compose(ROOT_CONFIG_NAME, overrides=overrides)
