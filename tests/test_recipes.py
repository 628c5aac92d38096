"""Recipes: every option composes, the schema rejects typos, sizes line up across the family."""

from __future__ import annotations

import inspect
from dataclasses import fields

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

from bmojo import BmojoConfig
from bmojo.data import byte_tokenizer
from bmojo.ops.registry import default_backend
from bmojo.parallel.setup import layout_from_config
from bmojo.train import DeviceError, build_model, recipes_dir, train
from bmojo.train.config import ModelConfig

FAMILY = ["A", "W", "M", "MW", "F", "B"]
SIZES = {"130m": 130e6, "370m": 370e6, "790m": 790e6, "1.4b": 1.4e9}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (recipes_dir() / group).glob("*.yaml") if not p.stem.startswith("_"))


def test_model_schema_matches_bmojo_config():
    accepted = set(inspect.signature(BmojoConfig.__init__).parameters)
    extra = {f.name for f in fields(ModelConfig)} - accepted
    assert extra == {"pad_vocab_multiple"}  # consumed by the trainer, not the model


def test_every_family_member_exists_at_every_size():
    members = [*FAMILY, "M2"]  # M2: the published Mamba-2 (no MLP, its own layer counts)
    assert set(options("model")) == {f"{member}_{size}" for member in members for size in [*SIZES, "tiny"]}


def meta_model(compose_recipe, overrides: list[str], vocab_size: int = 50304):
    config = OmegaConf.to_object(compose_recipe([*overrides, f"model.vocab_size={vocab_size}"]))
    with torch.device("meta"):
        return build_model(config.model, byte_tokenizer())


@pytest.mark.parametrize("size", list(SIZES))
def test_family_members_of_one_size_have_comparable_language_model_parameter_counts(compose_recipe, size):
    for member in FAMILY:
        model = meta_model(compose_recipe, [f"model={member}_{size}"])
        language_model, auxiliary = model.parameter_counts()
        assert abs(language_model / SIZES[size] - 1) < 0.03, f"{member}_{size}: {language_model:,} parameters"
        assert model.config.window_size == 512 and set(model.config.layer_pattern) == set(member)
        # Only B has parameters that only the auxiliary loss trains: its low-rank innovation predictor.
        assert (auxiliary > 0) == (member == "B")
        if member == "B":
            rank = model.config.innovation_rank
            config = model.config
            assert rank is not None and auxiliary == 2 * rank * config.hidden_size * config.num_hidden_layers


@pytest.mark.parametrize("suite", ["mqar", "extrapolation"])
def test_small_comparison_presets_match_language_model_parameters(compose_recipe, suite):
    counts = {}
    for member in FAMILY:
        # A small vocabulary (the byte tokenizer's), so the embeddings do not hide the layers' differences.
        model = meta_model(compose_recipe, [f"experiment={suite}_{member}"], vocab_size=320)
        counts[member] = model.parameter_counts()[0]
    low, high = min(counts.values()), max(counts.values())
    assert high / low - 1 < 0.02, counts


@pytest.mark.parametrize(
    ("size", "layers", "hidden"), [("130m", 24, 768), ("370m", 48, 1024), ("790m", 48, 1536), ("1.4b", 48, 2048)]
)
def test_m2_presets_are_the_published_mamba2_layouts(compose_recipe, size, layers, hidden):
    model = meta_model(compose_recipe, [f"model=M2_{size}"])
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (layers, hidden)
    assert all(block.mlp is None for block in model.model.layers)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings
    language_model, _ = model.parameter_counts()
    assert abs(language_model / SIZES[size] - 1) < 0.05, f"M2_{size}: {language_model:,} parameters"


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_preset_composes(compose_recipe, experiment):
    config = compose_recipe([f"experiment={experiment}"])
    assert config.name == experiment
    assert OmegaConf.to_yaml(config)


def test_presets_that_need_user_input_say_which_key(compose_recipe):
    with pytest.raises(InterpolationResolutionError, match="needs trainer.init_from=... on the command line"):
        OmegaConf.to_object(compose_recipe(["experiment=finetune_custom", "data.paths=[x.jsonl]"]))
    with pytest.raises(InterpolationResolutionError, match="needs data.paths=..."):
        OmegaConf.to_object(compose_recipe(["experiment=finetune_custom", "trainer.init_from=x"]))
    trn1 = compose_recipe(["experiment=pretrain_1.4b_trn1"])
    assert trn1.backend.device.value == "xla" and trn1.model.hidden_size == 2048 and trn1.data.seq_len == 2048


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_stpes=3", "Could not override 'trainer.max_stpes'"),
        ("trainer.max_steps=many", "Error merging override trainer.max_steps=many"),
        ("trainer.precision=fp8", "Error merging override trainer.precision=fp8"),
        ("model=B_huge", "Could not find 'model/B_huge'"),
    ],
)
def test_typos_and_wrong_types_fail_at_composition(compose_recipe, override, message):
    with pytest.raises(ConfigCompositionException, match=message):
        compose_recipe([override])


def test_trn1_backend_fails_clearly_without_the_neuron_stack(tiny_config):
    before = default_backend()
    with pytest.raises(DeviceError, match="torch-xla"):
        train(tiny_config("backend=trn1"))
    assert default_backend() == before  # the failed start-up left the process-wide kernel backend alone


@pytest.mark.parametrize("preset", options("parallel"))
def test_every_parallel_preset_composes_into_a_layout(compose_recipe, preset):
    parallel = OmegaConf.to_object(compose_recipe([f"parallel={preset}"])).parallel
    world_size = parallel.tensor_parallel_size * parallel.pipeline_parallel_size * (parallel.data_parallel_size or 2)
    layout = layout_from_config(parallel, microbatches=2, world_size=world_size)
    assert layout.world_size == world_size and layout.sequence_parallel == parallel.sequence_parallel


@pytest.mark.parametrize("size", SIZES)
def test_trn1_pretraining_presets_take_256_sequences_a_step_on_one_node(compose_recipe, size):
    config = compose_recipe([f"experiment=pretrain_{size}_trn1"])
    trainer = config.trainer
    layout = layout_from_config(config.parallel, trainer.grad_accum_steps, world_size=32)  # one trn1.32xlarge
    assert layout.data_parallel * trainer.micro_batch_size * trainer.grad_accum_steps == 256
    assert config.backend.engine.value == "nxd"
