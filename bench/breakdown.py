"""Where a B'MOJO training step spends the time a sliding-window Transformer's does not, and the best
B'MOJO / sliding-window throughput ratio that the same arithmetic allows on this device.

    python bench/breakdown.py [--seq-len 2048] [--tokens 8192] [--repeats 5] [--json ...]

Both models have the same parameter count (``bench/throughput.py``'s sizes), so their parameter matmuls cost
about the same. What B'MOJO adds per layer is work without parameters that its definition fixes: attention
over ``2w + M`` keys per query instead of ``w`` (local window, fading band, memory), and the SSM scan. Timing
those ops alone (forward + backward), side by side with both whole training steps, gives

    bound = W_step / (W_step + layers · (attention_B - attention_W + scan))

the B/W ratio B'MOJO would reach if every other operation of its layer (conv, gates, norms, selection) were
free. A target above the bound cannot be met by a faster implementation of the same model on this device.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from throughput import make_step

from bmojo import BmojoConfig, BmojoForCausalLM
from bmojo.eval.family import (
    add_run_arguments,
    add_size_arguments,
    family_configs,
    median_seconds,
    size_fields,
    start_run,
    write_report,
)
from bmojo.model.memory import select_memory
from bmojo.ops import bmojo_attention, ssm_scan


def forward_backward(fn: Callable[..., torch.Tensor | tuple], *inputs: torch.Tensor) -> Callable[[], None]:
    """A callable running ``fn(*inputs)`` forward and backward (inputs made leaves once)."""
    leaves = [t.requires_grad_() if t.is_floating_point() else t for t in inputs]

    def run() -> None:
        out = fn(*leaves)
        (out[0] if isinstance(out, tuple) else out).sum().backward()

    return run


def component_steps(
    config: BmojoConfig, w_config: BmojoConfig, batch: int, length: int
) -> dict[str, Callable[[], None]]:
    """Forward + backward of the ops and mixers a B layer and a W layer are made of, at the step's shapes."""
    heads, kv_heads, head_dim, w = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.window_size,
    )

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape)

    q, k, v, fk, fv = (randn(batch, length, h, head_dim) for h in (heads, kv_heads, kv_heads, kv_heads, kv_heads))
    slots, block = config.memory_size, config.memory_block
    num_blocks = -(-length // block)
    mem_pos, mem_valid = select_memory(
        torch.rand(batch, length),
        block=block,
        topk=config.memory_topk,
        threshold=0.0,
        memory_size=slots,
        num_query_blocks=num_blocks,
    )
    mem_k, mem_v = (randn(batch, num_blocks, slots, kv_heads, head_dim) for _ in range(2))

    def attention_w(q, k, v):
        return bmojo_attention(q, k, v, window=w)

    def attention_b(q, k, v, fk, fv, mem_k, mem_v):
        return bmojo_attention(
            q, k, v, window=w, fading_k=fk, fading_v=fv, mem_k=mem_k, mem_v=mem_v,
            mem_pos=mem_pos, mem_valid=mem_valid, mem_block=block,
        )  # fmt: skip

    ssm_heads, groups, state = config.ssm_num_heads, config.ssm_num_groups, config.ssm_state_size
    x, dt = randn(batch, length, ssm_heads, config.ssm_head_dim), torch.rand(batch, length, ssm_heads) * 0.1
    b, c = randn(batch, length, groups, state), randn(batch, length, groups, state)
    decay = -torch.linspace(1, 16, ssm_heads)

    def scan(x, dt, b, c):
        return ssm_scan(x, dt, decay, b, c, chunk_size=config.ssm_chunk_size)

    h = randn(batch, length, config.hidden_size)
    # Mixers taken from built models, so their SSM parameters carry the model's initialisation.
    b_mixer, w_mixer = (BmojoForCausalLM(c).model.layers[0].mixer for c in (config, w_config))
    return {
        "attention W": forward_backward(attention_w, q, k, v),
        "attention B": forward_backward(attention_b, q, k, v, fk, fv, mem_k, mem_v),
        "ssm_scan": forward_backward(scan, x, dt, b, c),
        "Mamba-2 mixer": forward_backward(b_mixer.ssm, h),
        "mixer W": forward_backward(w_mixer, h),
        "mixer B": forward_backward(b_mixer, h),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=Path("bench/results/breakdown.json"))
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per step (batch = tokens / T)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    add_run_arguments(parser, device=False)
    add_size_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cpu = start_run(args)
    torch.manual_seed(0)
    batch, length = max(1, args.tokens // args.seq_len), args.seq_len
    configs = family_configs(("W", "B"), **size_fields(args))
    timed = {
        f"step {member}": make_step(BmojoForCausalLM(config).train(), batch, length, config.vocab_size, cpu)
        for member, config in configs.items()
    }
    timed |= component_steps(configs["B"], configs["W"], batch, length)
    ms = {name: 1e3 * seconds for name, seconds in median_seconds(timed, args.repeats).items()}
    layers = configs["B"].num_hidden_layers
    ideal_b = ms["step W"] + layers * (ms["attention B"] - ms["attention W"] + ms["ssm_scan"])
    summary = {"measured B/W": ms["step W"] / ms["step B"], "bound B/W": ms["step W"] / ideal_b}
    print(f"T={length}, batch {batch}, {layers} layers, forward + backward (median of {args.repeats}):")
    for name, value in ms.items():
        print(f"  {name:<14} {value:8.1f} ms")
    for name, value in summary.items():
        print(f"  {name:<14} {value:8.2f}")
    write_report(args.json, "breakdown", cpu, seq_len=length, batch=batch, model=size_fields(args), ms=ms, **summary)


if __name__ == "__main__":
    main()
