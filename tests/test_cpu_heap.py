"""The CPU heap follows the live tensors once `bound_cpu_heap` ran (issue 27): what the
CPU estimate's small allocator term assumes. Without it glibc keeps freed few-MiB blocks
mapped after its threshold rose; a fresh process each, as a training stage is."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROBE = """
import sys, torch
from pathlib import Path
from orchestrator.planning.cpu_heap import bound_cpu_heap
def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
if sys.argv[1] == "bound":
    assert bound_cpu_heap()
big = torch.ones(16 << 18); del big  # a freed 16 MiB block: glibc raises its threshold
before = rss()
blocks = [torch.ones(1 << 20) for _ in range(100)]  # 100 x 4 MiB, written
keep = blocks[-1]
del blocks  # 99 freed under the one still live
print((rss() - before) / 2**20)
"""


def _retained_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True).stdout
    return float(out.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_blocks_are_returned_once_the_heap_is_bounded() -> None:
    assert _retained_mib("default") > 300  # 99 freed blocks still resident
    assert _retained_mib("bound") < 20  # only the live one
