"""The host allocator setting: with it, a freed large block is reused without faulting its pages in again."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# Page faults of allocating (and filling) a 64 MiB tensor once more after three times (glibc may place the
# second block apart from the first; from the third on it reuses freed ones), printed by a fresh process.
MEASURE = textwrap.dedent(
    """
    import resource, sys, torch
    from bmojo.train.config import BackendConfig
    from bmojo.train.device import select_device

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    # The default configuration keeps host memory; "release" turns it off.
    keep = {"default": {}, "release": {"keep_host_memory": False}}[sys.argv[1]]
    select_device(BackendConfig(device="cpu", **keep))
    for _ in range(3):
        torch.ones(16 * 2**20)
    before = faults()
    torch.ones(16 * 2**20)
    print(faults() - before)
    """
)


def faults_of_allocation(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", MEASURE, mode], capture_output=True, text=True, check=True)
    return int(result.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_training_on_the_cpu_reuses_freed_memory_without_page_faults() -> None:
    pages = 64 * 2**20 // 4096
    released, kept = faults_of_allocation("release"), faults_of_allocation("default")
    assert released >= pages // 2, f"expected the 64 MiB block to be faulted in again, got {released} faults"
    assert kept < pages // 16, f"expected the freed block to be reused, got {kept} faults"
