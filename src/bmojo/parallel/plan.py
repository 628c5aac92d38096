"""The parallel plan: what each module of a B'MOJO model becomes under tensor, sequence and pipeline parallelism.

A plan is declared once per model (:func:`bmojo_plan`) and consumed by both engines (DESIGN §5): the PyTorch
engine turns it into ``parallelize_module`` styles, the NxD engine into ``ColumnParallelLinear`` /
``RowParallelLinear`` / ``ParallelEmbedding`` replacements. The plan also says how every parameter is split
over tensor-parallel ranks (:class:`ShardSpec`), which is what checkpoints, gathers and converters use.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from bmojo.config import BmojoConfig
from bmojo.model.attention import AttentionMixer
from bmojo.model.layers import RMSNorm, RotaryEmbedding
from bmojo.model.mamba2 import Mamba2Mixer
from bmojo.model.modeling import BmojoBlock, BmojoForCausalLM


class Role(str, Enum):
    column = "column"  # output features split over ranks; input replicated
    row = "row"  # input features split over ranks; outputs summed
    vocab_embedding = "vocab_embedding"  # vocabulary rows split; lookups summed
    vocab_head = "vocab_head"  # LM head split over the vocabulary, feeding a vocab-parallel cross-entropy
    ssm = "ssm"  # Mamba-2 mixer: in_proj per segment by head, per-head parameters, out_proj row-parallel
    sequence_norm = "sequence_norm"  # norm on the residual stream: sequence-sharded under sequence parallelism
    branch = "branch"  # residual branch (mixer, MLP): sees the whole sequence, so its input is gathered under SP
    heads = "heads"  # a mixer whose head counts become per-rank counts


class Output(str, Enum):
    """Where a row-parallel result goes: that decides how the partial sums are combined."""

    residual = "residual"  # added to the residual stream: reduce-scattered along the sequence under SP
    replicated = "replicated"  # read whole by the next op (the SSM output that feeds fading keys): all-reduced


@dataclass(frozen=True)
class ShardSpec:
    """How one parameter is split over ``size`` tensor-parallel ranks.

    Along ``dim`` the tensor is a concatenation of ``segments`` (sizes); each segment is split evenly and a rank
    keeps, in order, its slice of every segment. A fused projection such as the SSM ``in_proj`` (z, x, B, C, dt)
    is therefore sharded per segment, never as one contiguous block. ``dim=None`` means replicated.

    ``max_parts`` (per segment, ``None`` = no limit) caps how many slices a segment is cut into: the SSM's B/C
    rows come in ``ssm_num_groups`` groups that cannot be cut, so with fewer groups than ranks each group is kept
    whole by the ``size / parts`` consecutive ranks whose heads read it. Those ranks each see only their heads'
    share of its gradient (:meth:`shared_rows`), as do ranks holding a ``partial_grad`` replicated parameter;
    engines add such gradients up over the ranks that share them.
    """

    dim: int | None = None
    segments: tuple[int, ...] = ()
    partial_grad: bool = False
    max_parts: tuple[int | None, ...] = ()

    @property
    def sharded(self) -> bool:
        return self.dim is not None

    def parts(self, index: int, size: int) -> int:
        """How many slices segment ``index`` is cut into over ``size`` ranks."""
        limit = self.max_parts[index] if self.max_parts else None
        if limit is None or limit >= size:
            return size
        if size % limit:
            raise ValueError(f"{size} ranks cannot share {limit} undivisible groups evenly")
        return limit

    def local(self, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        """The slice rank ``rank`` of ``size`` keeps: full [..] -> local [..] (a new contiguous tensor)."""
        if self.dim is None:
            return full.clone()
        pieces = full.split(list(self.segments), dim=self.dim)
        slices = []
        for index, piece in enumerate(pieces):
            parts = self.parts(index, size)
            slices.append(piece.chunk(parts, dim=self.dim)[rank // (size // parts)])
        return torch.cat(slices, dim=self.dim).contiguous()

    def merge(self, locals_by_rank: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`local`: the full tensor from every rank's slice (rank order)."""
        if self.dim is None:
            return locals_by_rank[0].clone()
        size = len(locals_by_rank)
        parts = [self.parts(i, size) for i in range(len(self.segments))]
        split = [segment // p for segment, p in zip(self.segments, parts, strict=True)]
        per_rank = [local.split(split, dim=self.dim) for local in locals_by_rank]
        pieces = [per_rank[r][i] for i, p in enumerate(parts) for r in range(0, size, size // p)]
        return torch.cat(pieces, dim=self.dim)

    def shared_rows(self, size: int) -> list[tuple[int, int, int]]:
        """(start, stop, parts) along ``dim`` of a local slice for every segment kept by several ranks."""
        if self.dim is None:
            return []
        shared, start = [], 0
        for index, segment in enumerate(self.segments):
            parts = self.parts(index, size)
            if parts < size:
                shared.append((start, start + segment // parts, parts))
            start += segment // parts
        return shared


REPLICATED = ShardSpec()


@dataclass(frozen=True)
class ModuleRule:
    """One module's role. ``output`` applies to ``row`` and ``ssm``; ``divide`` names per-rank attributes."""

    fqn: str
    role: Role
    output: Output | None = None
    divide: tuple[str, ...] = ()


@dataclass(frozen=True)
class ParallelPlan:
    """Rules for every module that changes under parallelism, the parameter shard specs and the pipeline unit.

    ``units`` is the FQN of the ``ModuleList`` of pipeline units (``unit_class`` instances); ``before_units`` and
    ``after_units`` are the modules that live on the first and the last pipeline stage.
    """

    rules: tuple[ModuleRule, ...]
    param_specs: dict[str, ShardSpec]
    unit_class: type[nn.Module]
    units: str
    num_units: int
    before_units: tuple[str, ...]
    after_units: tuple[str, ...]
    leaf_classes: tuple[type[nn.Module], ...] = ()

    def spec(self, fqn: str) -> ShardSpec:
        return self.param_specs.get(fqn, REPLICATED)

    def stage_units(self, num_stages: int) -> list[range]:
        return split_units(self.num_units, num_stages)

    def pipeline_cuts(self, num_stages: int) -> list[str]:
        """FQNs of the last unit of every stage but the last (NxD's ``pipeline_cuts``: it cuts after each)."""
        return [f"{self.units}.{r.start - 1}" for r in self.stage_units(num_stages)[1:]]


def split_units(num_units: int, num_stages: int) -> list[range]:
    """Units of each pipeline stage: an even split, the first stages taking one more when it does not divide."""
    if not 1 <= num_stages <= num_units:
        raise ValueError(
            f"pipeline_parallel_size={num_stages} needs between 1 and num_hidden_layers={num_units} stages"
        )
    base, extra = divmod(num_units, num_stages)
    bounds = [0]
    for stage in range(num_stages):
        bounds.append(bounds[-1] + base + (stage < extra))
    return [range(bounds[s], bounds[s + 1]) for s in range(num_stages)]


def _ssm_specs(prefix: str, mixer: Mamba2Mixer) -> dict[str, ShardSpec]:
    groups_width = mixer.num_groups * mixer.state_size
    groups = mixer.num_groups
    conv = ShardSpec(0, (mixer.inner_size, groups_width, groups_width), max_parts=(None, groups, groups))
    return {
        f"{prefix}.in_proj.weight": ShardSpec(
            0, tuple(mixer.in_proj_segments), max_parts=(None, None, groups, groups, None)
        ),
        f"{prefix}.conv1d.weight": conv,
        f"{prefix}.conv1d.bias": conv,
        f"{prefix}.dt_bias": ShardSpec(0, (mixer.num_heads,)),
        f"{prefix}.A_log": ShardSpec(0, (mixer.num_heads,)),
        f"{prefix}.D": ShardSpec(0, (mixer.num_heads,)),
        f"{prefix}.norm.weight": ShardSpec(0, (mixer.inner_size,)),
        f"{prefix}.out_proj.weight": ShardSpec(1, (mixer.inner_size,)),
    }


def _linear(rules: list, specs: dict, fqn: str, linear: nn.Linear, role: Role, output: Output | None = None) -> None:
    rules.append(ModuleRule(fqn, role, output))
    dim = 1 if role == Role.row else 0
    specs[f"{fqn}.weight"] = ShardSpec(dim, (linear.weight.shape[dim],))
    if linear.bias is not None and role != Role.row:
        specs[f"{fqn}.bias"] = ShardSpec(0, (linear.bias.shape[0],))


def bmojo_plan(model: BmojoForCausalLM) -> ParallelPlan:
    """The parallel plan of a :class:`BmojoForCausalLM` (the whole family: letters A, W, M, F, B)."""
    rules: list[ModuleRule] = []
    specs: dict[str, ShardSpec] = {}
    rules.append(ModuleRule("model.embed_tokens", Role.vocab_embedding))
    specs["model.embed_tokens.weight"] = ShardSpec(0, (model.config.vocab_size,))
    for index, block in enumerate(model.model.layers):
        prefix = f"model.layers.{index}"
        rules += [ModuleRule(f"{prefix}.mixer_norm", Role.sequence_norm), ModuleRule(f"{prefix}.mixer", Role.branch)]
        mixer = block.mixer
        if isinstance(mixer, Mamba2Mixer):
            rules.append(ModuleRule(f"{prefix}.mixer", Role.ssm, Output.residual))
            specs.update(_ssm_specs(f"{prefix}.mixer", mixer))
        else:
            _attention_rules(rules, specs, f"{prefix}.mixer", mixer)
        if block.mlp is not None:
            rules += [ModuleRule(f"{prefix}.mlp_norm", Role.sequence_norm), ModuleRule(f"{prefix}.mlp", Role.branch)]
            for name in ("gate_proj", "up_proj"):
                _linear(rules, specs, f"{prefix}.mlp.{name}", getattr(block.mlp, name), Role.column)
            _linear(rules, specs, f"{prefix}.mlp.down_proj", block.mlp.down_proj, Role.row, Output.residual)
    rules.append(ModuleRule("model.norm", Role.sequence_norm))
    rules.append(ModuleRule("lm_head", Role.vocab_head))
    specs["lm_head.weight"] = ShardSpec(0, (model.config.vocab_size,))
    return ParallelPlan(
        rules=tuple(rules),
        param_specs=specs,
        unit_class=BmojoBlock,
        units="model.layers",
        num_units=len(model.model.layers),
        before_units=("model.embed_tokens",),
        after_units=("model.norm", "lm_head"),
        leaf_classes=(RMSNorm, RotaryEmbedding),
    )


def _attention_rules(rules: list, specs: dict, prefix: str, mixer: AttentionMixer) -> None:
    rules.append(ModuleRule(prefix, Role.heads, divide=("num_heads", "num_kv_heads")))
    for name in ("q_proj", "k_proj", "v_proj", "fading_q_proj", "fading_k_proj", "fading_v_proj"):
        if getattr(mixer, name) is not None:
            _linear(rules, specs, f"{prefix}.{name}", getattr(mixer, name), Role.column)
    _linear(rules, specs, f"{prefix}.o_proj", mixer.o_proj, Role.row, Output.residual)
    for name in ("q_norm", "k_norm", "fading_q_norm", "fading_k_norm"):
        if getattr(mixer, name) is not None:
            specs[f"{prefix}.{name}.weight"] = ShardSpec(partial_grad=True)
    if mixer.ssm is not None:
        # The SSM output feeds the fading keys through their K/V projections, which need it whole on every rank.
        rules.append(ModuleRule(f"{prefix}.ssm", Role.ssm, Output.replicated))
        specs.update(_ssm_specs(f"{prefix}.ssm", mixer.ssm))


def check_plan_fits(config: BmojoConfig, tensor_parallel: int, sequence_parallel: bool, seq_len: int | None) -> None:
    """Raise ``ValueError`` naming the field to change when the model cannot be split ``tensor_parallel`` ways."""
    if tensor_parallel < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel}")
    if tensor_parallel == 1:
        return
    letters = set(config.layer_letters)
    needs = [("vocab_size", config.vocab_size), ("intermediate_size", config.intermediate_size)]
    if letters & set("AWFB"):
        needs += [
            ("num_attention_heads", config.num_attention_heads),
            ("num_key_value_heads", config.num_key_value_heads),
        ]
    if letters & set("MFB"):
        needs += [("ssm heads (ssm_expand * hidden_size / ssm_head_dim)", config.ssm_num_heads)]
        groups = config.ssm_num_groups
        if groups % tensor_parallel and tensor_parallel % groups:
            raise ValueError(
                f"tensor_parallel_size={tensor_parallel} and ssm_num_groups={groups}: one must divide the other "
                "(each rank reads the B/C group of its SSM heads; groups are split over ranks or shared by them)"
            )
    for name, value in needs:
        if value % tensor_parallel:
            hint = "; pad the vocabulary (model.pad_vocab_multiple) to a multiple of it" if name == "vocab_size" else ""
            raise ValueError(f"tensor_parallel_size={tensor_parallel} does not divide model {name}={value}{hint}")
    if sequence_parallel and seq_len is not None and seq_len % tensor_parallel:
        raise ValueError(
            f"sequence parallelism splits the sequence over {tensor_parallel} ranks but seq_len={seq_len} "
            "does not divide; change data.seq_len or turn parallel.sequence_parallel off"
        )
