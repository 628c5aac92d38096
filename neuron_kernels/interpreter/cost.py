"""Per-engine instruction counts and an estimated trn1 (NeuronCore-v2) time.

Every instruction the interpreter runs is recorded on its engine with the number of elements it produces
(bytes for DMA) and a cost from the model below. The public figures come from the aws-neuron-sdk docs at
release 2.28 (the pinned SDK):

- ``nki/guides/architecture/trainium_inferentia2_arch.rst``:
  clocks TensorE 2.8 GHz, VectorE 1.12 GHz, ScalarE 1.4 GHz, GpSimd 1.4 GHz, each 128 lanes wide;
  a matmul's initiation interval is about ``max(N, 64)`` TensorE cycles for a bf16/fp16/tf32/fp8 moving
  tile of free size N, and about 4x that for fp32 (LoadStationary runs in the background and is not
  counted); a VectorE instruction over N elements per partition takes about N cycles with one input tile
  and 2N with two, plus a static overhead of about 100 cycles that dominates small or dependent
  instructions; 16 DMA engines move 27 GiB/s each, one engine per 8 SBUF partitions.
- ``about-neuron/arch/neuron-hardware/trainium.rst``: a trn1 chip (two NeuronCore-v2) has 820 GiB/s of HBM
  bandwidth, so 410 GiB/s per NeuronCore.

Model (assumptions beyond the docs are marked *):

- TensorE: ``max(N_moving, 64) * (4 if fp32 else 1)`` cycles per matmul or transpose.
- VectorE: ``100 + N * tensor_inputs`` cycles; ScalarE and GpSimd: ``100 + N`` cycles (* the 100-cycle
  overhead documented for VectorE is applied to all three).
- DMA: ``bytes / min(queues * 27 GiB/s, 410 GiB/s)`` with ``queues = min(16, ceil(partitions / 8))`` on the
  SBUF side (* per-transfer setup cost and small-descriptor inefficiency are not modelled).
- Engines run concurrently, so the estimate is the busiest engine's time (a lower bound that assumes
  perfect overlap); the serial sum of all engines is reported as the upper bound.

Program size: ``nl.affine_range`` and ``nl.sequential_range`` loops stay loops in the compiled program
(their API entries: the compiler does not unroll them before its backend), so an instruction inside them is
counted once in the *static* count however often it runs; ``range`` and ``nl.static_range`` loops are
unrolled and count every iteration. The *executed* count is every instruction run. Because a device loop
is one program, every iteration must run the same instructions on the same sizes as the first.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from neuron_kernels.interpreter.errors import NkiLanguageError

ENGINES = ("TensorE", "VectorE", "ScalarE", "GpSimd", "DMA")
CLOCK_HZ = {"TensorE": 2.8e9, "VectorE": 1.12e9, "ScalarE": 1.4e9, "GpSimd": 1.4e9}
MATMUL_MIN_CYCLES = 64
FP32_MATMUL_SLOWDOWN = 4
STATIC_OVERHEAD_CYCLES = 100
DMA_QUEUE_BYTES_PER_S = 27 * 2**30
DMA_QUEUES = 16
PARTITIONS_PER_DMA_QUEUE = 8
HBM_BYTES_PER_S_PER_CORE = 820 * 2**30 / 2


def matmul_cycles(moving_free: int, fp32: bool) -> float:
    return max(moving_free, MATMUL_MIN_CYCLES) * (FP32_MATMUL_SLOWDOWN if fp32 else 1)


def elementwise_cycles(free_elements: int, tensor_inputs: int = 1) -> float:
    return STATIC_OVERHEAD_CYCLES + free_elements * max(tensor_inputs, 1)


def dma_seconds(num_bytes: int, sbuf_partitions: int | None) -> float:
    queues = (
        DMA_QUEUES
        if sbuf_partitions is None
        else min(DMA_QUEUES, math.ceil(sbuf_partitions / PARTITIONS_PER_DMA_QUEUE))
    )
    return num_bytes / min(queues * DMA_QUEUE_BYTES_PER_S, HBM_BYTES_PER_S_PER_CORE)


@dataclass
class EngineStats:
    instructions: int = 0
    static_instructions: int = 0
    elements: int = 0
    seconds: float = 0.0
    by_instruction: Counter = field(default_factory=Counter)


@dataclass
class DeviceLoop:
    """One running ``affine_range``/``sequential_range`` loop: the instructions of its current iteration."""

    kind: str
    iteration: int = -1
    body: list[tuple[str, int]] = field(default_factory=list)
    first_body: list[tuple[str, int]] | None = None


@dataclass
class Stats:
    """Counts (executed and static) and modelled busy time of every engine over one kernel run."""

    engines: dict[str, EngineStats] = field(default_factory=lambda: {name: EngineStats() for name in ENGINES})
    matmul_flops: int = 0
    loops: list[DeviceLoop] = field(default_factory=list)

    def record(self, engine: str, instruction: str, elements: int, cycles: float = 0.0, seconds: float = 0.0):
        stats = self.engines[engine]
        stats.instructions += 1
        if all(loop.iteration == 0 for loop in self.loops):
            stats.static_instructions += 1
        for loop in self.loops:
            loop.body.append((instruction, int(elements)))
        stats.elements += int(elements)
        stats.seconds += seconds if engine == "DMA" else cycles / CLOCK_HZ[engine]
        stats.by_instruction[instruction] += 1

    def begin_loop(self, kind: str) -> DeviceLoop:
        loop = DeviceLoop(kind)
        self.loops.append(loop)
        return loop

    def begin_iteration(self, loop: DeviceLoop) -> None:
        """Close the previous iteration of ``loop`` (checking it ran the first one's program) and open the next."""
        if loop.iteration >= 0:
            self._check_same_program(loop)
        loop.iteration += 1
        loop.body = []

    def end_loop(self, loop: DeviceLoop, check: bool = True) -> None:
        if check and loop.iteration >= 0:
            self._check_same_program(loop)
        self.loops.remove(loop)

    @staticmethod
    def _check_same_program(loop: DeviceLoop) -> None:
        if loop.first_body is None:
            loop.first_body = loop.body
            return
        if loop.body == loop.first_body:
            return
        mismatch = next(
            (i for i, (got, want) in enumerate(zip(loop.body, loop.first_body, strict=False)) if got != want),
            min(len(loop.body), len(loop.first_body)),
        )
        ran = loop.body[mismatch] if mismatch < len(loop.body) else "nothing"
        first = loop.first_body[mismatch] if mismatch < len(loop.first_body) else "nothing"
        raise NkiLanguageError(
            f"nl.{loop.kind}: iteration {loop.iteration} ran {ran} as instruction {mismatch} of its body where the "
            f"first iteration ran {first} ((instruction, elements)): the compiler keeps this loop as one program "
            "(its API entry: not unrolled before the backend), so every iteration must run the same instructions "
            "on the same tile sizes; pad the last tile instead of shortening it"
        )

    @property
    def static_instructions(self) -> int:
        """Instructions in the program, each device-loop body counted once."""
        return sum(stats.static_instructions for stats in self.engines.values())

    @property
    def executed_instructions(self) -> int:
        return sum(stats.instructions for stats in self.engines.values())

    @property
    def estimated_seconds(self) -> float:
        return max(stats.seconds for stats in self.engines.values())

    @property
    def serial_seconds(self) -> float:
        return sum(stats.seconds for stats in self.engines.values())

    @property
    def bound_by(self) -> str:
        return max(self.engines, key=lambda name: self.engines[name].seconds)

    def summary(self) -> dict:
        """JSON-ready: per engine its executed and static instruction counts, elements (bytes for DMA), busy µs."""
        return {
            "engines": {
                name: {
                    "instructions": stats.instructions,
                    "static_instructions": stats.static_instructions,
                    "elements": stats.elements,
                    "busy_us": stats.seconds * 1e6,
                    "by_instruction": dict(sorted(stats.by_instruction.items())),
                }
                for name, stats in self.engines.items()
            },
            "executed_instructions": self.executed_instructions,
            "static_instructions": self.static_instructions,
            "matmul_flops": self.matmul_flops,
            "estimated_us": self.estimated_seconds * 1e6,
            "serial_us": self.serial_seconds * 1e6,
            "bound_by": self.bound_by,
        }
