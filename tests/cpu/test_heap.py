"""Freed buffers stay in the heap: a repeated allocation pattern stops page-faulting."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

PATTERN = """
import resource, sys
import numpy as np
from vllm_ray_metal.cpu import heap
print(heap.keep_freed_memory() if sys.argv[1] == "1" else None)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def step():  # arrays of a few sizes from 1.2 to 6 MB alive at once, then freed
    live = [np.ones(n, np.float32) for n in (300_000, 700_000, 1_500_000) * 8]
    del live
for _ in range(3):
    step()
before = faults()
for _ in range(20):
    step()
print(faults() - before)
"""


def run(tuned: bool) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PATTERN, "1" if tuned else "0"],
                         capture_output=True, text=True, timeout=120, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_repeated_steps_stop_faulting_pages():
    applied, tuned = run(True)
    assert applied == "True"
    _, default = run(False)
    assert tuned < 1000 < default, (tuned, default)  # 1.2 MB arrays are ~300 pages each
