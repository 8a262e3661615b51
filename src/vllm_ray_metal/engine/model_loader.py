"""Load a local Hugging Face-format checkpoint with mlx-lm, with errors that say what to do.

Model code stays in mlx-lm: we only resolve which mlx-lm module would serve a
``model_type`` (to fail at configuration time, before any process is spawned) and call
mlx-lm's loader (through ``compat.mlx``). The runner needs the decoder stack (``model.model``) and the
output projection separately so it can compute logits only for the positions it samples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from vllm_ray_metal.compat import mlx as compat_mlx
from vllm_ray_metal.engine import hub

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def check_model_dir(model: str, revision: str | None = None) -> dict[str, Any]:
    """Validate a model (directory or hub id) before vLLM starts workers; return its
    config.json."""
    path = hub.local_path(model, revision)
    if not path.is_dir():
        raise ValueError(
            f"Model directory {model!r} does not exist. vllm-ray-metal loads Hugging "
            "Face-format directories (config.json + *.safetensors) or hub ids (org/name); "
            "download or convert the model first, or run `vllm-ray-metal default-model` for "
            "the embedded SmolLM2-135M-Instruct.")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{model!r} has no config.json: it is not a Hugging Face-format "
                         "model directory.")
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"{model!r} has no *.safetensors weights (mlx-lm loads safetensors "
                         "only; convert .bin/.gguf weights first).")
    config = json.loads(cfg_file.read_text())
    model_type = config.get("model_type")
    try:
        module = compat_mlx.family_module(model_type or "")
    except ImportError:
        raise ValueError(
            f"Architecture {config.get('architectures')} (model_type={model_type!r}) is not "
            f"supported by the installed mlx-lm. Supported model types: "
            f"{', '.join(compat_mlx.supported_model_types())}.") from None
    if not hasattr(module, "Model"):
        raise ValueError(f"{module.__name__} defines no Model class")
    if config.get("sliding_window") and config.get("use_sliding_window", True) and \
            any(t == "sliding_attention" for t in config.get("layer_types") or []):
        raise ValueError(f"{model!r} uses sliding-window attention, which vllm-ray-metal does "
                         "not support yet; use a model with full attention in every layer.")
    return config


def model_module(model: str, revision: str | None = None):
    """The mlx-lm module that defines this checkpoint's Model class."""
    config = check_model_dir(model, revision)
    return compat_mlx.family_module(config["model_type"])


def load(model: str, dtype: str | None = None, group=None,
         revision: str | None = None) -> nn.Module:
    """Load weights with mlx-lm; shard over ``group`` (tensor parallel) and cast to ``dtype``.

    With a group the checkpoint is opened lazily and sharded before anything is read, so
    each rank materialises only its own slice of the weights.
    """
    check_model_dir(model, revision)
    mlx_model = compat_mlx.load_model(hub.local_path(model, revision), lazy=group is not None)
    if group is not None:
        mlx_model.shard(group)
    if dtype is not None:
        mlx_model.set_dtype(DTYPES[dtype])  # floating arrays only; packed weights keep theirs
    mx.eval(mlx_model.parameters())
    if not hasattr(mlx_model, "model") or not hasattr(mlx_model.model, "layers"):
        raise ValueError(f"mlx-lm's {type(mlx_model).__module__}.Model has no decoder stack "
                         "at .model.layers; this model family is not supported.")
    return mlx_model


def compute_logits(model: nn.Module, hidden: mx.array, group=None) -> mx.array:
    """Apply the output projection (tied embedding or ``lm_head``) to final hidden states.

    With a tensor-parallel ``group``, each rank projects onto its slice of the vocabulary
    and the slices are all-gathered: mlx-lm's ``shard`` leaves the output projection
    whole on every rank, and in decode it is one of the largest reads of a step (for
    SmolLM2, a fifth of the weights).
    """
    weight = _vocab_split_weight(model, group) if hidden.ndim == 2 else None
    if weight is not None:
        n, rows = group.size(), hidden.shape[0]
        part = weight.shape[0] // n
        local = hidden @ weight[group.rank() * part:(group.rank() + 1) * part].T  # [R, V/n]
        gathered = mx.distributed.all_gather(local, group=group)  # [n * R, V/n], rank order
        return gathered.reshape(n, rows, part).transpose(1, 0, 2).reshape(rows, n * part)
    if hasattr(model, "lm_head"):
        return model.lm_head(hidden)
    return model.model.embed_tokens.as_linear(hidden)


def splits_vocab(model: nn.Module, group) -> bool:
    """True if :func:`compute_logits` splits the output projection over ``group``."""
    return _vocab_split_weight(model, group) is not None


def _vocab_split_weight(model: nn.Module, group) -> mx.array | None:
    """The output matrix if it can be split by vocabulary over ``group``, else None."""
    if model is None or group is None or group.size() == 1:
        return None
    weight = _plain_output_weight(model)
    return weight if weight is not None and weight.shape[0] % group.size() == 0 else None


def _plain_output_weight(model: nn.Module) -> mx.array | None:
    """The [vocab, hidden] output matrix if it is a plain (unquantized, bias-free) one."""
    module = getattr(model, "lm_head", None)
    if module is None:
        module = getattr(getattr(model, "model", None), "embed_tokens", None)
    if type(module) not in (nn.Linear, nn.Embedding) or "bias" in module:
        return None
    return module.weight


def parameter_bytes(module, base_only: bool = False) -> int:
    """Bytes of the arrays held by a module (or a list of modules); ``base_only``: without
    LoRA adapter slots (``lora_a`` / ``lora_b``)."""
    from mlx.utils import tree_flatten

    params = [m.parameters() for m in module] if isinstance(module, list) else module.parameters()
    return sum(v.nbytes for k, v in tree_flatten(params)
               if not (base_only and k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")))
