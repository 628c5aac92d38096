"""Sharded checkpoints of the PyTorch engine, with the layout they were written under.

Layout of a checkpoint folder::

    layout.json                       engine, layout, every parameter's ShardSpec, the pipeline split
    tp_rank_XX_pp_rank_XX.pt          {"model": {fqn: tensor}, "optimizer": {"state": {fqn: {...}}, "param_groups"}}

Each file holds one tensor-parallel slice of one pipeline stage, whole over data-parallel ranks (written by
data-parallel rank 0), so a run may resume with another data-parallel size. Tensor- and pipeline-parallel sizes
must match; otherwise :mod:`bmojo.parallel.convert` rewrites the checkpoint for the new layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from bmojo.parallel.tensor_parallel import from_tensor_parallel_local, tensor_parallel_local

if TYPE_CHECKING:
    from bmojo.parallel.torch_engine import TorchEngine

FORMAT = "bmojo-parallel-1"
LAYOUT_FILE = "layout.json"


class LayoutMismatchError(RuntimeError):
    """A checkpoint was written under a layout this run cannot read directly; the message names the converter."""


def shard_file(folder: Path, tp_rank: int, pp_rank: int) -> Path:
    return Path(folder) / f"tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:02d}.pt"


def describe_layout(engine: TorchEngine, engine_name: str = "torch") -> dict:
    """What ``layout.json`` records: enough for :mod:`bmojo.parallel.convert` to work without the model code."""
    plan = engine.plan
    return {
        "format": FORMAT,
        "engine": engine_name,
        "layout": engine.layout.to_dict(),
        "param_specs": {
            name: {
                "dim": spec.dim,
                "segments": list(spec.segments),
                "partial_grad": spec.partial_grad,
                "max_parts": list(spec.max_parts),
            }
            for name, spec in plan.param_specs.items()
        },
        "pipeline": {
            "units": plan.units,
            "num_units": plan.num_units,
            "before_units": list(plan.before_units),
            "after_units": list(plan.after_units),
        },
    }


def converter_command(folder: Path, tensor_parallel: int, pipeline_parallel: int) -> str:
    target = Path(folder).with_name(f"{Path(folder).name}_tp{tensor_parallel}_pp{pipeline_parallel}")
    return (
        f"python -m bmojo.parallel.convert {folder} {target} "
        f"--tensor-parallel {tensor_parallel} --pipeline-parallel {pipeline_parallel}"
    )


def check_layout(folder: Path, engine: TorchEngine) -> dict:
    """The recorded layout of ``folder``; raises :class:`LayoutMismatchError` if this engine cannot load it."""
    path = Path(folder) / LAYOUT_FILE
    if not path.is_file():
        raise LayoutMismatchError(f"{folder} has no {LAYOUT_FILE}: it is not a sharded checkpoint of bmojo.parallel")
    recorded = json.loads(path.read_text())
    saved = {k: recorded["layout"][k] for k in ("tensor_parallel", "pipeline_parallel")}
    wanted = engine.layout.sharding()
    if saved != wanted:
        command = converter_command(folder, wanted["tensor_parallel"], wanted["pipeline_parallel"])
        raise LayoutMismatchError(
            f"{folder} was written with {saved} but this run uses {wanted}; tensor slices and pipeline stages "
            f"differ, so convert it first:\n  {command}"
        )
    return recorded


def _copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    local = target.to_local() if isinstance(target, DTensor) else target
    local.copy_(from_tensor_parallel_local(value, target))


def save_sharded(folder: Path, engine: TorchEngine, optimizer: torch.optim.Optimizer | None) -> None:
    """Write this rank's share (collective: every rank calls it). ``folder`` is created."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = dict(engine.named_parameters())
    model = {name: tensor_parallel_local(param.detach()).clone() for name, param in params.items()}
    payload = {"model": model}
    if optimizer is not None:
        names = {id(param): name for name, param in params.items()}
        state = {
            names[id(param)]: {
                key: tensor_parallel_local(value).clone() if torch.is_tensor(value) else value
                for key, value in values.items()
            }
            for param, values in optimizer.state.items()
        }
        groups = [
            {**{k: v for k, v in group.items() if k != "params"}, "params": [names[id(p)] for p in group["params"]]}
            for group in optimizer.param_groups
        ]
        payload["optimizer"] = {"state": state, "param_groups": groups}
    if engine.dp_rank == 0:
        torch.save(payload, shard_file(folder, engine.tp_rank, engine.pp_rank))
    if dist.get_rank() == 0:
        (folder / LAYOUT_FILE).write_text(json.dumps(describe_layout(engine), indent=1))
    dist.barrier()


def load_sharded(folder: Path, engine: TorchEngine, optimizer: torch.optim.Optimizer | None) -> None:
    """Load weights (and optimizer state) written by :func:`save_sharded` into this rank's share."""
    check_layout(folder, engine)
    payload = torch.load(shard_file(folder, engine.tp_rank, engine.pp_rank), weights_only=True)
    params = dict(engine.named_parameters())
    missing = sorted(set(params) - set(payload["model"]))
    if missing:
        raise LayoutMismatchError(f"{folder} lacks parameters of this model: {missing[:5]}")
    with torch.no_grad():
        for name, param in params.items():
            _copy_into(param, payload["model"][name])
    if optimizer is None:
        return
    if "optimizer" not in payload:
        raise LayoutMismatchError(f"{folder} holds no optimizer state")
    saved = payload["optimizer"]
    template = optimizer.state_dict()
    index_of = {}
    for group, saved_group in zip(template["param_groups"], saved["param_groups"], strict=True):
        index_of.update(zip(saved_group["params"], group["params"], strict=True))
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    state = {}
    for name, values in saved["state"].items():
        param = params[name]
        state[index_of[name]] = {
            key: _from_state_value(value, param) if torch.is_tensor(value) and value.ndim else value
            for key, value in values.items()
        }
    optimizer.load_state_dict({"state": state, "param_groups": template["param_groups"]})


def _from_state_value(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A saved optimizer state tensor (tensor-parallel slice) shaped and placed like ``param``."""
    if not isinstance(param, DTensor):
        return value
    local = from_tensor_parallel_local(value, param)
    return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())
