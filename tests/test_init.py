"""One init rule for the family, measured on the weights it draws (not on the code that draws them)."""

from __future__ import annotations

import math

import pytest
import torch

from bmojo import BmojoConfig, BmojoForCausalLM
from bmojo.model.attention import AttentionMixer
from bmojo.model.mamba2 import Mamba2Mixer

WIDE = dict(vocab_size=512, hidden_size=256, num_hidden_layers=4, ssm_head_dim=32, window_size=16)


def expected_std(name: str, module: torch.nn.Linear, config: BmojoConfig, branches: int) -> float:
    """The std the rule asks of the Linear at ``name``, stated from what the layer is (not from its tag)."""
    if name.endswith(("o_proj", "down_proj", "mixer.out_proj")):
        return config.initializer_range / math.sqrt(branches)
    if name.endswith("ssm.out_proj"):  # the inner SSM of F/B: its output feeds keys and values
        return module.in_features**-0.5
    return config.initializer_range


@pytest.mark.parametrize(
    ("pattern", "fields", "branches_per_layer"),
    [
        ("A", {}, 2),
        ("W", {}, 2),
        ("M", {}, 2),
        ("M", {"intermediate_size": 0}, 1),
        ("MW", {}, 2),
        ("F", {"tie_fading_proj": False}, 2),
        ("B", {"innovation_rank": 32}, 2),
    ],
)
def test_every_linear_has_the_std_of_its_role(pattern, fields, branches_per_layer):
    torch.manual_seed(0)
    config = BmojoConfig(layer_pattern=pattern, **WIDE, **fields)
    model = BmojoForCausalLM(config)
    branches = config.num_hidden_layers * branches_per_layer
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    residual = [n for n in linears if n.endswith(("o_proj", "down_proj", "mixer.out_proj"))]
    assert residual, "no residual output projection found"
    for name, linear in linears.items():
        want = expected_std(name, linear, config, branches)
        got = linear.weight.std().item()
        assert abs(got / want - 1) < 0.1, f"{pattern} {name}: std {got:.5f}, want {want:.5f}"


@pytest.mark.parametrize("hidden_size", [64, 256])
@pytest.mark.parametrize("fields", [{}, {"tie_fading_proj": False}])
def test_fading_keys_and_values_start_at_the_scale_of_the_local_ones(hidden_size, fields):
    torch.manual_seed(0)
    config = BmojoConfig(
        layer_pattern="FB", vocab_size=512, hidden_size=hidden_size, num_hidden_layers=4, window_size=16, **fields
    )
    model = BmojoForCausalLM(config).eval()
    x = model.model.embed_tokens(torch.randint(0, 512, (2, 96)))
    with torch.no_grad():
        for index, block in enumerate(model.model.layers):
            mixer = block.mixer
            assert isinstance(mixer, AttentionMixer) and isinstance(mixer.ssm, Mamba2Mixer)
            h = block.mixer_norm(x)
            s, _ = mixer.ssm(h)
            fading_k = mixer.fading_k_proj or mixer.k_proj
            fading_v = mixer.fading_v_proj or mixer.v_proj
            for local, fading in ((mixer.k_proj(h), fading_k(s)), (mixer.v_proj(h), fading_v(s))):
                ratio = (local.pow(2).mean() / fading.pow(2).mean()).sqrt().item()
                assert 0.5 < ratio < 2, f"layer {index}: local/fading RMS ratio {ratio:.2f}"
            x, _ = block(x)
