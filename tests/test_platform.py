"""Plugin activation and configuration-time checks (no engine is started here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_ray_metal.testing.llm import config_error
from vllm_ray_metal.testing.models import tiny_llama

pytestmark = pytest.mark.unit

PROBE = "from vllm.platforms import current_platform as p; print(type(p).__module__, type(p).__name__)"


def run_probe(env_extra: dict[str, str]) -> str:
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_plugin_is_the_current_platform():
    assert run_probe({}) == "vllm_ray_metal.platform MLXPlatform"


def test_env_var_switches_plugin_off():
    fallback = run_probe({"VLLM_RAY_METAL_DISABLE": "1"})
    assert "MLXPlatform" not in fallback
    assert fallback.split()[1] in {"CpuPlatform", "UnspecifiedPlatform", "CudaPlatform"}


def test_platform_declares_ray_key_and_worker(model_dir):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    assert current_platform.ray_device_key == "METAL"
    cfg = EngineArgs(model=model_dir, max_model_len=512).create_engine_config()
    assert cfg.parallel_config.worker_cls == "vllm_ray_metal.engine.worker.MLXWorker"
    assert cfg.scheduler_config.async_scheduling is False
    assert cfg.cache_config.block_size == 16


def test_ray_key_is_overridable():
    probe = "from vllm.platforms import current_platform as p; print(p.ray_device_key)"
    env = {**os.environ, "VLLM_RAY_METAL_RAY_KEY": "mlx"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "mlx"


def test_missing_model_directory_fails_fast(tmp_path):
    missing = str(tmp_path / "no-such-model")
    msg = config_error(missing)
    assert missing in msg


def test_unsupported_architecture_names_supported_types(tmp_path, model_dir):
    from safetensors.numpy import save_file
    import numpy as np

    cfg = {"architectures": ["BloomForCausalLM"], "model_type": "bloom", "n_head": 4,
           "hidden_size": 64, "n_layer": 2, "vocab_size": 49152}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({"dummy": np.zeros(1, np.float32)}, str(tmp_path / "model.safetensors"))
    for f in Path(model_dir).glob("tokenizer*"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    msg = config_error(str(tmp_path))
    assert "not supported by the installed mlx-lm" in msg and "llama" in msg


@pytest.mark.parametrize("kw, needle", [
    ({"pipeline_parallel_size": 2, "async_scheduling": True}, "--async-scheduling"),
    ({"kv_cache_dtype": "fp8"}, "--kv-cache-dtype"),
    ({"enable_prompt_embeds": True}, "--enable-prompt-embeds"),
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2},
      "pipeline_parallel_size": 2}, "--tensor-parallel-size"),
    ({"tensor_parallel_size": 3, "decode_context_parallel_size": 3},
     "--decode-context-parallel-size"),
])
def test_unsupported_settings_are_rejected_with_the_flag(model_dir, kw, needle):
    msg = config_error(model_dir, max_model_len=512, **kw)
    assert needle in msg


@pytest.mark.parametrize("spec, needle", [
    ({"method": "draft_model", "num_speculative_tokens": 2}, "same vocabulary size"),
    ({"method": "draft_model", "num_speculative_tokens": 2, "model": "/nonexistent/draft"},
     "/nonexistent/draft"),
    ({"method": "eagle", "num_speculative_tokens": 2}, "'draft_model'"),
    ({"method": "medusa", "num_speculative_tokens": 2}, "method"),
    ({"method": "bogus", "num_speculative_tokens": 2}, "method"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
      "prompt_lookup_max": 2}, "prompt_lookup_m"),
    ({"method": "ngram", "num_speculative_tokens": 2, "rejection_sample_method": "block"},
     "rejection_sample_method"),
])
def test_bad_speculative_configs_fail_at_configuration_naming_the_field(
        model_dir, spec, needle, tmp_path_factory):
    if spec["method"] in ("draft_model", "eagle") and "model" not in spec:
        # a draft with another vocabulary (the tiny llama's 32,000 tokens, not 49,152)
        spec = {**spec, "model": tiny_llama(tmp_path_factory.mktemp("other-vocab") / "m",
                                            model_dir, vocab_size=32000)}
    msg = config_error(model_dir, max_model_len=512, speculative_config=spec)
    assert needle in msg, msg


def test_our_variables_are_known_to_vllms_environment_check(monkeypatch):
    """The platform registers envs.py's variables, so vLLM's strict check accepts them
    (and still rejects a misspelt one)."""
    from vllm.platforms import current_platform

    from vllm_ray_metal import envs

    for name in envs.BY_NAME:
        monkeypatch.setenv(name, "")
    current_platform.validate_environ(hard_fail=True)
    monkeypatch.setenv("VLLM_RAY_METAL_RAY_KYE", "x")
    with pytest.raises(ValueError, match="VLLM_RAY_METAL_RAY_KYE"):
        current_platform.validate_environ(hard_fail=True)
