"""The ``nki`` backend of ``ssm_scan`` and ``eidetic_gather``: NKI kernels behind autograd Functions (DESIGN §4).

On a Neuron (XLA) device the ``@nki.jit`` kernels of ``neuron_kernels`` are called on the XLA tensors and
become custom calls inside the step's graph. With ``BMOJO_NKI_INTERPRET=1`` the same kernels run on CPU
tensors through the NumPy interpreter (``neuron_kernels.interpreter``), forward and backward, like
Triton's interpreter mode, or through the official NKI simulator where the Neuron SDK is installed.
Otherwise asking for ``backend="nki"`` raises an error that says what is missing.
"""

from __future__ import annotations

import numpy as np
import torch

from bmojo.ops.eidetic_gather import EIDETIC_GATHER
from bmojo.ops.ssm_scan import SSM_SCAN
from neuron_kernels import nki_compat
from neuron_kernels.eidetic_gather.kernels import ROWS_PER_TILE, eidetic_gather_bwd, eidetic_gather_fwd
from neuron_kernels.eidetic_gather.kernels import check_shapes as check_gather_shapes
from neuron_kernels.interpreter import TypedArray, run_kernel
from neuron_kernels.ssm_scan.backward import ssm_scan_bwd
from neuron_kernels.ssm_scan.forward import check_shapes, ssm_scan_fwd

NEURON_DEVICE_TYPES = ("xla", "neuron")


def nki_unavailable_reason(device: torch.device) -> str | None:
    """Why the NKI kernels cannot run on ``device``, or None when they can."""
    if device.type == "cpu":
        if nki_compat.interpreter_requested():
            return None
        return (
            "NKI kernels need a Neuron device; set BMOJO_NKI_INTERPRET=1 to run them on CPU tensors through "
            "the NKI interpreter, or pick backend='torch'"
        )
    if device.type in NEURON_DEVICE_TYPES:
        if nki_compat.USING_INTERPRETER:
            return (
                "the Neuron SDK's nki package is not importable (or BMOJO_NKI_INTERPRET=1 selected the CPU "
                "interpreter at import); install the Neuron SDK to run NKI kernels on the device"
            )
        return None
    return f"NKI kernels run on Neuron devices, or on CPU under BMOJO_NKI_INTERPRET=1, not on {device.type}"


def _to_host(tensor: torch.Tensor | None, for_interpreter: bool):
    """A CPU tensor as kernel host data: int64 indices become int32; bfloat16 becomes the interpreter's
    TypedArray, or an ``ml_dtypes`` array for the official simulator (which ships with ml_dtypes)."""
    if tensor is None:
        return None
    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.int64:
        return tensor.to(torch.int32).numpy()
    if tensor.dtype != torch.bfloat16:
        return tensor.numpy()
    if for_interpreter:
        return TypedArray(tensor.float().numpy(), "bfloat16")
    import ml_dtypes

    return tensor.float().numpy().astype(ml_dtypes.bfloat16)


def _official_simulator(kernel):
    simulate = getattr(nki_compat.nki, "simulate", None)
    if simulate is None:
        raise RuntimeError(
            "this Neuron SDK's nki has no nki.simulate (it appeared in SDK 2.29); set BMOJO_NKI_INTERPRET=1 "
            "before bmojo is imported to run the NKI kernels through the NumPy interpreter instead"
        )
    return simulate(kernel)


def _launch(kernel, *args) -> tuple[torch.Tensor, ...]:
    """Run ``kernel`` on torch tensors and constants: on device for XLA tensors, else on the host."""
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    if device.type in NEURON_DEVICE_TYPES:
        outputs = kernel(*args)
        return outputs if isinstance(outputs, tuple) else (outputs,)
    interpreter = nki_compat.USING_INTERPRETER
    host_args = [_to_host(a, interpreter) if isinstance(a, torch.Tensor) else a for a in args]
    if interpreter:
        outputs = run_kernel(kernel, *host_args).outputs
    else:
        outputs = _official_simulator(kernel)(*host_args)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    # Integer outputs keep their dtype; floats (bfloat16 included) come back as fp32 for the caller to cast.
    return tuple(torch.from_numpy(np.asarray(o, dtype=None if o.dtype.kind in "iub" else np.float32)) for o in outputs)


def _pad_time(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """[Bt, T, ...] zero-padded along time to ``length`` steps (the kernels take whole chunks)."""
    missing = length - tensor.shape[1]
    if missing == 0:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(tensor.shape[0], missing, *tensor.shape[2:])], dim=1)


