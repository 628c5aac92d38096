"""Rewrite a sharded checkpoint for another tensor/pipeline-parallel split, or merge it whole.

    python -m bmojo.parallel.convert SOURCE TARGET --tensor-parallel N --pipeline-parallel M

Works from ``layout.json`` alone (shard specs and the pipeline split are recorded there), so it needs neither the
model code nor several processes. ``--tensor-parallel 1 --pipeline-parallel 1`` gives one file whose ``model``
entry is a plain full state dict (``BmojoForCausalLM.load_state_dict`` takes it). Checkpoints of the PyTorch
engine have their optimizer states converted with their parameters; the data-parallel size is free at resume
time anyway. Checkpoints of the NxD engine give their weights only: NxD's optimizer files hold ZeRO-1 shards of
flattened parameters, which a new split cannot reuse.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bmojo.parallel.checkpoint import LAYOUT_FILE, LayoutMismatchError, shard_file
from bmojo.parallel.plan import ShardSpec, split_units

NXD_TAG = "nxd"  # the tag of NxD's own checkpoint inside a checkpoint folder of the NxD engine


def nxd_model_file(folder: Path, tp_rank: int, pp_rank: int) -> Path:
    """Where NxD's ``save_checkpoint`` writes the weights of a (tp, pp) rank (one copy, from data-parallel
    rank 0): ``<tag>/model/dp_rank_00_tp_rank_XX_pp_rank_XX.pt``, a plain state dict of that rank's slices."""
    return Path(folder) / NXD_TAG / "model" / f"dp_rank_00_tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:02d}.pt"


def _nxd_payload(folder: Path, tp_rank: int, pp_rank: int) -> dict:
    state = torch.load(nxd_model_file(folder, tp_rank, pp_rank), weights_only=True)
    # Activation checkpointing's wrapper may show in the names; the plan knows the model's own names.
    return {"model": {name.replace("_checkpoint_wrapped_module.", ""): value for name, value in state.items()}}


def _spec(recorded: dict, name: str) -> ShardSpec:
    fields = recorded["param_specs"].get(name)
    if fields is None:
        return ShardSpec()
    # max_parts: SSM B/C groups kept whole by several ranks when there are fewer groups than ranks.
    return ShardSpec(fields["dim"], tuple(fields["segments"]), fields["partial_grad"], tuple(fields["max_parts"]))


def _stage_of(name: str, pipeline: dict, stages: list[range]) -> int:
    if any(name.startswith(prefix + ".") for prefix in pipeline["before_units"]):
        return 0
    if any(name.startswith(prefix + ".") for prefix in pipeline["after_units"]):
        return len(stages) - 1
    index = int(name[len(pipeline["units"]) + 1 :].split(".", 1)[0])
    return next(s for s, units in enumerate(stages) if index in units)


def _merge(recorded: dict, payloads: dict[tuple[int, int], dict]) -> dict:
    """Full model tensors, optimizer state and param groups (names) from every (tp, pp) file of a checkpoint."""
    tp = recorded["layout"]["tensor_parallel"]
    pp = recorded["layout"]["pipeline_parallel"]
    model, state, groups = {}, {}, None
    for stage in range(pp):
        files = [payloads[(rank, stage)] for rank in range(tp)]
        for name in files[0]["model"]:
            model[name] = _spec(recorded, name).merge([f["model"][name] for f in files])
        if "optimizer" not in files[0]:
            continue
        for name, values in files[0]["optimizer"]["state"].items():
            state[name] = {
                key: _spec(recorded, name).merge([f["optimizer"]["state"][name][key] for f in files])
                if torch.is_tensor(value) and value.ndim
                else value
                for key, value in values.items()
            }
        stage_groups = files[0]["optimizer"]["param_groups"]
        if groups is None:
            groups = [{**group, "params": []} for group in stage_groups]
        for merged, group in zip(groups, stage_groups, strict=True):
            merged["params"] += group["params"]
    return {"model": model, "state": state, "groups": groups}


