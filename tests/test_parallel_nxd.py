"""Contract tests of the NxD engine against a recording stand-in for ``neuronx_distributed``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "parallel"))

import fake_nxd  # noqa: E402

from bmojo import BmojoConfig, BmojoForCausalLM  # noqa: E402
from bmojo.model.modeling import BmojoBlock  # noqa: E402
from bmojo.parallel import Layout, bmojo_plan  # noqa: E402
from bmojo.parallel.checkpoint import LayoutMismatchError  # noqa: E402
from bmojo.parallel.convert import full_model_state  # noqa: E402
from bmojo.parallel.nxd_engine import INSTALL_HINT, NxDEngine  # noqa: E402
from bmojo.parallel.plan import Output, Role  # noqa: E402

CONFIG = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    layer_pattern="BM",
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    qk_norm=True,
    tie_fading_proj=False,
    window_size=8,
    ssm_state_size=8,
    ssm_head_dim=8,
    ssm_num_groups=2,
    ssm_chunk_size=16,
    memory_size=4,
    memory_topk=2,
    memory_block=8,
    tie_word_embeddings=False,
)


def full_model() -> BmojoForCausalLM:
    torch.manual_seed(0)
    return BmojoForCausalLM(BmojoConfig(**CONFIG))


def test_engine_without_neuronx_distributed_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "neuronx_distributed", None)
    with pytest.raises(ImportError, match="backend.engine=torch") as error:
        NxDEngine(Layout())
    assert str(error.value) == INSTALL_HINT


@pytest.fixture
def sharded(monkeypatch):
    """Rank 1 of a TP=2 x PP=2 layout with sequence parallelism, ZeRO-1 and activation checkpointing."""
    fake = fake_nxd.install(monkeypatch, tp_rank=1, tp_size=2)
    reference = full_model()
    layout = Layout(
        tensor_parallel=2,
        pipeline_parallel=2,
        microbatches=4,
        sequence_parallel=True,
        zero1=True,
        activation_checkpointing=True,
    )
    engine = NxDEngine(layout, max_grad_norm=1.0)
    wrapper = engine.build(reference.config, weights=reference.state_dict())
    return fake, engine, wrapper, reference


def test_config_and_pipeline_come_from_the_plan(sharded):
    fake, engine, wrapper, reference = sharded
    plan = bmojo_plan(reference)
    (config,) = fake.named("neuronx_distributed_config")
    assert config.kwargs["tensor_parallel_size"] == 2 and config.kwargs["pipeline_parallel_size"] == 2
    assert config.kwargs["sequence_parallel"] is True
    assert config.kwargs["optimizer_config"] == {"zero_one_enabled": True, "grad_clipping": True, "max_grad_norm": 1.0}
    assert config.kwargs["activation_checkpoint_config"] is BmojoBlock
    (pipeline,) = fake.named("NxDPPModel")
    assert pipeline.module is wrapper
    assert pipeline.kwargs["transformer_layer_cls"] is plan.unit_class is BmojoBlock
    assert pipeline.kwargs["pipeline_cuts"] == ["model.layers.0"]
    assert pipeline.kwargs["num_microbatches"] == 4
    assert pipeline.kwargs["input_names"] == ["input_ids", "labels"]
    assert pipeline.kwargs["output_loss_value_spec"] == (True, False)
    assert pipeline.kwargs["use_zero1_optimizer"] is True
    assert pipeline.kwargs["broadcast_and_average_loss"] is True and pipeline.kwargs["return_loss_on_cpu"] is False
    assert set(pipeline.kwargs["leaf_module_cls"]) == {"RMSNorm", "RotaryEmbedding"}


def test_exactly_the_plans_modules_are_wrapped_with_the_right_arguments(sharded):
    fake, engine, wrapper, reference = sharded
    model = wrapper.original_torch_module
    plan = engine.plan
    by_module = {id(call.module): call for call in fake.calls if call.module is not None}
    expected = {}
    for rule in plan.rules:
        if rule.role == Role.column:
            expected[rule.fqn] = ("ColumnParallelLinear", dict(gather_output=False, sequence_parallel_enabled=False))
        elif rule.role == Role.row:
            # Residual outputs are reduce-scattered after the layer, the others all-reduced inside it.
            scatter = rule.output == Output.residual
            expected[rule.fqn] = ("RowParallelLinear", dict(input_is_parallel=True, reduce_output=not scatter))
        elif rule.role == Role.ssm:
            scatter = rule.output == Output.residual
            expected[f"{rule.fqn}.in_proj"] = ("ColumnParallelLinear", dict(gather_output=False))
            expected[f"{rule.fqn}.out_proj"] = (
                "RowParallelLinear",
                dict(input_is_parallel=True, reduce_output=not scatter),
            )
    # NxD's embedding reduce-scatters only along its sequence-first default dimension.
    expected["model.embed_tokens"] = ("ParallelEmbedding", dict(sequence_parallel_enabled=True, sequence_dimension=0))
    expected["lm_head"] = ("ColumnParallelLinear", dict(gather_output=False, sequence_parallel_enabled=False))
    # The inner SSM of the B layer feeds fading keys, so it is all-reduced; the M layer's returns to the residual.
    assert expected["model.layers.0.mixer.ssm.out_proj"][1]["reduce_output"] is True
    assert expected["model.layers.1.mixer.out_proj"][1]["reduce_output"] is False
    wrapped = {name for name, module in model.named_modules() if id(module) in by_module}
    assert wrapped == set(expected)
    layer_calls = [
        c for c in fake.calls if c.name in ("ColumnParallelLinear", "RowParallelLinear", "ParallelEmbedding")
    ]
    assert len(layer_calls) == len(expected)
    for fqn, (kind, arguments) in expected.items():
        call = by_module[id(model.get_submodule(fqn))]
        assert call.name == kind, fqn
        assert {k: call.kwargs[k] for k in arguments} == arguments, fqn
        original = reference.get_submodule(fqn)
        sizes = (original.num_embeddings, original.embedding_dim) if kind == "ParallelEmbedding" else None
        sizes = sizes or (original.in_features, original.out_features)
        recorded = (call.kwargs.get("num_embeddings"), call.kwargs.get("embedding_dim"))
        assert sizes in (recorded, (call.kwargs.get("input_size"), call.kwargs.get("output_size"))), fqn
    # Only the innovation predictor stays a plain (replicated) linear.
    plain = {name for name, module in model.named_modules() if type(module) is torch.nn.Linear}
    assert plain == {"model.layers.0.mixer.predictor.proj"}


def test_ssm_is_sharded_per_segment_by_head(sharded):
    fake, engine, wrapper, reference = sharded
    model = wrapper.original_torch_module
    full = reference.model.layers[1].mixer  # the M layer
    local = model.model.layers["1"].mixer
    inner, groups_width, heads = full.inner_size, full.num_groups * full.state_size, full.num_heads
    z, x, b, c, dt = full.in_proj.weight.split([inner, inner, groups_width, groups_width, heads])

    def second_half(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return t.chunk(2, dim=dim)[1]

    expected_in = torch.cat([second_half(t) for t in (z, x, b, c, dt)])
    assert torch.equal(local.in_proj.weight, expected_in)
    conv_x, conv_b, conv_c = full.conv1d.weight.split([inner, groups_width, groups_width])
    assert torch.equal(local.conv1d.weight, torch.cat([second_half(t) for t in (conv_x, conv_b, conv_c)]))
    for name in ("A_log", "D", "dt_bias"):
        assert torch.equal(getattr(local, name), second_half(getattr(full, name))), name
    assert torch.equal(local.norm.weight, second_half(full.norm.weight))
    assert torch.equal(local.out_proj.weight, second_half(full.out_proj.weight, dim=1))
    assert (local.num_heads, local.inner_size, local.num_groups) == (heads // 2, inner // 2, full.num_groups // 2)
    assert local.in_proj_segments == tuple(s // 2 for s in full.in_proj_segments)
    marked = {id(call.module) for call in fake.named("set_tensor_model_parallel_attributes")}
    for name in ("A_log", "D", "dt_bias", "conv1d.weight", "conv1d.bias", "norm.weight"):
        assert id(local.get_parameter(name)) in marked, name
    attention = model.model.layers["0"].mixer
    assert (attention.num_heads, attention.num_kv_heads) == (2, 1)
    assert model.model.layers["0"].mixer_norm.weight.sequence_parallel_enabled is True


def test_fewer_ssm_groups_than_ranks_are_kept_whole_by_the_ranks_that_read_them(monkeypatch):
    fake = fake_nxd.install(monkeypatch, tp_rank=1, tp_size=2)
    reference = BmojoForCausalLM(BmojoConfig(**{**CONFIG, "ssm_num_groups": 1}))
    engine = NxDEngine(Layout(tensor_parallel=2))
    model = engine.build(reference.config, weights=reference.state_dict())
    full, local = reference.model.layers[1].mixer, model.model.layers["1"].mixer
    inner, width, heads = full.inner_size, full.state_size, full.num_heads
    z, x, b, c, dt = full.in_proj.weight.split([inner, inner, width, width, heads])
    expected = torch.cat([z.chunk(2)[1], x.chunk(2)[1], b, c, dt.chunk(2)[1]])
    assert torch.equal(local.in_proj.weight, expected)
    (call,) = [c for c in fake.named("ColumnParallelLinear") if c.module is local.in_proj]
    assert call.kwargs["output_size"] == 2 * expected.shape[0]
    assert (local.num_groups, local.conv_dim) == (1, inner // 2 + 2 * width)
    assert type(local.norm).__name__ == "SharedGroupGatedRMSNorm"
    assert torch.equal(local.norm.weight, full.norm.weight.chunk(2)[1])
    tokens = torch.randint(0, 32, (1, 16), generator=torch.Generator().manual_seed(0))
    loss, _ = model(tokens, tokens)
    assert loss.isfinite()
    assert fake.named("reduce_from_tensor_model_parallel_region")  # the norm's group statistic


def test_residual_branches_gather_the_sequence_without_summing_twice(sharded):
    fake, engine, wrapper, reference = sharded
    # The local slices chain with consistent shapes, so rank 1's forward runs without collectives; tokens stay
    # inside this rank's vocabulary shard.
    tokens = torch.randint(0, 32, (1, 16), generator=torch.Generator().manual_seed(0))
    loss, _ = wrapper.original_torch_module(tokens, tokens)
    assert loss.isfinite()
    gathers = fake.named("gather_from_sequence_parallel_region")
    assert len(gathers) == 2 * reference.config.num_hidden_layers + 1  # each block's mixer and MLP, the head
    assert all(g.kwargs == {"sequence_dimension": 1, "to_model_parallel": False} for g in gathers)


def test_one_rank_engine_computes_the_models_loss_and_gradients(monkeypatch):
    fake = fake_nxd.install(monkeypatch, tp_rank=0, tp_size=1)
    reference = full_model()
    engine = NxDEngine(Layout(microbatches=2))
    model = engine.build(reference.config, weights=reference.state_dict())
    batches = torch.randint(0, 64, (2, 2, 16), generator=torch.Generator().manual_seed(0))
    losses = engine.train_step(batches)
    expected_lm = expected_aux = 0.0
    for micro in batches:
        out = reference(micro, labels=micro)
        (out.loss / 2).backward()
        expected_lm += float((out.loss - out.aux_loss).detach()) / 2
        expected_aux += float(out.aux_loss.detach()) / 2
    assert abs(float(losses.lm_loss) - expected_lm) < 1e-5
    assert abs(float(losses.aux_loss) - expected_aux) < 1e-6 and expected_aux > 0
    assert fake.named("parallel_cross_entropy")
    grads = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, grads[name].grad, atol=1e-5), name


def test_checkpoint_records_the_layout_and_refuses_another(monkeypatch, tmp_path):
    fake = fake_nxd.install(monkeypatch, tp_rank=0, tp_size=1)
    reference = full_model()
    engine = NxDEngine(Layout())
    engine.parallelize(reference)
    folder = tmp_path / "step_1"
    engine.save(folder)
    (save,) = fake.named("save_checkpoint")
    assert (save.kwargs["checkpoint_dir_str"], save.kwargs["tag"]) == (str(folder), "nxd")
    assert json.loads((folder / "layout.json").read_text())["engine"] == "nxd"
    engine.load(folder)
    assert [c.kwargs["tag"] for c in fake.named("load_checkpoint")] == ["nxd"]
    other = NxDEngine(Layout(tensor_parallel=2))
    other.model = engine.model
    with pytest.raises(LayoutMismatchError, match="parallel.tensor_parallel_size=1"):
        other.load(folder)
    merged = full_model_state(folder)
    assert merged.keys() == reference.state_dict().keys()
    assert all(torch.equal(merged[name], value) for name, value in reference.state_dict().items())
