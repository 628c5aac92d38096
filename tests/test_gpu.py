"""The CUDA path: the ``torch`` kernels on a GPU against the naive references on the CPU, and the whole model
(training step, token-by-token decoding) on a GPU against itself on the CPU. Skipped without a CUDA device."""

from __future__ import annotations

import pytest
import test_attention_op as attention_cases
import test_ssm_scan as scan_cases
import torch
from test_compiled_decoding import PREFILL, decode
from test_model import SEQ_LEN, VOCAB, build, tiny_config

from bmojo import BmojoForCausalLM

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def to_cuda(inputs: dict) -> dict:
    return {name: value.cuda() if isinstance(value, torch.Tensor) else value for name, value in inputs.items()}


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["causal_full", "window_only", "fading_memory_qe5_mqa", "blocks_of_64_padded"])
def test_attention_on_cuda_matches_naive_on_cpu(case: str, dtype: torch.dtype, tolerance: float) -> None:
    inputs = attention_cases.make_inputs(**attention_cases.CASES[case], dtype=dtype)
    out, grads = attention_cases.run("torch", to_cuda(inputs))
    expected_out, expected_grads = attention_cases.run("naive", inputs)
    assert out.is_cuda and out.dtype == dtype
    attention_cases.assert_relative_close(out.cpu(), expected_out, tolerance, "output")
    for name, grad in grads.items():
        attention_cases.assert_relative_close(grad.cpu(), expected_grads[name], tolerance, f"gradient of {name}")


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("time", [63, 256])
def test_ssm_scan_on_cuda_matches_naive_on_cpu(time: int, dtype: torch.dtype, tolerance: float) -> None:
    inputs = scan_cases.make_inputs(time=time, dtype=dtype)
    actual = scan_cases.run_with_grads(to_cuda(inputs), "torch")
    expected = scan_cases.run_with_grads(inputs, "naive")
    scan_cases.assert_all_close({name: value.cpu() for name, value in actual.items()}, expected, tolerance)


def test_training_step_on_cuda_matches_cpu() -> None:
    config = tiny_config("MWFBA", layers=5, memory_threshold=0.0)
    ids = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    losses, grads = {}, {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = BmojoForCausalLM(config).to(device)
        loss = model(ids.to(device), labels=ids.to(device)).loss
        loss.backward()
        losses[device] = loss.item()
        grads[device] = {name: p.grad.cpu() for name, p in model.named_parameters() if p.grad is not None}
    assert abs(losses["cuda"] - losses["cpu"]) <= 1e-4 * abs(losses["cpu"])
    assert grads["cuda"].keys() == grads["cpu"].keys()
    for name, grad in grads["cuda"].items():
        attention_cases.assert_relative_close(grad, grads["cpu"][name], 1e-3, f"gradient of {name}")


def test_bf16_autocast_training_on_cuda_lowers_the_loss() -> None:
    torch.manual_seed(0)
    model = BmojoForCausalLM(tiny_config("B", memory_threshold=0.0)).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(2)).cuda()
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("pattern", ["B", "MWFBA"])
def test_token_by_token_decoding_on_cuda_matches_parallel(pattern: str) -> None:
    torch.manual_seed(0)
    model = BmojoForCausalLM(tiny_config(pattern, layers=max(2, len(pattern)), memory_threshold=0.0)).cuda().eval()
    ids = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        parallel = model(ids, use_cache=False).logits
    stepwise, _ = decode(model, ids, start=10)
    torch.testing.assert_close(stepwise, parallel[:, 10:], rtol=1e-4, atol=1e-4)


def test_compiled_decoding_on_cuda_matches_eager() -> None:
    config = tiny_config("MWFBA", layers=5, memory_threshold=0.0)
    ids = torch.randint(0, VOCAB, (2, PREFILL + 70), generator=torch.Generator().manual_seed(9)).cuda()
    eager, _ = decode(build(config).cuda(), ids)
    model = build(config).cuda()
    model.compile_decoding()
    compiled, _ = decode(model, ids)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
