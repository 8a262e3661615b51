"""What `python3 -m tox -e venv [-- ARGS]` runs (tox.ini passes ARGS here).

* no ARGS: the whole suite, then the correctness core again with every CPU-only speed-up
  switched off (``VLLM_RAY_METAL_CPU_TUNING=0``: the code a Mac runs);
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


def main(args: list[str]) -> int:
    if args and not args[0].startswith("-") and not args[0].startswith("tests"):
        return subprocess.call(args)
    if args:
        paths = [] if any(a.startswith("tests") for a in args) else [str(TESTS)]
        return subprocess.call([*PYTEST, *args, *paths])
    code = subprocess.call([*PYTEST, str(TESTS)])
    mac_path = {**os.environ, "VLLM_RAY_METAL_CPU_TUNING": "0"}
    print("\n== the correctness core with CPU tuning off (VLLM_RAY_METAL_CPU_TUNING=0) ==",
          flush=True)
    return code or subprocess.call([*PYTEST, "-m", "core", str(TESTS)], env=mac_path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
