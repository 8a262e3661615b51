"""What `python3 -m tox -e venv [-- ARGS]` runs (tox.ini passes ARGS here).

* no ARGS: the whole suite with the test rig's CPU speed-ups, except the correctness core
  (marker ``core``), which runs after it with every CPU-only speed-up switched off
  (``VLLM_RAY_METAL_CPU_TUNING=0``: the code a Mac runs). The core's larger versions
  (test_model_runner.py, the TP/PP/DP equality tests) cover the tuned path. Both run on
  two pytest-xdist workers (tests/conftest.py says how tests are grouped): a test's
  engine start is mostly one process importing vLLM, so one worker leaves a core idle;
* ARGS that start with ``-`` or name a test path: pytest on the suite with them
  (``-- -m unit`` is the fast subset);
* anything else: that command (``-- vllm-ray-metal generate``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PYTEST = [sys.executable, "-m", "pytest", "-ra", "--timeout=900", "--durations=60"]
SPREAD = ["-n", str(min(2, os.cpu_count() or 1)), "--dist", "loadscope",
          "--no-loadscope-reorder"]  # (conftest.py's groups as scopes, in its order)


def main(args: list[str]) -> int:
    if args and not args[0].startswith("-") and not args[0].startswith("tests"):
        return subprocess.call(args)
    if args:
        paths = [] if any(a.startswith("tests") for a in args) else [str(TESTS)]
        return subprocess.call([*PYTEST, *args, *paths])
    code = subprocess.call([*PYTEST, *SPREAD, "-m", "not core", str(TESTS)])
    mac_path = {**os.environ, "VLLM_RAY_METAL_CPU_TUNING": "0"}
    print("\n== the correctness core with CPU tuning off (VLLM_RAY_METAL_CPU_TUNING=0) ==",
          flush=True)
    core = subprocess.call([*PYTEST, *SPREAD, "-m", "core", str(TESTS)], env=mac_path)
    return code or core


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
