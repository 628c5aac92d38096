"""The host allocator setting: with it, a freed large block is reused without faulting its pages in again."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from bmojo.train.config import BackendConfig

# Page faults of allocating (and filling) a 64 MiB tensor once more after three times (glibc may place the
# second block apart from the first; from the third on it reuses freed ones), printed by a fresh process.
MEASURE = textwrap.dedent(
    """
    import resource, sys, torch
    from bmojo.train.device import select_device
    from bmojo.train.config import BackendConfig

    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    select_device(BackendConfig(device="cpu", keep_host_memory=sys.argv[1] == "keep"))
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
def test_kept_memory_is_reused_without_page_faults() -> None:
    pages = 64 * 2**20 // 4096
    released, kept = faults_of_allocation("release"), faults_of_allocation("keep")
    assert released >= pages // 2, f"expected the 64 MiB block to be faulted in again, got {released} faults"
    assert kept < pages // 16, f"expected the freed block to be reused, got {kept} faults"


def test_training_keeps_host_memory_by_default() -> None:
    assert BackendConfig().keep_host_memory is True
