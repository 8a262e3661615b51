"""envs.py is the one place our variables are named, read and documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import vllm_ray_metal
from vllm_ray_metal import envs

pytestmark = pytest.mark.unit

SRC = Path(vllm_ray_metal.__file__).parent
README = Path(__file__).resolve().parents[1] / "README.md"
NAME = re.compile(r"VLLM_RAY_METAL_[A-Z0-9_]*[A-Z0-9]")


def test_every_variable_named_in_the_package_is_declared_and_used():
    named = {m for p in SRC.rglob("*.py") if p.name != "envs.py"
             for m in NAME.findall(p.read_text())}
    assert named - set(envs.BY_NAME) == set()  # nothing undeclared
    assert set(envs.BY_NAME) - named == set()  # nothing declared and never used


READ = re.compile(r"""(?:environ\.get|getenv)\(\s*["']VLLM_RAY_METAL_"""
                  r"""|environ\[\s*["']VLLM_RAY_METAL_\w+["']\s*\](?!\s*=[^=])""")


def test_only_envs_reads_our_variables_from_the_environment():
    reads = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py") if p.name != "envs.py"
             for i, line in enumerate(p.read_text().splitlines(), 1) if READ.search(line)]
    assert not reads, reads  # (writes, for processes we start, are fine)


def test_readme_documents_exactly_the_user_facing_variables():
    table = README.read_text().split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `(VLLM_RAY_METAL_\w+)`", table, re.M))
    public = {v.name for v in envs.VARIABLES if not v.internal}
    assert rows == public
    internal = {v.name for v in envs.VARIABLES if v.internal}
    assert all(name in table for name in internal)  # named where the table ends


def test_values_parse_and_bad_ones_name_the_variable(monkeypatch):
    monkeypatch.setenv("VLLM_RAY_METAL_PLACEMENT_TIMEOUT", "2.5")
    assert envs.VLLM_RAY_METAL_PLACEMENT_TIMEOUT == 2.5
    monkeypatch.setenv("VLLM_RAY_METAL_PLACEMENT_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="VLLM_RAY_METAL_PLACEMENT_TIMEOUT"):
        envs.VLLM_RAY_METAL_PLACEMENT_TIMEOUT
    monkeypatch.delenv("VLLM_RAY_METAL_PLACEMENT_TIMEOUT")
    assert envs.VLLM_RAY_METAL_PLACEMENT_TIMEOUT == 60.0
    for raw, want in (("", "1"), ("off", "0"), ("0", "0"), ("BLAS", "blas"), ("yes", "1")):
        monkeypatch.setenv("VLLM_RAY_METAL_CPU_TUNING", raw)
        assert envs.cpu_tuning() == want
    monkeypatch.setenv("VLLM_RAY_METAL_CPU_TUNING", "fast")
    with pytest.raises(ValueError, match="VLLM_RAY_METAL_CPU_TUNING"):
        envs.cpu_tuning()
    monkeypatch.setenv("VLLM_RAY_METAL_DISABLE", "1")
    assert envs.VLLM_RAY_METAL_DISABLE is True
    monkeypatch.setenv("VLLM_RAY_METAL_CACHE", "~/x")
    assert envs.cache_root() == Path("~/x").expanduser()
    with pytest.raises(AttributeError):
        envs.VLLM_RAY_METAL_NOT_A_VARIABLE


def test_worker_spec_travels_as_one_variable(monkeypatch):
    from vllm_ray_metal.engine.spec import WorkerSpec

    spec = WorkerSpec(mlx_hosts=["10.0.0.1:5000", "10.0.0.2:5001"], ranks_on_node=2,
                      ranks_on_host=4)
    (name, value), = spec.to_env().items()
    monkeypatch.setenv(name, value)
    assert WorkerSpec.from_env() == spec
    monkeypatch.delenv(name)
    assert WorkerSpec.from_env() == WorkerSpec()  # one rank alone
