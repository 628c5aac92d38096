"""The NxD engine against the real neuronx-distributed Python source, in NxD's CPU mode (gloo, 2 processes).

The source comes from ``BMOJO_NXD_SOURCE`` (CI: the NxD 0.17 source beside the checkout) or the installed
package; without either these tests skip, and under ``BMOJO_REQUIRE_REFERENCES=1`` they fail. Stand-ins for
the compiled Neuron modules NxD imports are in ``tests/parallel/real_nxd.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent / "parallel"))

import fake_nxd  # noqa: E402
import harness  # noqa: E402
import nxd_scenarios  # noqa: E402
import real_nxd  # noqa: E402

from bmojo import BmojoConfig  # noqa: E402
from bmojo.parallel import Layout  # noqa: E402
from bmojo.parallel.convert import full_model_state  # noqa: E402
from bmojo.parallel.nxd_engine import NxDEngine  # noqa: E402


@pytest.fixture
def nxd():
    real_nxd.require()


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_plan_on_real_nxd_layers_matches_one_process(nxd, sequence_parallel):
    # With SP this fails if the embedding asks NxD for sequence_dimension=1: NxD then returns each rank's
    # partial lookup at full length, unreduced.
    harness.launch(2, nxd_scenarios.matches_one_process, patterns=["B", "MW", "A"], sequence_parallel=sequence_parallel)


def test_nxd_checkpoint_merges_from_the_layout_record(nxd, tmp_path):
    harness.launch(2, nxd_scenarios.save_shards_as_nxd, folder=str(tmp_path), pattern="MW")
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    merged = full_model_state(tmp_path)
    assert merged.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(merged[name], value), name


@pytest.mark.parametrize("tensor_parallel", [2, 4, 8])
def test_layout_coordinates_are_nxds_on_trn1(nxd, monkeypatch, tensor_parallel):
    """Two trn1.32xlarge nodes (64 NeuronCores): every rank's (pp, dp, tp) is where NxD's groups put it."""
    real_nxd.load()
    from neuronx_distributed.parallel_layers import parallel_state

    world, node = 64, 32
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(node))
    groups = parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=2, mesh_only=True
    )
    layout = Layout(world // (2 * tensor_parallel), tensor_parallel, pipeline_parallel=2, microbatches=2)
    for rank in range(world):
        pp, dp, tp = layout.coordinates(rank, trn1_node_size=node)
        assert [group.index(rank) for group in groups.tp_groups if rank in group] == [tp], rank
        assert [group.index(rank) for group in groups.dp_groups if rank in group] == [dp], rank
        assert [group.index(rank) for group in groups.pp_groups if rank in group] == [pp], rank


CONFIG = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    layer_pattern="M",
    ssm_state_size=8,
    ssm_head_dim=8,
    ssm_chunk_size=16,
    tie_word_embeddings=False,
)


@pytest.fixture
def one_process(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_gradients_moved_to_main_grad_are_checked(monkeypatch, one_process):
    """ZeRO-1's fp32 accumulation hooks leave ``grad`` None and the gradient in ``main_grad``."""
    fake_nxd.install(monkeypatch)
    engine = NxDEngine(Layout(zero1=True))
    engine.build(BmojoConfig(**CONFIG))
    losses = engine.train_step(torch.randint(0, 64, (1, 2, 16), generator=torch.Generator().manual_seed(0)))
    params = [p for _, p in engine.named_parameters()]
    for param in params:
        param.main_grad, param.grad = param.grad, None
    assert bool(engine.finite(losses))
    params[0].main_grad.view(-1)[0] = float("nan")
    assert not bool(engine.finite(losses))


def test_zero1_optimizer_clips_at_max_grad_norm(monkeypatch):
    fake = fake_nxd.install(monkeypatch)
    engine = NxDEngine(Layout(zero1=True), max_grad_norm=0.25)
    engine.build(BmojoConfig(**CONFIG))
    optimizer = engine.build_optimizer(torch.optim.SGD, [p for _, p in engine.named_parameters()], lr=0.0)
    (call,) = fake.named("initialize_parallel_optimizer")
    assert call.kwargs["max_norm"] == 0.25
    assert optimizer.zero1_max_norm == 0.25
