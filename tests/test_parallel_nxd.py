"""The NxD engine on the real neuronx-distributed in its CPU mode (gloo, 2 processes): the plan's modules as NxD's
layers, and the engine's step and checkpoints with NxD's trainer API stood in by ``tests/parallel/fake_nxd.py``
(it needs torch-xla; the XLA lane, ``tests/test_xla_nxd.py``, runs the real one)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "parallel"))

import harness  # noqa: E402
import nxd_scenarios  # noqa: E402
import real_nxd  # noqa: E402

from bmojo.parallel import Layout  # noqa: E402
from bmojo.parallel.nxd_engine import INSTALL_HINT, NxDEngine  # noqa: E402


@pytest.fixture
def nxd():
    real_nxd.require()


def test_engine_without_neuronx_distributed_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "neuronx_distributed", None)
    with pytest.raises(ImportError, match="backend.engine=torch") as error:
        NxDEngine(Layout())
    assert str(error.value) == INSTALL_HINT


@pytest.mark.parametrize("ssm_num_groups", [2, 1], ids=["groups_per_rank", "groups_shared"])
def test_exactly_the_plans_modules_become_nxd_layers_holding_this_ranks_slices(nxd, ssm_num_groups):
    harness.launch(2, nxd_scenarios.plan_modules_become_nxd_layers, pattern="BM", ssm_num_groups=ssm_num_groups)


def test_fewer_ssm_groups_than_ranks_match_one_process(nxd):
    # Each rank keeps the one B/C group whole and sums its partial gradient over the ranks that read it.
    harness.launch(2, nxd_scenarios.matches_one_process, patterns=["BM"], sequence_parallel=True, ssm_num_groups=1)


def test_engine_steps_and_checkpoints_as_one_process(nxd, tmp_path):
    harness.launch(2, nxd_scenarios.engine_step_and_checkpoint, folder=str(tmp_path))
