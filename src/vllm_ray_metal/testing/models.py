"""Small models and references for tests and benchmarks: random-weight llamas in Hugging
Face format, chat prompts as token ids, and transformers' greedy decoding."""

from __future__ import annotations

import shutil
from pathlib import Path

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain in one sentence what a CPU does.",
]


def chat_token_ids(model: str, prompts: list[str]) -> list[list[int]]:
    """Chat-templated prompt token ids, computed with transformers' tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    out = []
    for p in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": p}],
                                       add_generation_prompt=True, tokenize=False)
        out.append(tok(text, add_special_tokens=False)["input_ids"])
    return out


def tiny_llama(path: str | Path, model_dir: str, heads: int = 8, kv_heads: int = 4,
               layers: int = 4, hidden: int = 256, seed: int = 0,
               vocab_size: int = 49152) -> str:
    """A random-weight llama in HF format (tokenizer borrowed from ``model_dir``); reused
    if ``path`` already holds one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if (path / "config.json").is_file():
        return str(path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=2048,
                      tie_word_embeddings=True, initializer_range=0.2, rope_theta=10000.0,
                      bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(str(path), safe_serialization=True)
    for f in Path(model_dir).iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja",):
            shutil.copy(f, path / f.name)
    return str(path)


def layer_subset(path: str | Path, model_dir: str, keep: list[int]) -> str:
    """``model_dir`` with only the decoder layers ``keep`` (in order; same embeddings, final
    norm and tokenizer): a smaller model of the same family that skips layers, the draft
    of self-speculative decoding; reused if ``path`` already holds one."""
    import json

    from safetensors.numpy import load_file, save_file

    path = Path(path)
    if (path / "config.json").is_file():
        return str(path)
    path.mkdir(parents=True, exist_ok=True)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config["num_hidden_layers"] = len(keep)
    new_index = {old: new for new, old in enumerate(keep)}
    weights = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        for name, array in load_file(str(f)).items():
            parts = name.split(".")
            if "layers" in parts:
                at = parts.index("layers") + 1
                if int(parts[at]) not in new_index:
                    continue
                parts[at] = str(new_index[int(parts[at])])
            weights[".".join(parts)] = array
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for f in Path(model_dir).iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja",
                                                         "generation_config.json"):
            shutil.copy(f, path / f.name)
    return str(path)


def hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    """Plain argmax decoding with transformers' KV cache (no EOS handling, like ignore_eos)."""
    import torch

    out: list[int] = []
    past, inputs = None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            res = hf_model(inputs, past_key_values=past, use_cache=True)
            past = res.past_key_values
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            inputs = torch.tensor([[tok]])
    return out


def hf_model(model_dir: str):
    """The transformers model on the same weights, in eval mode (the independent reference)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def mlx_llama(family: str = "llama", norm_weights_seed: int | None = None, **overrides):
    """A tiny mlx-lm model built in memory (random weights): 2 layers, hidden 64, 4 heads /
    2 KV heads, vocabulary 97. ``norm_weights_seed`` gives the norms non-trivial weights."""
    import importlib

    import mlx.core as mx
    import numpy as np

    module = importlib.import_module(f"mlx_lm.models.{family}")
    args = dict(model_type=family, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                vocab_size=97, tie_word_embeddings=False)
    if family == "qwen3":  # keeps head_dim as a local only; q_norm/k_norm on heads
        args.update(max_position_embeddings=512, head_dim=16, rope_theta=10000.0)
    model = module.Model(module.ModelArgs(**{**args, **overrides}))
    if norm_weights_seed is not None:
        rng = np.random.default_rng(norm_weights_seed)
        width = model.args.hidden_size
        for layer in model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight = mx.array(rng.uniform(0.5, 1.5, width).astype(np.float32))
    mx.eval(model.parameters())
    return model