def _split(full: dict, recorded: dict, tensor_parallel: int, stage_of: dict[str, int], tp_rank: int, stage: int):
    def local(name: str, tensor: torch.Tensor) -> torch.Tensor:
        spec = _spec(recorded, name)
        if spec.sharded and any(size % tensor_parallel for size in spec.segments):
            raise ValueError(f"{name}: segments {spec.segments} do not split over {tensor_parallel} ranks")
        return spec.local(tensor, tp_rank, tensor_parallel)

    mine = [name for name in full["model"] if stage_of[name] == stage]
    payload = {"model": {name: local(name, full["model"][name]) for name in mine}}
    if full["groups"] is not None:
        state = {
            name: {k: local(name, v) if torch.is_tensor(v) and v.ndim else v for k, v in full["state"][name].items()}
            for name in mine
            if name in full["state"]
        }
        groups = [{**g, "params": [n for n in g["params"] if stage_of[n] == stage]} for g in full["groups"]]
        payload["optimizer"] = {"state": state, "param_groups": groups}
    return payload


def _torch_payload(folder: Path, tp_rank: int, pp_rank: int) -> dict:
    return torch.load(shard_file(folder, tp_rank, pp_rank), weights_only=True)


def _load(source: Path) -> tuple[dict, dict]:
    """The recorded layout of ``source`` and its tensors and optimizer states merged whole."""
    path = source / LAYOUT_FILE
    if not path.is_file():
        raise LayoutMismatchError(f"{source} has no {LAYOUT_FILE}: it is not a sharded checkpoint of bmojo.parallel")
    recorded = json.loads(path.read_text())
    old = recorded["layout"]
    read = _nxd_payload if recorded["engine"] == "nxd" else _torch_payload
    payloads = {
        (tp_rank, stage): read(source, tp_rank, stage)
        for tp_rank in range(old["tensor_parallel"])
        for stage in range(old["pipeline_parallel"])
    }
    return recorded, _merge(recorded, payloads)


def full_model_state(source: Path) -> dict[str, torch.Tensor]:
    """The whole weights of a sharded checkpoint under the model's names (each shared weight once)."""
    return _load(Path(source))[1]["model"]


def convert(source: Path, target: Path, tensor_parallel: int, pipeline_parallel: int) -> Path:
    """Write ``target`` holding ``source`` re-split ``tensor_parallel`` x ``pipeline_parallel`` ways."""
    source, target = Path(source), Path(target)
    recorded, full = _load(source)
    old = recorded["layout"]
    pipeline = recorded["pipeline"]
    stages = split_units(pipeline["num_units"], pipeline_parallel)
    stage_of = {name: _stage_of(name, pipeline, stages) for name in full["model"]}
    target.mkdir(parents=True, exist_ok=True)
    for tp_rank in range(tensor_parallel):
        for stage in range(pipeline_parallel):
            payload = _split(full, recorded, tensor_parallel, stage_of, tp_rank, stage)
            torch.save(payload, shard_file(target, tp_rank, stage))
    layout = {**old, "tensor_parallel": tensor_parallel, "pipeline_parallel": pipeline_parallel}
    layout["sequence_parallel"] = layout["sequence_parallel"] and tensor_parallel > 1
    # The files written are the PyTorch engine's, whichever engine wrote the source.
    (target / LAYOUT_FILE).write_text(json.dumps({**recorded, "engine": "torch", "layout": layout}, indent=1))
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a checkpoint folder holding layout.json")
    parser.add_argument("target", type=Path, help="where to write the converted checkpoint")
    parser.add_argument("--tensor-parallel", type=int, required=True)
    parser.add_argument("--pipeline-parallel", type=int, required=True)
    args = parser.parse_args(argv)
    written = convert(args.source, args.target, args.tensor_parallel, args.pipeline_parallel)
    print(f"wrote {written} for tensor_parallel={args.tensor_parallel} pipeline_parallel={args.pipeline_parallel}")


if __name__ == "__main__":
    main()
