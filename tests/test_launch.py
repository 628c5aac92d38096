"""The trn1 launchers (launch/), the Dockerfile and the pinned Neuron versions: commands, lints, agreement."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
RECIPE = "pretrain_370m_trn1"
NODE0 = (
    "torchrun --nproc_per_node 32 --nnodes {nodes} --node_rank 0 --master_addr {master} --master_port 41000 "
    "--module bmojo.cli.train experiment=pretrain_370m_trn1 hydra.run.dir={run_dir} data.hub_name=my/corpus"
)


def tool(name: str) -> str:
    """A lint installed by the dev extra, beside this interpreter or on PATH."""
    found = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail(f"{name} is not installed; install the dev extra: pip install -e '.[dev]'")
    return found


def launcher(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NEURON_", "FI_", "PJRT_", "XLA_"))}
    return subprocess.run(
        [str(LAUNCH / script), *args], capture_output=True, text=True, env={**clean, **(env or {})}, timeout=60
    )


def test_launch_scripts_pass_shellcheck():
    scripts = sorted(str(path) for path in LAUNCH.glob("*.sh"))
    result = subprocess.run([tool("shellcheck"), "-x", *scripts], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout


def test_dockerfile_passes_hadolint():
    result = subprocess.run([tool("hadolint"), "Dockerfile"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout


def test_single_node_dry_run_prints_the_neuron_environment_and_a_32_process_torchrun():
    result = launcher("torchrun.sh", "--dry-run", RECIPE, "data.hub_name=my/corpus")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == NODE0.format(nodes=1, master="localhost", run_dir=f"runs/{RECIPE}")
    assert "export NEURON_RT_STOCHASTIC_ROUNDING_EN=1" in lines
    assert "export PJRT_DEVICE=NEURON" in lines
    assert not any(line.startswith("export FI_") for line in lines)  # EFA only across nodes


def test_slurm_dry_run_prints_one_srun_task_per_node_running_torchrun_with_efa(tmp_path):
    fake_scontrol = tmp_path / "scontrol"
    fake_scontrol.write_text('#!/bin/sh\n[ "$*" = "show hostnames trn1-[7-10]" ] && printf "trn1-7\\ntrn1-8\\n"\n')
    fake_scontrol.chmod(0o755)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_NUM_NODES": "4", "SLURM_JOB_NODELIST": "trn1-[7-10]"}
    result = launcher("slurm.sh", "--dry-run", RECIPE, "data.hub_name=my/corpus", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == (
        f"srun --nodes=4 --ntasks-per-node=1 --kill-on-bad-exit=1 {LAUNCH}/torchrun.sh --nnodes 4 "
        f"--master-addr trn1-7 {RECIPE} data.hub_name=my/corpus"
    )
    node0 = [line.removeprefix("#   ") for line in lines[:-1]]
    assert NODE0.format(nodes=4, master="trn1-7", run_dir=f"runs/{RECIPE}") in node0
    assert {"export FI_PROVIDER=efa", "export FI_EFA_USE_DEVICE_RDMA=1"} <= set(node0)


def test_precompile_dry_run_wraps_a_short_trial_in_neuron_parallel_compile():
    result = launcher("precompile.sh", "--dry-run", "--precompile-steps", "3", RECIPE, "data.hub_name=my/corpus")
    assert result.returncode == 0, result.stderr
    node0 = NODE0.format(nodes=1, master="localhost", run_dir=f"runs/{RECIPE}.precompile")
    assert result.stdout.splitlines()[-1] == f"neuron_parallel_compile {node0} trainer.steps_this_run=3"
    assert re.search(r"^export NEURON_COMPILE_CACHE_URL=\S+/runs/neuron-cache$", result.stdout, re.M)


def test_a_real_launch_runs_the_printed_command_from_the_checkout_with_its_environment(tmp_path):
    fake_torchrun = tmp_path / "torchrun"
    fake_torchrun.write_text('#!/bin/sh\n{ pwd; echo "$NEURON_RT_STOCHASTIC_ROUNDING_EN"; echo "$*"; } > "$OUT"\n')
    fake_torchrun.chmod(0o755)
    out = tmp_path / "called"
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "OUT": str(out), "NEURON_RT_STOCHASTIC_ROUNDING_EN": "0"}
    result = launcher("torchrun.sh", RECIPE, "data.hub_name=my/corpus", env=env)
    assert result.returncode == 0, result.stderr
    cwd, rounding, arguments = out.read_text().splitlines()
    assert Path(cwd) == ROOT
    assert rounding == "0"  # a variable set by the user wins over launch/env/neuron.env
    expected = NODE0.format(nodes=1, master="localhost", run_dir=f"runs/{RECIPE}")
    assert f"torchrun {arguments}" == expected
    assert result.stderr.strip() == f"+ {expected}"


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("torchrun.sh", ["--dry-run", "pretrain_371m_trn1"], "no recipe 'pretrain_371m_trn1'.*pretrain_370m_trn1"),
        ("torchrun.sh", ["--dry-run"], "name a recipe"),
        ("torchrun.sh", ["--dry-run", "--nproc", "many", RECIPE], "--nproc must be a whole number"),
        ("torchrun.sh", ["--dry-run", "--nnodes", "2", "--node-rank", "2", RECIPE], r"--node-rank must be in \[0, 2\)"),
        ("torchrun.sh", ["--dry-run", "--gpus", "8", RECIPE], "unknown option --gpus"),
        ("slurm.sh", ["--dry-run", RECIPE], "sbatch --nodes N"),
        ("slurm.sh", ["--dry-run", "--nodes", "2", RECIPE], "--master-addr"),
    ],
)
def test_launchers_reject_bad_input_with_a_message_naming_the_fix(script, args, message):
    result = launcher(script, *args)
    assert result.returncode == 2
    assert re.search(message, result.stderr), result.stderr


def test_neuron_versions_agree_across_pyproject_dockerfile_and_the_xla_lane():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    neuron = dict(requirement.split("==") for requirement in project["optional-dependencies"]["neuron"])
    assert set(neuron) == {"torch", "torch-neuronx", "neuronx-cc", "neuronx-distributed", "nki"}
    assert neuron["torch-neuronx"].startswith(f"{neuron['torch']}.")  # torch-neuronx 2.9.0.x builds on torch 2.9.0
    assert neuron["neuronx-distributed"].startswith("0.17.")  # NxD 0.17 ships with SDK 2.28
    image = re.search(r"^FROM (\S+)$", (ROOT / "Dockerfile").read_text(), re.M).group(1)
    assert image.endswith(f":{neuron['torch']}-neuronx-py312-sdk2.28.0-ubuntu24.04")

    lane = dict(
        line.split("==") for line in (ROOT / "requirements" / "xla.txt").read_text().splitlines() if "==" in line
    )
    assert lane["torch"] == lane["torch-xla"] == neuron["torch"]
    for requirement in project["dependencies"]:  # the lane installs bmojo with --no-deps: it pins them all
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
        assert name in lane, f"requirements/xla.txt lacks {name}, a dependency in pyproject.toml"
