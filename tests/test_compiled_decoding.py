"""Compiled decoding (``compile_decoding``): the logits of eager decoding, from one graph per token that
compiles a few variants early and then no more."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from test_model import VOCAB, build, tiny_config
from torch._dynamo.backends.registry import lookup_backend

# Past the first RoPE block (64 positions) and several memory blocks (8), from a prefill shorter than the
# window (8), so the fading band and the memory fill while decoding.
PREFILL, FIRST, SECOND = 3, 70, 70


def counting(backend: str):
    """A ``torch.compile`` backend that compiles with ``backend`` and records every graph it is given."""
    graphs = []

    def compile_graph(graph_module, example_inputs):
        graphs.append(graph_module)
        return lookup_backend(backend)(graph_module, example_inputs)

    return compile_graph, graphs


def decode(model, ids: torch.Tensor, cache=None, start: int = PREFILL) -> tuple[torch.Tensor, object]:
    """Logits of ids[:, start:] decoded one token at a time (after a prefill of ids[:, :start] if no cache)."""
    with torch.no_grad():
        if cache is None:
            cache = model(ids[:, :start], use_cache=True).cache
        logits = [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(start, ids.shape[1])]
    return torch.cat(logits, dim=1), cache


def compiled_twin(config, backend: str):
    """The model ``build(config)`` gives, compiled for decoding with a counting ``backend``."""
    model = build(config)
    compile_graph, graphs = counting(backend)
    model.compile_decoding(backend=compile_graph)
    return model, graphs


@pytest.mark.parametrize("pattern", ["A", "W", "M", "F", "B", "MWFBA"])
def test_compiled_decoding_matches_eager_and_stops_compiling(pattern):
    config = tiny_config(pattern, layers=max(2, len(pattern)), memory_threshold=0.0)
    ids = torch.randint(0, VOCAB, (2, PREFILL + FIRST + SECOND), generator=torch.Generator().manual_seed(5))
    eager, _ = decode(build(config), ids)
    model, graphs = compiled_twin(config, "aot_eager")
    first, cache = decode(model, ids[:, : PREFILL + FIRST])
    compiled_early = len(graphs)
    second, _ = decode(model, ids, cache, start=PREFILL + FIRST)
    torch.testing.assert_close(torch.cat([first, second], dim=1), eager, atol=1e-5, rtol=1e-5)
    assert 1 <= compiled_early <= 3, f"{compiled_early} graphs for {FIRST} tokens"
    assert len(graphs) == compiled_early, "decoding kept compiling after the first RoPE block"


@pytest.mark.slow
def test_inductor_compiled_decoding_matches_eager():
    # The backend compile_decoding uses by default: fused kernels, buffers written in place.
    config = tiny_config("MWFBA", layers=5, memory_threshold=0.0)
    ids = torch.randint(0, VOCAB, (2, PREFILL + FIRST), generator=torch.Generator().manual_seed(6))
    eager, eager_cache = decode(build(config), ids)
    model, graphs = compiled_twin(config, "inductor")
    # Graphs cached on disk by other versions of this code carry guards of their own: compile afresh.
    with torch._inductor.config.patch(fx_graph_cache=False):
        compiled, cache = decode(model, ids)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    assert 1 <= len(graphs) <= 3
    for state, eager_state in zip(cache.states, eager_cache.states, strict=True):
        if hasattr(state, "keys"):
            torch.testing.assert_close(state.keys, eager_state.keys, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(state.values, eager_state.values, atol=1e-4, rtol=1e-4)


def test_beam_search_with_compiled_decoding_gives_the_eager_tokens():
    # Beam search reorders the cache's rows every step (and runs 2 x 3 rows, a batch size of its own).
    config = tiny_config("MWFBA", layers=5, memory_threshold=0.0)
    prompt = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(7))
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, num_beams=3)
    expected = build(config).generate(prompt, **kwargs)
    model, graphs = compiled_twin(config, "aot_eager")
    assert torch.equal(model.generate(prompt, **kwargs), expected)
    assert graphs, "generate did not decode through the compiled step"


def test_a_copy_decodes_eagerly_until_compiled_and_then_with_its_own_weights():
    config = tiny_config("FB", memory_threshold=0.0)
    model, _ = compiled_twin(config, "aot_eager")
    twin = copy.deepcopy(model)
    assert twin.model._compiled_token_step is None
    with torch.no_grad():
        for parameter in twin.parameters():
            parameter.mul_(1.5)
    ids = torch.randint(0, VOCAB, (1, PREFILL + 12), generator=torch.Generator().manual_seed(8))
    copied_eager, _ = decode(twin, ids)
    compile_graph, graphs = counting("aot_eager")
    twin.compile_decoding(backend=compile_graph)
    copied, _ = decode(twin, ids)
    assert graphs
    torch.testing.assert_close(copied, copied_eager, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(copied, decode(model, ids)[0], atol=1e-3)


def test_chunks_after_a_prefill_decode_alike_compiled_and_eager():
    config = tiny_config("MWFBA", layers=5, memory_threshold=0.0)
    ids = torch.randint(0, VOCAB, (2, 60), generator=torch.Generator().manual_seed(10))
    model, graphs = compiled_twin(config, "aot_eager")
    logits = {}
    for name, decoder in (("eager", build(config)), ("compiled", model)):
        with torch.no_grad():
            out = decoder(ids[:, :PREFILL], use_cache=True)
            pieces, position = [out.logits], PREFILL
            for size in (1, 5, 2, 7, 3, 9, 30):
                out = decoder(ids[:, position : position + size], cache=out.cache, use_cache=True)
                pieces.append(out.logits)
                position += size
        logits[name] = torch.cat(pieces, dim=1)
    torch.testing.assert_close(logits["compiled"], logits["eager"], atol=1e-5, rtol=1e-5)
    assert graphs


def test_a_pickled_compiled_model_decodes_eagerly():
    model, _ = compiled_twin(tiny_config("FB", memory_threshold=0.0), "aot_eager")
    restored = pickle.loads(pickle.dumps(model))
    assert restored.model._compiled_token_step is None
    ids = torch.randint(0, VOCAB, (1, PREFILL + 6), generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(decode(restored, ids)[0], decode(model, ids)[0], atol=1e-5, rtol=1e-5)
