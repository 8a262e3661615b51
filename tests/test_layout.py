"""The house: rooms by role, imports only downwards, no cycles, upstream internals only in
compat/, and an import of the package that does no work."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import vllm_ray_metal

pytestmark = pytest.mark.unit

SRC = Path(vllm_ray_metal.__file__).parent
# a room may import its own and any lower room, never a higher one
FLOORS = {"envs": 0, "compat": 1, "default_model": 1, "cpu": 2, "engine": 3, "distributed": 4,
          "config": 5, "platform": 5, "__init__": 5, "cli": 6, "testing": 7}


def modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(("vllm_ray_metal", *parts)).removesuffix(".__init__")
        out[name] = path
    return out


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path, known: set[str], module_level_only: bool = False) -> set[str]:
    """Our modules that ``path`` imports (``from pkg import mod`` resolved to the module)."""
    tree = ast.parse(path.read_text())
    found = set()
    nodes = tree.body if module_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
    return {m for m in found if m in known}


def graph(module_level_only: bool = False) -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods), module_level_only) - {m} for m, p in mods.items()}


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                raise AssertionError(" -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_every_room_imports_only_downwards():
    upward = [(m, n) for m, targets in graph().items() for n in targets
              if FLOORS[room(n)] > FLOORS[room(m)]]
    assert not upward, upward
    assert set(FLOORS) >= {room(m) for m in modules()}  # every module has a floor


def test_platform_loads_neither_the_engine_nor_mlx_at_import():
    direct = graph(module_level_only=True)["vllm_ray_metal.platform"]
    assert not {m for m in direct if room(m) in ("engine", "distributed", "config")}, direct
    out = subprocess.run([sys.executable, "-c", "import sys, vllm_ray_metal.platform; "
                          "print(sorted(m for m in sys.modules if m.startswith(('mlx', "
                          "'vllm_ray_metal.engine', 'vllm_ray_metal.cpu.'))))"],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr[-2000:]


def test_upstream_internals_only_in_compat():
    pattern = re.compile(r"_private|_init_executor|_node_ip_address")
    hits = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py") if "compat" not in p.parts
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def test_files_stay_readable_in_one_sitting():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_importing_the_package_does_no_work(tmp_path):
    """No compiler, no child process, no MLX or Ray: vLLM's plugin loader imports us in every
    process. PATH holds only a spy ``cc`` that records any call; the cache is empty."""
    bare = tmp_path / "bin"  # the interpreter itself runs by its full path
    bare.mkdir()
    spy = bare / "cc"
    spy.write_text(f"#!/bin/sh\ntouch {tmp_path / 'cc-was-called'}\nexit 1\n")
    spy.chmod(0o755)
    env = {**os.environ, "PATH": str(bare), "VLLM_RAY_METAL_CACHE": str(tmp_path / "cache")}
    env.pop("CC", None)
    probe = ("import time; t = time.perf_counter(); import vllm_ray_metal; "
             "took = time.perf_counter() - t; import sys, psutil; "
             "print(took, len(psutil.Process().children(recursive=True)), "
             "sorted({m.split('.')[0] for m in sys.modules} & {'mlx', 'ray', 'vllm', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120, env=env)
    seconds, children, heavy = out.stdout.strip().splitlines()[-1].split(" ", 2)
    assert float(seconds) < 2 and children == "0" and heavy == "[]", out.stdout + out.stderr
    # the plugin's entry point as vLLM calls it: still no compiler, nothing written
    activate = subprocess.run([sys.executable, "-c", "import vllm_ray_metal.platform as p;"
                               " print(p.activate())"], capture_output=True, text=True,
                              timeout=120, env=env)
    assert activate.stdout.strip().splitlines()[-1] == "vllm_ray_metal.platform.MLXPlatform", \
        activate.stdout + activate.stderr[-2000:]
    assert not (tmp_path / "cc-was-called").exists() and not (tmp_path / "cache").exists()


def test_the_actor_module_leaves_mlx_for_the_worker_to_load():
    """Ray unpickles the worker actor class before the worker module runs: that import must
    not load MLX, or the worker could no longer choose MLX's BLAS (cpu.preload)."""
    out = subprocess.run([sys.executable, "-c", "import sys; "
                          "import vllm_ray_metal.distributed.executor; "
                          "print('mlx.core' in sys.modules)"],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr[-2000:]
