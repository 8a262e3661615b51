"""Shared fixtures, and the rule that every test says what it needs (a marker).

vLLM start-up is the slow part, so engines and clusters are shared per module. Helpers
live in ``vllm_ray_metal.testing`` (also used by the benchmarks), not in test files.

The full run (tests/run_suite.py) spreads the suite over two pytest-xdist workers by
group: a test's group is its module, or the shared session fixture its module uses, so a
module's fixtures (and their loopback addresses) and a shared cluster or server live in
one worker. Groups run longest kind first. (xdist's own ``loadgroup`` cannot: it renames
node ids, which pytest 9.2 no longer allows; so the workers write each test's group to a
file, and :func:`pytest_xdist_make_scheduler` schedules by it.)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from vllm_ray_metal.testing import scenarios
from vllm_ray_metal.testing.cluster import LocalRayCluster
from vllm_ray_metal.testing.models import CHAT_PROMPTS, chat_token_ids, tiny_llama

TESTS = Path(__file__).resolve().parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Test clusters live on loopback addresses only. Ray 2.60 turns on token auth for a head
# node once ~/.ray/auth_token exists (any local ray.init() may create it) while joining
# nodes default to off; pin one mode for every raylet and driver the tests start.
os.environ["RAY_AUTH_MODE"] = "disabled"

KINDS = ("unit", "engine", "ray", "serve", "bench")  # what a test starts; exactly one each


# Session fixtures shared by several modules, closed after their last test (not at the
# end of the suite: idle raylets and servers take CPU from every test after them).
SHARED = ("four_units", "server")
# the order groups run in: a shared fixture's modules, then by what a module starts
ORDER = (*SHARED, "bench", "ray", "serve", "engine", "unit")


GROUPS_ENV = "RAY_METAL_TESTS_GROUPS"  # the workers' {node id: group} (VLLM_* are checked)


def pytest_configure(config) -> None:
    if not hasattr(config, "workerinput"):  # the controller (or a run without workers)
        os.environ[GROUPS_ENV] = os.path.join(tempfile.mkdtemp(prefix="vrm-groups-"),
                                              "groups.json")


def pytest_unconfigure(config) -> None:
    if not hasattr(config, "workerinput"):
        shutil.rmtree(os.path.dirname(os.environ.pop(GROUPS_ENV)), ignore_errors=True)


def pytest_xdist_make_scheduler(config, log):
    """xdist's module scopes, with each module's group as its scope."""
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:
                with open(os.environ[GROUPS_ENV]) as f:
                    self.groups = json.load(f)
            return self.groups[nodeid]

    return ByGroup(config, log)


@pytest.hookimpl(trylast=True)  # after -m / -k deselection: the last user must be run
def pytest_collection_modifyitems(config, items) -> None:
    unmarked = [item.nodeid for item in items
                if sum(item.get_closest_marker(k) is not None for k in KINDS) != 1]
    if unmarked:
        raise pytest.UsageError(f"each test needs exactly one of the markers {KINDS}: "
                                + ", ".join(unmarked))
    shared = {item.module: name for name in reversed(SHARED) for item in items
              if name in item.fixturenames}
    group = {item.nodeid: shared.get(item.module, item.nodeid.split("::")[0])
             for item in items}
    rank: dict[str, int] = {}  # a group's rank: the first of ORDER any of its tests is
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        name = group[item.nodeid]
        kinds = [ORDER.index(k) for k in KINDS if item.get_closest_marker(k)]
        rank[name] = min(rank.get(name, len(ORDER)), *kinds,
                         ORDER.index(name) if name in SHARED else len(ORDER))
        first.setdefault(name, i)
    items.sort(key=lambda item: (rank[group[item.nodeid]], first[group[item.nodeid]]))
    if os.environ.get("PYTEST_XDIST_WORKER") and GROUPS_ENV in os.environ:
        written = os.environ[GROUPS_ENV] + "." + os.environ["PYTEST_XDIST_WORKER"]
        with open(written, "w") as f:
            json.dump(group, f)
        os.replace(written, os.environ[GROUPS_ENV])  # every worker writes the same
    for name in SHARED:
        users = [item for item in items if name in item.fixturenames]
        if users:
            _last_user[name] = users[-1].nodeid


_last_user: dict[str, str] = {}
_closers: dict[str, object] = {}


def pytest_runtest_teardown(item, nextitem) -> None:
    for name, last in _last_user.items():
        if item.nodeid == last and name in _closers:
            _closers.pop(name)()


@pytest.fixture(scope="session")
def close_after_last_use():
    """``close_after_last_use(name, close)``: call ``close`` after the last test that uses
    the fixture ``name`` (one of SHARED); ``close`` must be safe to call again."""
    def register(name: str, close) -> None:
        assert name in SHARED, name
        _closers[name] = close
    return register


@pytest.fixture(scope="session")
def four_units(close_after_last_use):
    """Four raylets with one METAL unit each (the head too): every rank gets its own
    address. The TP, PP and DP modules share it (a cluster start costs a minute here)."""
    with LocalRayCluster.one_unit_each(12, 13, 14, 15).start(timeout=240) as c:
        close_after_last_use("four_units", c.stop)
        yield c


TINY_TOKENS = 32


@pytest.fixture(scope="session")
def tiny_adapters(tiny, tmp_path_factory) -> list[list]:
    """[name, id, path] of two LoRA adapters on the tiny model: PEFT's format (every
    projection) and mlx-lm's (its last two layers)."""
    from vllm_ray_metal.testing import lora

    where = tmp_path_factory.mktemp("tiny-lora")
    return [["peft", 1, lora.peft_adapter(where / "peft", tiny, size=0.3)],
            ["mlx", 2, lora.mlx_lm_adapter(where / "mlx", tiny, num_layers=2, size=0.3)]]


