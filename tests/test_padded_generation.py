"""``generate`` on a padded batch stops with the reason (tools such as lm-evaluation-harness left-pad prompts of
different lengths); unpadded batches with their all-ones mask decode as without one."""

from __future__ import annotations

import pytest
import torch
from test_model import VOCAB, build, tiny_config

PATTERNS = ["A", "W", "M", "MW", "F", "B"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_generate_refuses_a_left_padded_batch_with_the_reason(pattern):
    model = build(tiny_config(pattern))
    prompts = torch.randint(1, VOCAB, (2, 7))
    left_padded = torch.ones_like(prompts)
    left_padded[1, :3] = 0  # the second prompt is four tokens long
    with pytest.raises(ValueError, match="padded batches are not supported"):
        model.generate(prompts, attention_mask=left_padded, max_new_tokens=3, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_generate_with_an_all_ones_mask_equals_generate_without_one(pattern):
    model = build(tiny_config(pattern))
    prompts = torch.randint(1, VOCAB, (2, 7))
    greedy = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    masked = model.generate(prompts, attention_mask=torch.ones_like(prompts), **greedy)
    assert torch.equal(masked, model.generate(prompts, **greedy))
