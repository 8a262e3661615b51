"""The embedded default model directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_ray_metal import default_model

pytestmark = pytest.mark.unit


def test_default_model_is_a_fp32_hf_directory(model_dir):
    path = Path(model_dir)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_attention_heads"] == 9 and cfg["num_key_value_heads"] == 3
    assert "quantization_config" not in cfg and cfg["rope_theta"] == 100000.0
    assert (path / "model.safetensors").stat().st_size > 400e6  # 135M params in fp32
    assert (path / "tokenizer.json").is_file()


def test_default_model_is_reused_and_cli_prints_it(model_dir):
    before = (Path(model_dir) / "model.safetensors").stat().st_mtime
    assert default_model() == model_dir
    out = subprocess.run([sys.executable, "-m", "vllm_ray_metal.cli", "default-model"],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == model_dir
    assert (Path(model_dir) / "model.safetensors").stat().st_mtime == before
