"""Where a model's files are on this machine: directories, hub ids, other machines' paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_ray_metal.engine import hub

pytestmark = pytest.mark.unit
REPO = "smol-org/SmolLM2-135M-Instruct"
REV = "0123456789abcdef0123456789abcdef01234567"


def cache(tmp_path, model_dir: str, files=None) -> Path:
    """A Hugging Face cache under tmp_path/hf holding ``files`` of the default model."""
    repo = tmp_path / "hf" / "hub" / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / REV
    snapshot.mkdir(parents=True)
    for f in Path(model_dir).iterdir():
        if files is None or f.name in files:
            (snapshot / f.name).symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    return snapshot


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))


def test_a_directory_is_itself(model_dir):
    assert hub.local_path(model_dir) == Path(model_dir)


def test_hub_id_and_another_machines_snapshot_path_resolve_here(offline, tmp_path, model_dir):
    here = cache(tmp_path, model_dir)
    assert hub.local_path(REPO) == here
    # what vLLM hands workers offline: the front-end's own snapshot path
    theirs = f"/Users/alice/.cache/huggingface/hub/models--smol-org--SmolLM2-135M-Instruct/" \
             f"snapshots/{REV}"
    assert hub.local_path(theirs) == here


def test_offline_and_incomplete_names_the_fix(offline, tmp_path, model_dir):
    cache(tmp_path, model_dir, files={"config.json"})  # vLLM fetched the config only
    with pytest.raises(ValueError) as info:
        hub.local_path(REPO)
    assert f"hf download {REPO}" in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)


def test_online_an_incomplete_cache_is_completed(monkeypatch, tmp_path, model_dir):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    partial = cache(tmp_path, model_dir, files={"config.json"})
    calls = []

    def download(repo, revision=None, cache_dir=None, local_files_only=False,
                 allow_patterns=None):
        assert cache_dir == str(tmp_path / "hf" / "hub")
        calls.append((repo, revision, local_files_only, allow_patterns))
        return str(partial)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert hub.local_path(REPO, "v2") == partial
    assert calls[0][2] is True and calls[1][:3] == (REPO, "v2", False)  # cache, then fetch
    assert "*.safetensors" in calls[1][3] and "*.bin" not in calls[1][3]
