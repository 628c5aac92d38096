"""lm-evaluation-harness evaluates an export through its own command line, offline, on local tasks written here.

The harness loads the folder by path (``trust_remote_code=True``), as it would any Hugging Face model; its
per-sample answers must equal what the model computes in this process: the log-likelihood of every choice of a
multiple-choice task and the greedy continuation of a generation task. Without ``lm_eval`` installed (the
``eval`` and ``dev`` extras install it) the test skips, unless ``BMOJO_REQUIRE_REFERENCES=1`` (CI) makes that
a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from optional_packages import require_package
from test_remote_code import export_small_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bmojo.data.tokenizer import byte_tokenizer

CHOICE_DOCS = [
    {"context": "the cat sees a", "choices": [" dog.", " tree.", " river."]},
    {"context": "the dog eats a", "choices": [" fish.", " stone."]},
    {"context": "a big red", "choices": [" house.", " bird.", " cat."]},
]
GENERATION_PROMPTS = ["the cat sees", "a small old"]
MAX_NEW_TOKENS = 6
STOP = "\n"


@torch.no_grad()
def continuation_loglikelihood(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, context: str, continuation: str
) -> float:
    """Sum of log p(continuation token | everything before it), as the harness defines a loglikelihood request."""
    context_length = len(tokenizer(context)["input_ids"])
    ids = torch.tensor([tokenizer(context + continuation)["input_ids"]])  # [1, T]
    log_probs = model(ids).logits[0, :-1].log_softmax(-1)  # [T-1, V]: row t predicts token t+1
    picked = log_probs.gather(-1, ids[0, 1:, None])[:, 0]
    return picked[context_length - 1 :].sum().item()


@torch.no_grad()
def greedy_continuation(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """Up to ``MAX_NEW_TOKENS`` greedy tokens after ``prompt``, decoded and cut at ``STOP``."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    output = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).split(STOP)[0]


def write_task(folder: Path, name: str, docs: list[dict], task_fields: str) -> None:
    """A harness task ``name`` over ``docs`` (a local jsonl file): the dataset lines, then the YAML around them."""
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (folder / f"{name}.yaml").write_text(head + task_fields)


def read_samples(output: Path, task: str) -> list[dict]:
    """The harness's per-sample log (``--log_samples``) of ``task``, in document order."""
    (path,) = output.rglob(f"samples_{task}_*.jsonl")
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda sample: sample["doc_id"])


def test_lm_eval_command_line_scores_an_export_as_the_model_does(tmp_path):
    require_package("lm_eval", "eval")
    folder = tmp_path / "export"
    model = export_small_model(folder)
    tokenizer = byte_tokenizer()

    # The answers are chosen from the model's own scores, so the metrics are known: choice 2/3, generation 1/2.
    scores = [
        [continuation_loglikelihood(model, tokenizer, d["context"], c) for c in d["choices"]] for d in CHOICE_DOCS
    ]
    best = [max(range(len(row)), key=row.__getitem__) for row in scores]
    answers = [best[0], (best[1] + 1) % len(scores[1]), best[2]]
    continuations = [greedy_continuation(model, tokenizer, prompt) for prompt in GENERATION_PROMPTS]
    targets = [continuations[0], continuations[1] + " (never generated)"]

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    choice_docs = [{**doc, "answer": answer} for doc, answer in zip(CHOICE_DOCS, answers, strict=True)]
    choice_fields = 'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
    choice_fields += 'doc_to_target: answer\ntarget_delimiter: ""\nmetric_list:\n  - metric: acc\n'
    write_task(tasks, "bmojo_choice", choice_docs, choice_fields)
    generation_docs = [{"prompt": p, "target": t} for p, t in zip(GENERATION_PROMPTS, targets, strict=True)]
    generation_fields = 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\n'
    generation_fields += f"generation_kwargs:\n  until: [{json.dumps(STOP)}]\n  max_gen_toks: {MAX_NEW_TOKENS}\n"
    generation_fields += "  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
    write_task(tasks, "bmojo_generation", generation_docs, generation_fields)

    output = tmp_path / "results"
    command = [sys.executable, "-m", "lm_eval", "--model", "hf"]
    command += ["--model_args", f"pretrained={folder},trust_remote_code=True", "--device", "cpu", "--batch_size", "2"]
    command += ["--tasks", "bmojo_choice,bmojo_generation", "--include_path", str(tasks)]
    command += ["--output_path", str(output), "--log_samples"]
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        command, cwd=tmp_path, env={**os.environ, **offline}, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]

    for sample, expected in zip(read_samples(output, "bmojo_choice"), scores, strict=True):
        harness_scores = [float(loglikelihood) for ((loglikelihood, _is_greedy),) in sample["resps"]]
        assert harness_scores == pytest.approx(expected, abs=1e-4)
    assert [s["resps"][0][0] for s in read_samples(output, "bmojo_generation")] == continuations
    (results_file,) = output.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    assert results["bmojo_choice"]["acc,none"] == pytest.approx(2 / 3)
    assert results["bmojo_generation"]["exact_match,none"] == pytest.approx(1 / 2)
