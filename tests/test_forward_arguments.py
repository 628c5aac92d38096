"""Forward arguments transformers callers pass: honoured, or refused with the reason; never silently ignored."""

from __future__ import annotations

import pytest
import torch

from bmojo import BmojoConfig, BmojoForCausalLM


@pytest.fixture(scope="module")
def model() -> BmojoForCausalLM:
    torch.manual_seed(0)
    config = BmojoConfig(layer_pattern="MB", num_hidden_layers=3, vocab_size=64, hidden_size=32, window_size=8)
    return BmojoForCausalLM(config).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))


def test_running_position_ids_are_accepted_and_change_nothing(model, ids):
    positions = torch.arange(24).expand(2, -1)
    with torch.no_grad():
        plain = model(ids).logits
        given = model(ids, position_ids=positions, cache_position=torch.arange(24)).logits
    torch.testing.assert_close(given, plain, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["position_ids", "cache_position"])
def test_other_positions_are_refused(model, ids, name):
    shifted = torch.arange(24) + 5
    with pytest.raises(ValueError, match=f"{name} must be the running positions 0..23"):
        model(ids, **{name: shifted})


def test_positions_continue_a_cache(model, ids):
    with torch.no_grad():
        cache = model(ids[:, :20], use_cache=True).cache
        model(ids[:, 20:21], cache=cache, position_ids=torch.tensor([[20], [20]]))
        with pytest.raises(ValueError, match="running positions 21..21"):
            model(ids[:, 21:22], cache=cache, position_ids=torch.tensor([[0], [0]]))


def test_hidden_states_are_the_embeddings_and_every_layer_output(model, ids):
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        hidden = out.hidden_states
        assert len(hidden) == model.config.num_hidden_layers + 1
        x = model.model.embed_tokens(ids)
        torch.testing.assert_close(hidden[0], x)
        for index, block in enumerate(model.model.layers):
            x, _ = block(x)
            if index + 1 < len(model.model.layers):
                torch.testing.assert_close(hidden[index + 1], x)
        torch.testing.assert_close(hidden[-1], model.model.norm(x))
        torch.testing.assert_close(model.lm_head(hidden[-1]), out.logits)
    assert model(ids).hidden_states is None


def test_attention_weights_are_refused_with_the_reason(model, ids):
    with pytest.raises(ValueError, match="output_attentions is not supported"):
        model(ids, output_attentions=True)


def test_return_dict_false_gives_a_tuple(model, ids):
    with torch.no_grad():
        as_tuple = model(ids, labels=ids, return_dict=False)
        as_dict = model(ids, labels=ids)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict.logits)


def test_unknown_arguments_are_an_error(model, ids):
    with pytest.raises(TypeError, match="token_type_ids"):
        model(ids, token_type_ids=torch.zeros_like(ids))


def test_generate_still_runs(model, ids):
    out = model.generate(ids[:1, :10], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 14)