@pytest.fixture(scope="session")
def tiny_jobs(prompts, model_dir, tiny_adapters) -> list[dict]:
    """What the multi-rank equality tests run on the tiny model: the chat prompts, the same
    under JSON schemas (None: unconstrained), two prompts of ~2k tokens, and the chat
    prompts twice over, on the two LoRA adapters and the base model in one batch."""
    from transformers import AutoTokenizer

    from vllm_ray_metal.testing.structured import PERSON, TAGS, WEATHER

    cycle = [WEATHER, None, PERSON, TAGS]
    text = (TESTS.parent / "README.md").read_text()
    ids = AutoTokenizer.from_pretrained(model_dir)(text, add_special_tokens=False)["input_ids"]
    return [{"prompts": prompts, "max_tokens": TINY_TOKENS},
            {"prompts": prompts, "max_tokens": TINY_TOKENS,
             "json_schemas": [cycle[i % 4] for i in range(len(prompts))]},
            {"prompts": [ids[:1950], ids[500:2000]], "max_tokens": TINY_TOKENS},
            {"prompts": prompts * 2, "max_tokens": TINY_TOKENS,
             "loras": [(tiny_adapters + [None])[i % 3] for i in range(2 * len(prompts))]}]


@pytest.fixture(scope="session")
def tiny_llm() -> dict:
    """LLM arguments for :func:`tiny_jobs`: long enough for the 2k prompts, which run
    chunked (in pieces, on the KV mirror); LoRA on, two adapter slots."""
    return {"max_model_len": 2048, "max_num_batched_tokens": 1024, "enable_lora": True,
            "max_loras": 2, "max_lora_rank": 8}


@pytest.fixture(scope="session")
def tiny_tp1(four_units, tiny, tiny_jobs, tiny_llm) -> dict:
    """TP=1's tokens for :func:`tiny_jobs` (``result["jobs"]``), the reference of every
    TP, PP and DP equality test on the tiny model."""
    return scenarios.run("gen", four_units, "class", {
        "model": tiny, "jobs": tiny_jobs, "llm": tiny_llm}).ok()


@pytest.fixture(scope="session")
def model_dir() -> str:
    from vllm_ray_metal import default_model

    return default_model()


@pytest.fixture(scope="session")
def prompts(model_dir) -> list[list[int]]:
    """The chat prompts as token ids (shared by the multi-rank equality tests)."""
    return chat_token_ids(model_dir, CHAT_PROMPTS)


@pytest.fixture(scope="session")
def tiny(model_dir, tmp_path_factory) -> str:
    """A random llama in HF format with 8 heads / 4 KV heads (TP 2 and 4 divide it)."""
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "llama-8h-4kv", model_dir)


@pytest.fixture(scope="session")
def tiny_5_layers(model_dir, tmp_path_factory) -> str:
    """The same llama with 5 layers: vLLM splits them unevenly ([3, 2] over two stages)."""
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "llama-5l", model_dir, layers=5)


@pytest.fixture(scope="session")
def hf_reference(model_dir):
    """transformers on the default model's weights: the independent reference."""
    from vllm_ray_metal.testing.models import hf_model

    return hf_model(model_dir)