class _SSMScanFunction(torch.autograd.Function):
    """ssm_scan through the NKI kernels; the backward kernel recomputes the chunk states it needs.

    The kernels' chunk loops run whole chunks of Q = min(chunk_size, T) steps, so the sequence is padded to a
    multiple of Q with dt = x = B = C = 0 steps: their decay is exp(0) = 1 and their input 0, so the state and
    final state are unchanged, and with dy = 0 there they add nothing to any gradient (DESIGN §4).
    """

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial_state, chunk_size):
        time = x.shape[1]
        chunk = min(chunk_size, time)
        padded = -(-time // chunk) * chunk
        x_p, dt_p, B_p, C_p = (_pad_time(t, padded) for t in (x, dt, B, C))
        y, final_state = _launch(ssm_scan_fwd, x_p, dt_p, A, B_p, C_p, D, initial_state, chunk)
        ctx.save_for_backward(x_p, dt_p, A, B_p, C_p, D, initial_state)
        ctx.chunk, ctx.time = chunk, time
        return y[:, :time].to(device=x.device, dtype=x.dtype), final_state.to(device=x.device, dtype=torch.float32)

    @staticmethod
    def backward(ctx, d_y, d_final_state):
        x, dt, A, B, C, D, initial_state = ctx.saved_tensors
        d_y = torch.zeros_like(x) if d_y is None else _pad_time(d_y.to(x.dtype), x.shape[1])
        if d_final_state is None:
            d_final_state = x.new_zeros(x.shape[0], x.shape[2], x.shape[3], B.shape[3], dtype=torch.float32)
        grads = _launch(ssm_scan_bwd, x, dt, A, B, C, D, initial_state, d_y, d_final_state.float(), ctx.chunk)
        if D is None:
            dx, ddt, dA, dB, dC, d_initial = grads
            dD = None
        else:
            dx, ddt, dA, dB, dC, dD, d_initial = grads
        time = ctx.time
        inputs = (x[:, :time], dt[:, :time], A, B[:, :time], C[:, :time], D, initial_state)
        dx, ddt, dB, dC = (g[:, :time] for g in (dx, ddt, dB, dC))
        gradients = (dx, ddt, dA, dB, dC, dD, d_initial)
        cast = [
            None if i is None else g.to(device=i.device, dtype=i.dtype) for g, i in zip(gradients, inputs, strict=True)
        ]
        return (*cast, None)


@SSM_SCAN.register("nki", can_run=nki_unavailable_reason)
def ssm_scan_nki(x, dt, A, B, C, D, initial_state, chunk_size):
    """The NKI kernels of ``neuron_kernels/ssm_scan`` (shapes as in :func:`bmojo.ops.ssm_scan.ssm_scan`)."""
    check_shapes(x, B, chunk_size)
    return _SSMScanFunction.apply(x, dt, A, B, C, D, initial_state, chunk_size)


class _EideticGatherFunction(torch.autograd.Function):
    """Indirect-DMA gather forward; the backward sums duplicate rows on chip and scatters each row once (fp32).

    The kernels take rows of the flattened [B*T, F] source (b*T + index) in whole tiles of 128, so the
    selected rows are padded with row b*T (index 0) and the padded output rows dropped; in the backward the
    padded rows carry zero gradient, which adds nothing to row b*T.
    """

    @staticmethod
    def forward(ctx, src, index):
        batch, length, features = src.shape
        selected = index.shape[1]
        padded = -(-selected // ROWS_PER_TILE) * ROWS_PER_TILE
        check_gather_shapes(batch, length, padded, features)
        offsets = torch.arange(batch, device=index.device).unsqueeze(1) * length
        rows = (torch.nn.functional.pad(index, (0, padded - selected)) + offsets).to(torch.int32)
        (out,) = _launch(eidetic_gather_fwd, src, rows)
        ctx.save_for_backward(rows)
        ctx.src_shape, ctx.src_dtype = src.shape, src.dtype
        return out[:, :selected].to(device=src.device, dtype=src.dtype)

    @staticmethod
    def backward(ctx, d_out):
        (rows,) = ctx.saved_tensors
        d_out = torch.nn.functional.pad(d_out, (0, 0, 0, rows.shape[1] - d_out.shape[1]))
        (d_src,) = _launch(eidetic_gather_bwd, d_out, rows, ctx.src_shape[1])
        return d_src.to(device=d_out.device, dtype=ctx.src_dtype), None


@EIDETIC_GATHER.register("nki", can_run=nki_unavailable_reason)
def eidetic_gather_nki(src, index):
    """The NKI kernels of ``neuron_kernels/eidetic_gather``: src [B, T, F], index [B, S] → [B, S, F]."""
    return _EideticGatherFunction.apply(src, index)
