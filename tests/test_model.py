"""The model family: parallel == recurrent decoding, causal eidetic selection, aux loss, HF integration."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import bmojo.model.attention as attention_module
from bmojo import BmojoCache, BmojoConfig, BmojoForCausalLM
from bmojo.ops import set_default_backend

VOCAB = 97


def tiny_config(pattern: str, layers: int = 2, **overrides) -> BmojoConfig:
    fields = dict(
        layer_pattern=pattern,
        num_hidden_layers=layers,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        window_size=8,
        memory_size=6,
        memory_topk=2,
        ssm_head_dim=16,
        ssm_state_size=8,
        ssm_num_groups=2,
        ssm_chunk_size=16,
        vocab_size=VOCAB,
    )
    fields.update(overrides)
    return BmojoConfig(**fields)


def build(config: BmojoConfig, seed: int = 0) -> BmojoForCausalLM:
    torch.manual_seed(seed)
    return BmojoForCausalLM(config).eval()


# T = 45 with w = Q_e = 8: five complete memory blocks; k = 2 accepted per block at threshold 0 is 10 entries,
# more than M = 6, so the memory evicts.
SEQ_LEN = 45
CASES = [("A", {}), ("W", {}), ("M", {}), ("F", {}), ("F", {"tie_fading_proj": False, "qk_norm": True})]
CASES += [("B", {"memory_threshold": 0.0}), ("B", {"innovation_rank": 8, "memory_block": 5})]
CASES += [("B", {"memory_threshold": 0.0, "tie_fading_proj": False, "qk_norm": True})]
# Memory keys without positional encoding: un-rotated from the ring when a decoded block joins the memory.
CASES += [("B", {"memory_threshold": 0.0, "memory_rope": False}), ("B", {"memory_rope": False, "memory_block": 5})]
# A memory block longer than the window: the local ring keeps keys the window no longer shows.
CASES += [("B", {"memory_threshold": 0.0, "memory_block": 12, "memory_size": 4})]
CASES += [("MWFBA", {"memory_threshold": 0.0})]


def case_id(pattern: str, overrides: dict) -> str:
    return "-".join([pattern, *(f"{name}={value}" for name, value in overrides.items())])


@pytest.mark.parametrize("pattern,overrides", CASES, ids=[case_id(*case) for case in CASES])
def test_token_by_token_decoding_matches_parallel_forward(pattern, overrides):
    config = tiny_config(pattern, layers=max(2, len(pattern)), **overrides)
    model = build(config)
    ids = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        parallel = model(ids, use_cache=False).logits
        cache, stepwise = None, []
        for t in range(SEQ_LEN):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            stepwise.append(out.logits)
        prefill = model(ids[:, :21], use_cache=True)
        cache, continued = prefill.cache, [prefill.logits]
        for t in range(21, SEQ_LEN):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            continued.append(out.logits)
    assert cache.seen_tokens == SEQ_LEN
    torch.testing.assert_close(torch.cat(stepwise, 1), parallel, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(continued, 1), parallel, atol=1e-4, rtol=0)
    if "B" in pattern and overrides.get("memory_threshold") == 0.0:
        memory = next(s.memory for s in cache.states if getattr(s, "memory", None) is not None)
        assert bool(memory.valid.all()), "the memory should be full, so the test covers eviction"
        assert int(memory.positions.min()) > 0, "the oldest entries should have been evicted"


@pytest.mark.parametrize(
    "pattern,overrides", [("W", {}), ("F", {}), ("B", {"memory_block": 12}), ("MWFBA", {"memory_threshold": 0.0})]
)
@pytest.mark.parametrize("prefill", [3, 12])
def test_decoding_continues_short_prefills_in_steps_and_chunks(pattern, overrides, prefill):
    # Prefills shorter than the window w = 8 and than 2w leave buffer slots empty; chunks of 5 step inside.
    config = tiny_config(pattern, layers=max(2, len(pattern)), **overrides)
    model = build(config)
    ids = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        parallel = model(ids, use_cache=False).logits
        out = model(ids[:, :prefill], use_cache=True)
        pieces, position = [out.logits], prefill
        while position < SEQ_LEN:
            size = 1 if len(pieces) % 2 else 5
            out = model(ids[:, position : position + size], cache=out.cache, use_cache=True)
            pieces.append(out.logits)
            position += size
    torch.testing.assert_close(torch.cat(pieces, 1), parallel, atol=1e-4, rtol=0)


def test_batch_rows_decode_with_their_own_memory():
    # At this threshold rows accept different numbers of candidates, so their memories differ in size too.
    config = tiny_config("B", layers=2, memory_threshold=1.05, memory_block=5, memory_size=10)
    model = build(config)
    ids = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        parallel = model(ids, use_cache=False).logits
        out = model(ids[:, :13], use_cache=True)
        pieces = [out.logits]
        for t in range(13, SEQ_LEN):
            out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True)
            pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, 1), parallel, atol=1e-4, rtol=0)
    counts = [state.memory.valid.sum(-1).tolist() for state in out.cache.states]
    assert any(row_a != row_b for row_a, row_b in counts), counts


def test_recurrent_state_size_is_constant_for_windowed_letters():
    model = build(tiny_config("MWFB", layers=4, memory_threshold=0.0))
    ids = torch.randint(0, VOCAB, (1, 60))

    def state_numel(cache: BmojoCache) -> int:
        total = 0
        for state in cache.states:
            for value in vars(state).values():
                tensors = vars(value).values() if hasattr(value, "__dataclass_fields__") else [value]
                total += sum(t.numel() for t in tensors if isinstance(t, torch.Tensor))
        return total

    with torch.no_grad():
        cache = model(ids[:, :24], use_cache=True).cache
        # Compare at the same phase of the memory block, so the unfinished block holds as many tokens.
        for t in range(24, 40):
            cache = model(ids[:, t : t + 1], cache=cache, use_cache=True).cache
        early = state_numel(cache)
        for t in range(40, 56):
            cache = model(ids[:, t : t + 1], cache=cache, use_cache=True).cache
    assert state_numel(cache) == early


def captured_memory(model: BmojoForCausalLM, ids: torch.Tensor, monkeypatch) -> dict:
    """Run a forward pass and return the memory arguments the B layer handed to the attention op."""
    seen = {}
    original = attention_module.bmojo_attention

    def recording(q, k, v, **kwargs):
        seen.update({name: kwargs[name] for name in ("mem_k", "mem_v", "mem_pos", "mem_valid")})
        return original(q, k, v, **kwargs)

    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(attention_module, "bmojo_attention", recording)
        model(ids, use_cache=False)
    return seen


def test_eidetic_selection_is_causal(monkeypatch):
    config = tiny_config("B", layers=1, memory_threshold=0.0)
    model = build(config)
    ids = torch.randint(0, VOCAB, (1, 48), generator=torch.Generator().manual_seed(3))
    block = config.memory_block
    for last_kept_block in (1, 3):
        changed = ids.clone()
        cut = (last_kept_block + 1) * block
        changed[:, cut:] = (changed[:, cut:] + 1 + torch.arange(48 - cut)) % VOCAB
        before = captured_memory(model, ids, monkeypatch)
        after = captured_memory(model, changed, monkeypatch)
        rows = slice(0, last_kept_block + 1)
        for name, value in before.items():
            assert torch.equal(value[:, rows], after[name][:, rows]), name
        # The change must be visible to later blocks, else the test would prove nothing.
        assert any(not torch.equal(value, after[name]) for name, value in before.items())


FADING_QUERY_PARTS = ("fading_q_proj", "fading_q_norm", "fading_k_proj", "fading_k_norm", "fading_v_proj")


@pytest.mark.parametrize("pattern", ["F", "B"])
def test_untied_fading_projections_own_a_query_and_qk_norms_that_learn(pattern):
    # As the B'MOJO-F release unties them: the fading keys' query, key and value projections and both QK-norms.
    tied = build(tiny_config(pattern, qk_norm=True)).model.layers[0].mixer
    assert all(getattr(tied, name) is None for name in FADING_QUERY_PARTS)
    model = build(tiny_config(pattern, qk_norm=True, tie_fading_proj=False)).train()
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(5))  # T = 5w: fading keys seen
    model(ids, labels=ids).loss.backward()
    for index, block in enumerate(model.model.layers):
        mixer = block.mixer
        own = {name: getattr(mixer, name).weight for name in FADING_QUERY_PARTS}
        shared = [mixer.q_proj.weight, mixer.k_proj.weight, mixer.v_proj.weight, mixer.q_norm.weight]
        shared.append(mixer.k_norm.weight)
        for name, weight in own.items():
            assert all(weight.data_ptr() != other.data_ptr() for other in shared), f"layer {index}: {name} is shared"
            assert weight.grad is not None and bool(weight.grad.abs().sum() > 0), f"layer {index}: {name} no gradient"


def test_fading_query_scores_the_fading_keys_and_only_them():
    # Untied projections holding the tied ones' weights are the tied model; a different fading query then
    # changes exactly the outputs of positions t >= w, the ones with fading keys in view.
    tied = build(tiny_config("F", qk_norm=True))
    with torch.no_grad():
        for block in tied.model.layers:
            for norm in (block.mixer.q_norm, block.mixer.k_norm):
                norm.weight.uniform_(0.5, 1.5)
    untied = BmojoForCausalLM(tiny_config("F", qk_norm=True, tie_fading_proj=False)).eval()
    loaded = untied.load_state_dict(tied.state_dict(), strict=False)
    assert not loaded.unexpected_keys and all(".fading_" in name for name in loaded.missing_keys)
    with torch.no_grad():
        for block in untied.model.layers:
            mixer = block.mixer
            for name in FADING_QUERY_PARTS:
                getattr(mixer, name).weight.copy_(getattr(mixer, name.removeprefix("fading_")).weight)
    ids = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = tied(ids).logits
        torch.testing.assert_close(untied(ids).logits, expected, rtol=1e-5, atol=1e-5)
        untied.model.layers[0].mixer.fading_q_proj.weight.mul_(-2.0)
        changed = untied(ids).logits
    window = untied.config.window_size
    torch.testing.assert_close(changed[:, :window], expected[:, :window], rtol=1e-5, atol=1e-5)
    assert bool(((changed[:, window:] - expected[:, window:]).abs().amax(-1) > 1e-3).all())


@pytest.mark.parametrize("memory_rope", [True, False])
def test_memory_keys_without_rope_do_not_depend_on_the_position(memory_rope, monkeypatch):
    # One layer reading one repeated token: every position has the same key before RoPE, which is the key RoPE
    # leaves at position 0. Without RoPE every memory entry holds exactly that key (so it scores the same against
    # a query wherever the token sat), and the memory is scored with the query before RoPE, likewise the query of
    # position 0 at every position (so the score does not depend on where the query sits either); with RoPE the
    # entries differ by position and the rotated query scores them.
    model = build(tiny_config("B", layers=1, memory_threshold=0.0, memory_rope=memory_rope))
    seen = {}
    original = attention_module.bmojo_attention

    def recording(q, k, v, **kwargs):
        seen.update(q=q, k=k, mem_q=kwargs.get("mem_q"), mem_k=kwargs["mem_k"])
        seen.update(mem_pos=kwargs["mem_pos"], mem_valid=kwargs["mem_valid"])
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(attention_module, "bmojo_attention", recording)
    with torch.no_grad():
        model(torch.full((1, 48), 5), use_cache=False)
    valid = seen["mem_valid"]
    entries, positions = seen["mem_k"][valid], seen["mem_pos"][valid]  # [N, Hkv, Dh], [N]
    assert positions.unique().numel() > 3, "the memory should hold the token at several positions"
    unrotated = seen["k"][0, 0].expand_as(entries)
    if memory_rope:
        torch.testing.assert_close(entries, seen["k"][0, positions])
        assert not torch.allclose(entries[positions > 0], unrotated[positions > 0], atol=1e-3)
        assert seen["mem_q"] is None
    else:
        torch.testing.assert_close(entries, unrotated, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(seen["mem_q"], seen["q"][:, :1].expand_as(seen["q"]), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(seen["q"][:, 1:], seen["q"][:, :1].expand_as(seen["q"][:, 1:]), atol=1e-3)


def test_aux_loss_trains_only_the_predictor():
    model = build(tiny_config("B", layers=2)).train()
    ids = torch.randint(0, VOCAB, (2, 40))
    out = model(ids, labels=ids)
    assert out.aux_loss.item() > 0
    out.aux_loss.backward(retain_graph=True)
    for name, param in model.named_parameters():
        touched = param.grad is not None and bool(param.grad.abs().sum() > 0)
        assert touched == (".predictor." in name), name
    model.zero_grad(set_to_none=True)
    (out.loss - out.aux_loss).backward()
    for name, param in model.named_parameters():
        if ".predictor." in name:
            assert param.grad is None or bool((param.grad == 0).all()), name


def test_loss_ignores_minus_100_and_matches_manual_cross_entropy():
    model = build(tiny_config("W"))
    ids = torch.randint(0, VOCAB, (2, 20))
    labels = ids.clone()
    labels[:, :7] = -100
    out = model(ids, labels=labels)
    manual = torch.nn.functional.cross_entropy(out.logits[:, 6:-1].reshape(-1, VOCAB), ids[:, 7:].reshape(-1))
    torch.testing.assert_close(out.loss - out.aux_loss, manual)


def test_save_and_load_round_trip_gives_identical_logits(tmp_path):
    model = build(tiny_config("MWFB", layers=4, tie_fading_proj=False))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is BmojoForCausalLM
    ids = torch.randint(0, VOCAB, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_tied_word_embeddings_share_storage(tmp_path):
    model = build(tiny_config("W", tie_word_embeddings=True))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam_search"])
@pytest.mark.parametrize("pattern", ["B", "MWFBA"])
def test_generate_with_and_without_cache_agree(pattern, num_beams):
    # Beam search reorders the cache's rows every step (BmojoCache.reorder_cache); 30 new tokens cross
    # several memory blocks, with eviction.
    model = build(tiny_config(pattern, layers=max(2, len(pattern)), memory_threshold=0.0))
    prompt = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=30, do_sample=False, pad_token_id=0, num_beams=num_beams)
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without_cache = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 41)
    assert torch.equal(with_cache, without_cache)


def test_selecting_and_repeating_cache_rows_continues_those_sequences():
    model = build(tiny_config("MWFBA", layers=5, memory_threshold=0.0))
    ids = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = model(ids[:, :20], use_cache=True).cache
        cache.batch_repeat_interleave(2)  # rows: 0, 0, 1, 1
        cache.batch_select_indices(torch.tensor([3, 0]))  # rows: 1, 0
        stepwise = [model(ids[[1, 0], t : t + 1], cache=cache, use_cache=True).logits for t in range(20, 30)]
        expected = model(ids[[1, 0]], use_cache=False).logits[:, 20:]
    torch.testing.assert_close(torch.cat(stepwise, dim=1), expected, rtol=1e-4, atol=1e-4)


def test_auto_config_builds_a_small_valid_model():
    config = AutoConfig.for_model("bmojo", layer_pattern="B")
    assert isinstance(config, BmojoConfig)
    model = AutoModelForCausalLM.from_config(config)
    out = model(torch.randint(0, config.vocab_size, (1, 70)), labels=torch.randint(0, config.vocab_size, (1, 70)))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"layer_pattern": "BX"}, "layer_pattern"),
        ({"layer_pattern": ""}, "layer_pattern"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"ssm_head_dim": 48}, "ssm_head_dim"),
        ({"ssm_num_groups": 3}, "ssm_num_groups"),
        ({"memory_topk": 9}, "memory_topk"),
        ({"memory_size": 0}, "memory_size"),
        ({"window_size": 0}, "window_size"),
        ({"innovation_rank": 1000}, "innovation_rank"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"BmojoConfig.{field}"):
        tiny_config("B", **overrides)


def assert_backends_agree_on_loss_and_gradients(model: BmojoForCausalLM, ids: torch.Tensor) -> None:
    """The training loss of ``ids`` [B, T] and every parameter's gradient, naive kernels against torch's."""
    results = {}
    for backend in ("naive", "torch"):
        set_default_backend(backend)
        try:
            model.zero_grad(set_to_none=True)
            out = model(ids, labels=ids)
            out.loss.backward()
            results[backend] = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
        finally:
            set_default_backend("auto")
    torch.testing.assert_close(results["torch"][0], results["naive"][0], atol=1e-5, rtol=1e-5)
    for name, grad in results["naive"][1].items():
        torch.testing.assert_close(results["torch"][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_model_gradients_agree_between_naive_and_torch_kernels():
    model = build(tiny_config("MWFB", layers=4, memory_threshold=0.0)).train()
    assert_backends_agree_on_loss_and_gradients(model, torch.randint(0, VOCAB, (2, 37)))


def test_generate_computes_only_the_last_positions_logits_and_refuses_hidden_states_it_cannot_give():
    model = build(tiny_config("MB"))
    prompts = torch.randint(1, VOCAB, (2, 9))
    shapes = []
    model.lm_head.register_forward_hook(lambda module, inputs, output: shapes.append(tuple(output.shape)))
    model.generate(prompts, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert shapes == [(2, 1, VOCAB)] * 2  # the prefill too: no [B, T, V] for a long prompt
    with pytest.raises(ValueError, match="output_hidden_states works in the parallel forward"):
        model.generate(prompts, max_new_tokens=2, do_sample=False, pad_token_id=0, output_hidden_states=True)
