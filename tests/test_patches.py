"""patches/ are upstream-ready: they apply to the installed vLLM, and with them applied
stock vLLM's "ray" backend serves the METAL key (no RayMetalExecutor involved)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import vllm

from ray_cluster import LocalRayCluster

PATCHES = sorted((Path(__file__).parents[1] / "patches").glob("*.patch"))
SITE = Path(vllm.__file__).parents[1]
SCENARIOS = Path(__file__).with_name("ray_scenarios.py")


def touched_files(patch: Path) -> list[str]:
    return [line.split()[1].split("/", 1)[1] for line in patch.read_text().splitlines()
            if line.startswith("+++ ")]


def test_patches_exist_and_apply_cleanly_to_installed_vllm():
    assert len(PATCHES) >= 2
    for patch in PATCHES:
        out = subprocess.run(["patch", "-p1", "--dry-run", "-d", str(SITE), "-i", str(patch)],
                             capture_output=True, text=True)
        assert out.returncode == 0, f"{patch.name}:\n{out.stdout}{out.stderr}"


@pytest.fixture(scope="module")
def patched_vllm(tmp_path_factory) -> Path:
    """A copy of the installed vllm package (symlinks, patched files copied) with patches."""
    root = tmp_path_factory.mktemp("patched")
    subprocess.run(["cp", "-rs", str(SITE / "vllm"), str(root / "vllm")], check=True)
    for patch in PATCHES:
        for rel in touched_files(patch):
            target = root / rel
            target.unlink()
            shutil.copy(SITE / rel, target)
        subprocess.run(["patch", "-p1", "-s", "-d", str(root), "-i", str(patch)], check=True)
    return root


def test_stock_ray_backend_works_with_metal_key_once_patched(patched_vllm):
    env = {"PYTHONPATH": str(patched_vllm)}
    with LocalRayCluster([("127.0.0.32", {}), ("127.0.0.33", {"METAL": 1})], env=env) as c:
        run_env = {**os.environ, **env, "VLLM_RAY_METAL_AUTO_RAY": "0",
                   "VLLM_HOST_IP": "127.0.0.1"}
        run_env.pop("RAY_ADDRESS", None)
        out = subprocess.run([sys.executable, str(SCENARIOS), "gen", c.address, c.head_ip, "ray"],
                             capture_output=True, text=True, timeout=420, env=run_env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, out.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT "):])
    assert "error" not in res, res.get("traceback", out.stderr[-3000:])
    assert "RayMetalExecutor:" not in out.stdout + out.stderr  # vLLM's own executor worked
    assert "Paris" in res["text"]
    assert res["workers"][0]["host_ip"] == "127.0.0.33"
