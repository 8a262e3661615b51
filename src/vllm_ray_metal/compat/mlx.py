"""Every touch-point with MLX and mlx-lm beyond their documented API, in one place.

Pinned: ``mlx==0.32.4``, ``mlx-lm==0.32.2``. Model code stays in mlx-lm; these are the
loader pieces, helpers and class names the package adapts to. ``tests/compat/test_compat_mlx.py``
calls each on a tiny input.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pkgutil
import tempfile
from pathlib import Path
from typing import Any

MLX_VERSION = "0.32"
MLX_LM_VERSION = "0.32"

# mlx_lm.models modules that are helpers, not model families
_NOT_FAMILIES = {"base", "cache", "rope_utils", "activations", "switch_layers"}


def model_remapping() -> dict[str, str]:
    """``mlx_lm.utils.MODEL_REMAPPING``: model_type -> the mlx-lm module serving it."""
    from mlx_lm.utils import MODEL_REMAPPING

    return dict(MODEL_REMAPPING)


def family_module_name(model_type: str) -> str:
    return model_remapping().get(model_type, model_type)


def family_exists(model_type: str) -> bool:
    """Whether the installed mlx-lm has a module for this ``model_type``."""
    name = family_module_name(model_type)
    return bool(name) and importlib.util.find_spec(f"mlx_lm.models.{name}") is not None


def family_module(model_type: str):
    """The mlx-lm module whose ``Model`` class serves ``model_type``."""
    return importlib.import_module(f"mlx_lm.models.{family_module_name(model_type)}")


def supported_model_types() -> list[str]:
    import mlx_lm.models

    return sorted(m.name for m in pkgutil.iter_modules(mlx_lm.models.__path__)
                  if not m.name.startswith("_") and m.name not in _NOT_FAMILIES)


def load_model(path: str | Path, lazy: bool) -> Any:
    """``mlx_lm.utils.load_model``: the model from a local directory (``lazy``: unread)."""
    from mlx_lm.utils import load_model as mlx_load_model

    model, _ = mlx_load_model(Path(path), lazy=lazy)
    return model


def create_attention_mask(h: Any, cache: Any) -> Any:
    """``mlx_lm.models.base.create_attention_mask``: what a decoder stack passes its layers."""
    from mlx_lm.models.base import create_attention_mask as mlx_mask

    return mlx_mask(h, cache)


def compiled_swiglu() -> Any:
    """``mlx_lm.models.activations.swiglu``: the shapeless compiled SwiGLU MLPs call."""
    from mlx_lm.models.activations import swiglu

    return swiglu


def single_call_rope_classes() -> tuple[type, ...]:
    """Rope classes whose call is exactly ``mx.fast.rope(x, self.dims, ...)``:
    ``nn.RoPE`` and mlx-lm's ``rope_utils.Llama3RoPE`` / ``ProportionalRoPE``."""
    import mlx.nn as nn
    from mlx_lm.models import rope_utils

    names = ("Llama3RoPE", "ProportionalRoPE")
    return (nn.RoPE, *(getattr(rope_utils, n) for n in names if hasattr(rope_utils, n)))


def column_sharded_linear() -> type:
    """``mlx.nn.layers.distributed.AllToShardedLinear`` (a local product forward)."""
    from mlx.nn.layers.distributed import AllToShardedLinear

    return AllToShardedLinear


def row_sharded_linears() -> tuple[type, ...]:
    """The layers ``Model.shard`` makes that all-reduce their output over ``.group``."""
    import mlx.nn as nn

    return (nn.ShardedToAllLinear, nn.QuantizedShardedToAllLinear)


def linear_layout(module: Any) -> tuple[str, int, int]:
    """(kind, input features, output features) of a (sharded, quantized) linear layer,
    this rank's share: kind ``column`` (``AllToSharded*``: output sharded), ``row``
    (``ShardedToAll*``: input sharded, output all-reduced) or ``plain``."""
    import mlx.nn as nn
    from mlx.nn.layers import distributed

    out_dims, in_dims = module.weight.shape
    if "scales" in module:  # packed: 32 // bits values per uint32
        in_dims = in_dims * 32 // module.bits
    if isinstance(module, (distributed.AllToShardedLinear,
                           distributed.QuantizedAllToShardedLinear)):
        return "column", in_dims, out_dims
    if isinstance(module, row_sharded_linears()):
        return "row", in_dims, out_dims
    if isinstance(module, (nn.Linear, nn.QuantizedLinear)):
        return "plain", in_dims, out_dims
    raise TypeError(f"{type(module).__name__} is not a linear layer LoRA can wrap")


def row_sharded_partial(module: Any, x: Any) -> Any:
    """A ``ShardedToAll*`` layer's local product, before its all-reduce (its ``__call__``
    up to ``all_sum``)."""
    import mlx.core as mx

    if "scales" in module:
        return mx.quantized_matmul(x, module["weight"], scales=module["scales"],
                                   biases=module.get("biases"), transpose=True,
                                   group_size=module.group_size, bits=module.bits,
                                   mode=module.mode)
    return x @ module["weight"].T


def row_sharded_finish(module: Any, partial: Any) -> Any:
    """The rest of a ``ShardedToAll*`` layer's ``__call__``: all-reduce, then its bias."""
    import mlx.core as mx

    y = mx.distributed.all_sum(partial, group=module.group)
    return y + module["bias"] if "bias" in module else y


def init_ring_group(hosts: list[str], rank: int, backend: str) -> Any:
    """``mx.distributed.init`` over explicit peers, without ``mlx.launch``.

    MLX reads its peers from a JSON hostfile named by ``MLX_HOSTFILE`` (one list of
    "ip:port" per rank) and this process's rank from ``MLX_RANK``.
    """
    import mlx.core as mx

    fd, path = tempfile.mkstemp(prefix=f"mlx-hosts-{rank}-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump([[h] for h in hosts], f)
    os.environ["MLX_HOSTFILE"] = path
    os.environ["MLX_RANK"] = str(rank)
    try:
        return mx.distributed.init(backend=backend, strict=True)
    finally:
        os.unlink(path)


def kernel_cache_dir() -> Path:
    """Where MLX's CPU backend builds and caches compiled kernels (``<tmp>/mlx``).

    MLX uses ``std::filesystem::temp_directory_path()``; both it and Python read TMPDIR
    first (they differ only in how they order TMP and TEMP when TMPDIR is unset).
    """
    return Path(tempfile.gettempdir()) / "mlx"
