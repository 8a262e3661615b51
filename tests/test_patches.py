"""patches/ are upstream-ready: they apply to the installed vLLM, and with them applied
stock vLLM's "ray" backend serves the METAL key (no RayMetalExecutor involved)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import vllm

from vllm_ray_metal.testing import scenarios
from vllm_ray_metal.testing.cluster import LocalRayCluster

PATCHES = sorted((Path(__file__).parents[1] / "patches").glob("*.patch"))
SITE = Path(vllm.__file__).parents[1]


def touched_files(patch: Path) -> list[str]:
    return [line.split()[1].split("/", 1)[1] for line in patch.read_text().splitlines()
            if line.startswith("+++ ")]


@pytest.mark.unit
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


@pytest.mark.ray
def test_stock_ray_backend_works_with_metal_key_once_patched(patched_vllm):
    env = {"PYTHONPATH": str(patched_vllm)}
    with LocalRayCluster([("127.0.0.32", {}), ("127.0.0.33", {"METAL": 1})], env=env) as c:
        out = scenarios.run("gen", c, "ray", env={**env, "VLLM_RAY_METAL_AUTO_RAY": "0",
                                                  "VLLM_HOST_IP": "127.0.0.1"}, timeout=420)
    res = out.ok()
    assert "RayMetalExecutor:" not in out.output  # vLLM's own executor worked
    assert "Paris" in res["text"]
    assert res["workers"][0]["host_ip"] == "127.0.0.33"
