"""The XLA path's host-side pieces, which run without torch-xla: environment checks, bf16 casting, batches."""

from __future__ import annotations

import os

import pytest
import torch

from bmojo import BmojoConfig, BmojoForCausalLM
from bmojo.train import DeviceError, train
from bmojo.train import xla as xla_module
from bmojo.train.config import Precision


@pytest.mark.parametrize("variable", xla_module.RETIRED_BF16_VARIABLES)
def test_retired_bf16_variables_are_refused_with_the_replacement(monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    with pytest.raises(DeviceError, match=f"{variable}.*trainer.precision=bf16"):
        xla_module.configure_precision(Precision.fp32)


def test_bf16_turns_on_stochastic_rounding_unless_the_user_chose(monkeypatch):
    name = xla_module.STOCHASTIC_ROUNDING_VARIABLE
    monkeypatch.delenv(name, raising=False)
    xla_module.configure_precision(Precision.fp32)
    assert name not in os.environ
    xla_module.configure_precision(Precision.bf16)
    assert os.environ[name] == "1"
    monkeypatch.setenv(name, "0")
    xla_module.configure_precision(Precision.bf16)
    assert os.environ[name] == "0"


@pytest.mark.parametrize(("value", "trial"), [(None, False), ("", False), ("0", False), ("1", True), ("true", True)])
def test_neuron_parallel_compile_trial_runs_are_recognised(monkeypatch, value, trial):
    monkeypatch.delenv(xla_module.TRIAL_RUN_VARIABLE, raising=False)
    if value is not None:
        monkeypatch.setenv(xla_module.TRIAL_RUN_VARIABLE, value)
    assert xla_module.is_trial_run() is trial


def test_bf16_casts_parameters_but_keeps_ssm_dynamics_norms_and_rope_frequencies_in_fp32_and_tied_weights_tied():
    config = BmojoConfig(
        vocab_size=64, hidden_size=32, layer_pattern="MWFB", num_hidden_layers=4, qk_norm=True, tie_word_embeddings=True
    )
    model = BmojoForCausalLM(config)
    xla_module.cast_parameters_to_bf16(model)
    names = dict(model.named_parameters())
    dynamics = {name for name in names if name.rsplit(".", 1)[-1] in ("A_log", "dt_bias", "D")}
    norms = {name for name in names if name.endswith("norm.weight")}  # residual, q/k and the SSMs' gated norms
    assert len(dynamics) == 3 * 3 and sum(".mixer.ssm." in name for name in dynamics) == 2 * 3  # M, F and B
    assert {name for name, p in names.items() if p.dtype == torch.float32} == dynamics | norms
    assert {p.dtype for name, p in names.items() if name not in dynamics | norms} == {torch.bfloat16}
    assert {b.dtype for b in model.buffers()} == {torch.float32}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # The model trains with these mixed dtypes, each gradient in its parameter's dtype.
    ids = torch.randint(0, 64, (2, 80), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert bool(torch.isfinite(out.loss))
    assert all(p.grad is not None and p.grad.dtype == p.dtype for p in model.parameters())


def test_each_micro_batch_travels_as_its_own_tensor():
    step_blocks = torch.arange(24).view(2, 3, 4)
    micro_batches = xla_module.send_micro_batches(step_blocks, torch.device("cpu"))
    assert len(micro_batches) == 2 and all(torch.equal(m, b) for m, b in zip(micro_batches, step_blocks, strict=True))


def test_several_processes_of_a_single_process_recipe_are_refused(tiny_config, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "32")
    with pytest.raises(ValueError, match="32 processes.*--nproc 1"):
        train(tiny_config("backend=trn1"))
