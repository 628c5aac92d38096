"""Parallelism: the plan, the layout, and the PyTorch engine on several CPU processes (gloo) against one process."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "parallel"))

import harness  # noqa: E402
import scenarios  # noqa: E402

from bmojo import BmojoConfig, BmojoForCausalLM  # noqa: E402
from bmojo.parallel import Layout, ShardSpec, bmojo_plan  # noqa: E402
from bmojo.parallel.checkpoint import LayoutMismatchError, check_layout, describe_layout, shard_file  # noqa: E402
from bmojo.parallel.convert import convert  # noqa: E402
from bmojo.parallel.plan import Output, Role, check_plan_fits  # noqa: E402
from bmojo.parallel.setup import build_engine, layout_from_config  # noqa: E402

PATTERNS = ["B", "MW", "A"]
BATCH = 4


def test_shard_spec_keeps_each_segment_split_and_merges_back():
    full = torch.arange(2 * 12).view(12, 2)
    spec = ShardSpec(0, (4, 6, 2))  # three segments, e.g. z | x | dt
    rank0, rank1 = spec.local(full, 0, 2), spec.local(full, 1, 2)
    assert rank0[:, 0].tolist() == [0, 2, 8, 10, 12, 20]  # rows 0-1, 4-6, 10 of each segment's first half
    assert rank1[:, 0].tolist() == [4, 6, 14, 16, 18, 22]
    assert torch.equal(spec.merge([rank0, rank1]), full)
    assert torch.equal(ShardSpec().merge([full, full + 1]), full)


def test_plan_covers_every_matrix_and_names_the_ssm_segments():
    model = BmojoForCausalLM(BmojoConfig(**{**harness.PATTERN_CONFIG, "layer_pattern": "BM"}))
    plan = bmojo_plan(model)
    sharded = {name for name, spec in plan.param_specs.items() if spec.sharded}
    replicated = {name for name, p in model.named_parameters() if name not in sharded}
    # What stays whole on every rank: norms, the innovation predictor (fed replicated tensors) and nothing else.
    assert all(name.endswith("norm.weight") or ".predictor." in name for name in replicated), replicated
    in_proj = plan.spec("model.layers.1.mixer.in_proj.weight")
    mixer = model.model.layers[1].mixer
    assert in_proj.segments == mixer.in_proj_segments and in_proj.dim == 0
    roles = {rule.fqn: rule for rule in plan.rules if rule.role in (Role.ssm, Role.row)}
    assert roles["model.layers.0.mixer.ssm"].output == Output.replicated  # feeds fading keys
    assert roles["model.layers.1.mixer"].output == Output.residual
    assert plan.unit_class is type(model.model.layers[0])
    assert [list(r) for r in plan.stage_units(2)] == [[0], [1]] and plan.pipeline_cuts(2) == ["model.layers.0"]


def test_plan_splits_untied_fading_projections_like_the_local_ones():
    config = BmojoConfig(**{**harness.PATTERN_CONFIG, "layer_pattern": "F", "tie_fading_proj": False, "qk_norm": True})
    plan = bmojo_plan(BmojoForCausalLM(config))
    roles = {rule.fqn: rule.role for rule in plan.rules}
    mixer = "model.layers.0.mixer"
    for local, fading in (("q_proj", "fading_q_proj"), ("k_proj", "fading_k_proj"), ("v_proj", "fading_v_proj")):
        assert roles[f"{mixer}.{fading}"] == roles[f"{mixer}.{local}"] == Role.column
        assert plan.spec(f"{mixer}.{fading}.weight") == plan.spec(f"{mixer}.{local}.weight")
    for name in ("q_norm", "k_norm", "fading_q_norm", "fading_k_norm"):
        assert plan.spec(f"{mixer}.{name}.weight").partial_grad, name


def test_plan_refuses_splits_the_model_cannot_take_with_the_field_to_change():
    config = BmojoConfig(**{**harness.PATTERN_CONFIG, "hidden_size": 48, "ssm_num_groups": 3})  # 12 SSM heads
    with pytest.raises(ValueError, match="ssm_num_groups=3: one must divide the other"):
        check_plan_fits(config, 2, False, None)
    with pytest.raises(ValueError, match="num_key_value_heads=2"):
        check_plan_fits(BmojoConfig(**harness.PATTERN_CONFIG), 4, False, None)
    with pytest.raises(ValueError, match="seq_len=31"):
        check_plan_fits(BmojoConfig(**harness.PATTERN_CONFIG), 2, True, 31)
    with pytest.raises(ValueError, match="num_hidden_layers=2"):
        bmojo_plan(BmojoForCausalLM(BmojoConfig(**harness.PATTERN_CONFIG))).stage_units(3)


def test_layout_orders_ranks_pp_dp_tp_and_rejects_bad_combinations():
    layout = Layout(data_parallel=2, tensor_parallel=2, pipeline_parallel=2, microbatches=2)
    assert layout.world_size == 8
    assert layout.coordinates(5) == (1, 0, 1)
    with pytest.raises(ValueError, match="sequence_parallel"):
        Layout(sequence_parallel=True)
    with pytest.raises(ValueError, match="microbatches"):
        Layout(pipeline_parallel=4, microbatches=2)
    with pytest.raises(ValueError, match="schedule"):
        Layout(schedule="zero-bubble")


def test_recipe_gives_the_layout_and_the_backend_the_engine(monkeypatch):
    parallel = SimpleNamespace(
        tensor_parallel_size=2, pipeline_parallel_size=2, data_parallel_size=None, sequence_parallel=True, zero1=True
    )
    layout = layout_from_config(parallel, microbatches=4, world_size=8)
    assert (layout.data_parallel, layout.tensor_parallel, layout.pipeline_parallel) == (2, 2, 2)
    assert layout.sequence_parallel and layout.zero1 and layout.microbatches == 4 and layout.schedule == "1f1b"
    with pytest.raises(ValueError, match="set it to 2 or null"):
        layout_from_config(SimpleNamespace(**{**vars(parallel), "data_parallel_size": 4}), 4, 8)
    with pytest.raises(ValueError, match="start a multiple of 4 processes"):
        layout_from_config(parallel, 4, 6)
    monkeypatch.setitem(sys.modules, "neuronx_distributed", None)
    with pytest.raises(ImportError, match="Neuron SDK"):
        build_engine("nxd", Layout())
    with pytest.raises(ValueError, match="not one of"):
        build_engine("deepspeed", Layout())


def test_checkpoint_of_another_split_names_the_converter(tmp_path):
    model = BmojoForCausalLM(BmojoConfig(**harness.PATTERN_CONFIG))
    writer = SimpleNamespace(layout=Layout(tensor_parallel=2), plan=bmojo_plan(model))
    (tmp_path / "layout.json").write_text(json.dumps(describe_layout(writer)))
    assert check_layout(tmp_path, writer)["layout"]["tensor_parallel"] == 2
    reader = SimpleNamespace(layout=Layout(pipeline_parallel=2, microbatches=2))
    expected = "python -m bmojo.parallel.convert .* --tensor-parallel 1 --pipeline-parallel 2"
    with pytest.raises(LayoutMismatchError, match=expected):
        check_layout(tmp_path, reader)


DISTRIBUTED_RUNS = {
    "tp2": (
        2,
        [
            (dict(tensor_parallel=2), PATTERNS),
            # One B/C group for two ranks (the recipes' default), and QK-norm weights shared by all heads.
            (dict(tensor_parallel=2), ["B", "MW"], dict(ssm_num_groups=1, qk_norm=True)),
            # The vocab-parallel embedding and head share one sharded weight.
            (dict(tensor_parallel=2), ["A"], dict(tie_word_embeddings=True)),
            # Untied fading projections: the fading query split by head like the query, its QK-norms shared.
            (dict(tensor_parallel=2), ["F"], dict(tie_fading_proj=False, qk_norm=True)),
        ],
    ),
    "dp2": (2, [(dict(data_parallel=2, microbatches=2), PATTERNS)]),
    "pp2": (
        2,
        [
            (dict(pipeline_parallel=2, microbatches=2), PATTERNS),
            (dict(pipeline_parallel=2, microbatches=2, schedule="gpipe"), ["B"]),
        ],
    ),
    "tp2_dp2": (
        4,
        [
            (dict(tensor_parallel=2, data_parallel=2), PATTERNS),
            (dict(tensor_parallel=2, data_parallel=2), ["B"], dict(ssm_num_groups=1, tie_word_embeddings=True)),
        ],
    ),
    "tp4_shared_groups": (4, [(dict(tensor_parallel=4), ["B", "MW"], dict(ssm_num_groups=2, num_key_value_heads=4))]),
    "pp2_tp2": (4, [(dict(pipeline_parallel=2, tensor_parallel=2, sequence_parallel=True, microbatches=2), ["B"])]),
    "pp2_dp2_tp2": (8, [(dict(pipeline_parallel=2, data_parallel=2, tensor_parallel=2, microbatches=2), ["MW"])]),
    "tp2_sequence_parallel_checkpointing": (
        2,
        [
            (dict(tensor_parallel=2, sequence_parallel=True, activation_checkpointing=True), PATTERNS),
            (dict(tensor_parallel=2, sequence_parallel=True), ["B"], dict(ssm_num_groups=1)),
        ],
    ),
}


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(DISTRIBUTED_RUNS))
def test_parallel_training_matches_one_process(name):
    world_size, runs = DISTRIBUTED_RUNS[name]
    harness.launch(world_size, scenarios.compare_training, runs=runs, batch=BATCH)


@pytest.mark.distributed
def test_eidetic_memory_is_the_same_on_every_rank():
    harness.launch(2, scenarios.memory_positions, layout=dict(tensor_parallel=2, sequence_parallel=True), batch=BATCH)


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("world_size", "layout", "pattern"),
    [(4, dict(tensor_parallel=2, data_parallel=2), "B"), (2, dict(pipeline_parallel=2, microbatches=2), "MW")],
)
def test_save_and_resume_under_the_same_layout_is_exact(tmp_path, world_size, layout, pattern):
    harness.launch(
        world_size,
        scenarios.save_and_resume,
        layout=layout,
        pattern=pattern,
        folder=str(tmp_path / "ckpt"),
        batch=BATCH,
    )


@pytest.mark.distributed
def test_converter_moves_a_checkpoint_to_another_split(tmp_path):
    source, record = tmp_path / "tp2_dp2", tmp_path / "loss.json"
    layout = dict(tensor_parallel=2, data_parallel=2)
    harness.launch(
        4, scenarios.save_and_resume, layout=layout, pattern="B", folder=str(source), batch=BATCH, record_to=str(record)
    )
    full = convert(source, tmp_path / "full", tensor_parallel=1, pipeline_parallel=1)
    model = BmojoForCausalLM(BmojoConfig(**{**harness.PATTERN_CONFIG, "layer_pattern": "B"}))
    model.load_state_dict(
        torch.load(shard_file(full, 0, 0), weights_only=True)["model"]
    )  # strict: every name, full shape
    back = convert(full, tmp_path / "back", tensor_parallel=2, pipeline_parallel=1)
    for rank in range(2):
        original, round_trip = (torch.load(shard_file(f, rank, 0), weights_only=True) for f in (source, back))
        assert original["model"].keys() == round_trip["model"].keys()
        assert all(torch.equal(original["model"][k], round_trip["model"][k]) for k in original["model"])
        for name, values in original["optimizer"]["state"].items():
            assert all(torch.equal(v, round_trip["optimizer"]["state"][name][k]) for k, v in values.items())
    pipelined = convert(source, tmp_path / "pp2", tensor_parallel=1, pipeline_parallel=2)
    # The same step-2 tokens as two microbatches of half the batch (the generator fills them in the same order).
    layout = dict(pipeline_parallel=2, microbatches=2)
    harness.launch(
        2,
        scenarios.resume_converted,
        layout=layout,
        pattern="B",
        folder=str(pipelined),
        batch=BATCH // 2,
        expected_from=str(record),
    )
