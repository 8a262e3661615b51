"""Where a model's files are on this machine: a directory, or a Hugging Face hub snapshot.

vLLM hands every worker the model as the front-end saw it: a hub id (``org/name``), or,
with ``HF_HUB_OFFLINE=1``, the front-end machine's own snapshot path. Each Mac resolves
either to its own cache, so Macs need not share a home directory or an ``HF_HOME``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name
# a snapshot inside any Hugging Face cache: .../models--org--name/snapshots/<revision>
SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<rev>[^/]+)/?$")
# what mlx-lm loads; other weight formats in a repository (.bin, .pth, .gguf) are not fetched
FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py"]


def offline() -> bool:
    """``HF_HUB_OFFLINE``, read now: vLLM hands workers the front-end's environment after
    huggingface_hub was imported (which reads its variables once)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def cache_dir() -> str:
    """The hub cache ``HF_HUB_CACHE`` / ``HF_HOME`` name now (see :func:`offline`)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return os.path.join(home, "hub")


def local_path(model: str, revision: str | None = None) -> Path:
    """The directory on this machine to load ``model`` from."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    snapshot = SNAPSHOT.search(model)
    if snapshot:  # another machine's cache path for this revision
        return _snapshot(f"{snapshot['org']}/{snapshot['name']}", snapshot["rev"], model)
    if REPO_ID.match(model):
        return _snapshot(model, revision, model)
    return path


def _snapshot(repo: str, revision: str | None, asked: str) -> Path:
    """This machine's complete snapshot: from the cache, else downloaded (online)."""
    from huggingface_hub import snapshot_download

    try:
        cached = Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir(),
                                        local_files_only=True))
    except Exception as exc:  # nothing of it in this machine's cache
        cached, why = None, str(exc)
    else:
        why = f"{cached} lacks weight files"
    if cached is not None and complete(cached):
        return cached
    if offline():
        raise ValueError(_missing(asked, repo, why))
    return Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir(),
                                  allow_patterns=FILES))


def complete(path: Path) -> bool:
    """Whether a snapshot holds its config and every safetensors shard its index names."""
    if not (path / "config.json").is_file():
        return False
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        return bool(shards) and all((path / s).is_file() for s in shards)
    return any(path.glob("*.safetensors"))


def _missing(asked: str, repo: str, why: str) -> str:
    return (f"{asked!r} is not (completely) in this machine's Hugging Face cache ({why}), "
            f"and HF_HUB_OFFLINE=1 forbids downloading it: run `hf download {repo}` on "
            "this machine first, or unset HF_HUB_OFFLINE.")
