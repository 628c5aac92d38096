"""The NxD engine against the real neuronx-distributed Python source, in NxD's CPU mode (gloo, 2 processes).

The source comes from ``BMOJO_NXD_SOURCE`` (CI: the NxD 0.17 source beside the checkout) or the installed
package; without either these tests skip, and under ``BMOJO_REQUIRE_REFERENCES=1`` they fail. Stand-ins for
the compiled Neuron modules NxD imports are in ``tests/parallel/real_nxd.py``. What needs an XLA device (NxD's
trainer API, ZeRO-1, checkpoints, the pipeline tracer) runs in the XLA lane, ``tests/test_xla_nxd.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent / "parallel"))

import harness  # noqa: E402
import nxd_scenarios  # noqa: E402
import real_nxd  # noqa: E402

from bmojo.parallel import Layout  # noqa: E402
from bmojo.parallel.convert import full_model_state  # noqa: E402


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
