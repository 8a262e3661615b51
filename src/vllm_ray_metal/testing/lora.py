"""LoRA adapters made here with non-zero weights, in PEFT's and mlx-lm's formats, and their
independent references (transformers + PEFT, mlx-lm with the adapter)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EVERY = ATTENTION + ["gate_proj", "up_proj", "down_proj"]


def peft_adapter(path: str | Path, model_dir: str, rank: int = 8, alpha: float = 16.0,
                 targets: list[str] | None = None, rslora: bool = False, seed: int = 0,
                 size: float = 0.02) -> str:
    """A PEFT LoRA adapter for ``model_dir`` with random A and B (B's entries of ``size``:
    a visible but not destructive change); reused if ``path`` holds one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if (path / "adapter_config.json").is_file():
        return str(path)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets or EVERY,
                        use_rslora=rslora, init_lora_weights=False, lora_dropout=0.0)
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * size)
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def mlx_lm_adapter(path: str | Path, model_dir: str, rank: int = 4, scale: float = 4.0,
                   num_layers: int = 16, seed: int = 1, size: float = 0.02) -> str:
    """An mlx-lm LoRA adapter (``adapters.safetensors``) made with mlx-lm's own LoRA layers
    on the last ``num_layers`` layers, with non-zero ``lora_b``."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    path = Path(path)
    if (path / "adapter_config.json").is_file():
        return str(path)
    path.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    model, _ = load(model_dir)
    model.freeze()
    params = {"rank": rank, "scale": scale, "dropout": 0.0}
    linear_to_lora_layers(model, num_layers, params)
    weights = {}
    for name, value in tree_flatten(model.trainable_parameters()):
        if name.endswith("lora_b"):
            value = mx.random.normal(value.shape) * size
        weights[name] = value
    mx.save_safetensors(str(path / "adapters.safetensors"), weights)
    (path / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params}))
    return str(path)


def peft_greedy(model_dir: str, adapter: str, prompts: list[list[int]], n: int) -> list[list[int]]:
    """transformers + PEFT greedy tokens (the reference for PEFT adapters)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from vllm_ray_metal.testing.models import hf_greedy

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    return [hf_greedy(model, ids, n) for ids in prompts]


def mlx_lm_greedy(model_dir: str, adapter: str, prompts: list[list[int]], n: int) -> list[list[int]]:
    """mlx-lm's own greedy decoding with the adapter loaded by mlx-lm (fp32), in a fresh
    process: MLX binds its BLAS when first imported, and a test process has long imported
    it on MLX's bundled one (the CPU room's library, when tuning is on, is loaded first)."""
    code = ("import json, sys\n"
            "from vllm_ray_metal import cpu\n"
            "cpu.preload()\n"
            "from vllm_ray_metal.testing.lora import _mlx_lm_greedy\n"
            "print(json.dumps(_mlx_lm_greedy(*json.loads(sys.stdin.read()))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         input=json.dumps([model_dir, adapter, prompts, n]), timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"mlx-lm reference failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mlx_lm_greedy(model_dir: str, adapter: str, prompts: list[list[int]],
                   n: int) -> list[list[int]]:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(model_dir, adapter_path=adapter)
    model.set_dtype(mx.float32)
    out = []
    for ids in prompts:
        tokens = []
        for token, _ in generate_step(mx.array(ids), model, max_tokens=n,
                                      sampler=lambda logits: mx.argmax(logits, axis=-1)):
            tokens.append(int(token))
        out.append(tokens)
    return out
