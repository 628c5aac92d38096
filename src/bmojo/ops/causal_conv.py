"""The Mamba-2 mixer's depthwise causal conv over time, with a fast backward on the CPU.

``out[b, t, c] = bias[c] + Σ_k x[b, t + k, c] · weight[c, k]`` for x: [B, K-1+T, C] (the K-1 inputs before the
first output position come first), out: [B, T, C]. The forward is a 2-D conv on the channels-last view
[B, C, 1, K-1+T] of the [B, time, C] layout (no transposed copies). oneDNN's CPU backward of that conv spends
almost all its time on the weight gradient (about 100 ms of 118 at B = 4, T = 2048, C = 1056, where the forward
takes 12): a reduction over every (b, t) of products with four shifted inputs. On the CPU it is computed
here in blocks of rows that stay in cache (12 ms), and the input gradient as the same conv of the padded output
gradient with flipped weights (11 ms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# Rows (time steps of one sequence) per block of the weight gradient: a [rows, C] fp32 block near 1 MiB.
BLOCK_BYTES = 2**20


def _conv_with_bias(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """The conv in x's dtype: x [B, K-1+T, C], weight [C, K], bias [C] -> [B, T, C]."""
    return _channels_last_conv(x, weight.to(x.dtype)) + bias.to(x.dtype)


def _channels_last_conv(x: Tensor, weight: Tensor) -> Tensor:
    """x: [B, K-1+T, C], weight: [C, K] (x's dtype) -> [B, T, C] without bias."""
    out = F.conv2d(x.transpose(1, 2).unsqueeze(2), weight[:, None, None, :], groups=weight.shape[0])
    return out.squeeze(2).transpose(1, 2)


def _weight_grad(grad_out: Tensor, x: Tensor, kernel: int) -> Tensor:
    """``Σ_{b, t} grad_out[b, t, c] · x[b, t + k, c]`` in fp32: grad_out [B, T, C], x [B, K-1+T, C] -> [C, K]."""
    batch, length, channels = grad_out.shape
    rows = max(1, BLOCK_BYTES // (4 * channels))
    sums = grad_out.new_zeros(kernel, channels, dtype=torch.float32)
    for b in range(batch):
        for start in range(0, length, rows):
            block = grad_out[b, start : start + rows].float()
            stop = start + block.shape[0]
            for k in range(kernel):
                sums[k] += (block * x[b, start + k : stop + k]).sum(0)
    return sums.t()


class _CausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        with torch.autocast("cpu", enabled=False):
            ctx.save_for_backward(x, weight)
            ctx.bias_dtype = bias.dtype
            return _conv_with_bias(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        kernel = weight.shape[1]
        with torch.autocast("cpu", enabled=False):
            grad_out = grad_out.to(x.dtype)
            padded = F.pad(grad_out, (0, 0, kernel - 1, kernel - 1))  # [B, T + 2(K-1), C]
            grad_x = _channels_last_conv(padded, weight.flip(-1).to(x.dtype))
            grad_weight = _weight_grad(grad_out, x, kernel).to(weight.dtype)
            grad_bias = grad_out.sum(dim=(0, 1), dtype=torch.float32).to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias


def causal_conv(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Depthwise causal conv: x [B, K-1+T, C], weight [C, K], bias [C] -> [B, T, C] in x's dtype.

    The fast backward runs on the CPU in eager mode; elsewhere (CUDA, XLA, inside ``torch.compile``) autograd
    differentiates the conv itself.
    """
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        return _CausalConv.apply(x, weight, bias)
    return _conv_with_bias(x, weight, bias)


def causal_conv_naive(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Reference: PyTorch's conv1d on the [B, C, time] layout, in fp32 (shapes as :func:`causal_conv`)."""
    out = F.conv1d(x.float().transpose(1, 2), weight.float().unsqueeze(1), bias.float(), groups=weight.shape[0])
    return out.transpose(1, 2).to(x.dtype)
