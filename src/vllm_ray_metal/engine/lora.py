"""LoRA adapters in the MLX runner: per-row low-rank deltas over the base projections.

The base weights are never merged with an adapter, so one forward can mix requests on
different adapters and on the base model. Every targeted projection is wrapped by a
:class:`LoRAProjection` that holds ``max_loras + 1`` slots of stacked adapter matrices
(slot 0 stays zero: the base model); a forward's rows name their slot and the delta
``(x @ A[slot]) @ B[slot]`` is one product per row group (MLX's ``gather_mm`` when rows
use different slots). Scales are folded into ``B`` when an adapter is read.

Adapters are read in two formats: PEFT's (``adapter_config.json`` +
``adapter_model.safetensors``) and mlx-lm's (``adapter_config.json`` +
``adapters.safetensors``). Tensor parallel shards an adapter like the layer it wraps: a
column-sharded projection keeps its columns of ``B``, a row-sharded one its rows of ``A``
and adds its partial delta before the layer's all-reduce (no extra collective).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from vllm_ray_metal.compat import mlx as compat_mlx

logger = logging.getLogger(f"vllm.{__name__}")

# projections an adapter may target (what vLLM supports for llama-style decoders)
TARGETS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
           "mlp": ("gate_proj", "up_proj", "down_proj")}
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(\w+)\.(\w+)\.lora_([AaBb])(?:\.weight)?$")


@dataclass(frozen=True)
class Target:
    """One projection of the base model an adapter may wrap (on this rank)."""

    layer: int  # global decoder layer number
    path: str  # e.g. "self_attn.q_proj"
    kind: str  # "plain", "column" (output sharded) or "row" (input sharded, all-reduced)
    in_full: int
    out_full: int
    tp_rank: int
    tp_size: int

    def share(self, a: mx.array, b: mx.array) -> tuple[mx.array, mx.array]:
        """This rank's part of full-size A and B: the rows of A a row-sharded layer reads,
        the columns of B a column-sharded one writes."""
        if self.kind == "row":
            part = self.in_full // self.tp_size
            a = a[self.tp_rank * part:(self.tp_rank + 1) * part]
        elif self.kind == "column":
            part = self.out_full // self.tp_size
            b = b[:, self.tp_rank * part:(self.tp_rank + 1) * part]
        return a, b


@dataclass
class Adapter:
    """An adapter read from disk, this rank's share: {(layer, path): (A [in, r], B [r, out])}."""

    lora_id: int
    name: str
    path: str
    rank: int
    weights: dict[tuple[int, str], tuple[mx.array, mx.array]] = field(repr=False)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def describe_targets(model: nn.Module, first_layer: int = 0, tp_rank: int = 0,
                     tp_size: int = 1) -> list[tuple[nn.Module, str, Target]]:
    """Every LoRA-able projection of ``model``'s decoder layers: (parent, attribute, target).

    Called on the loaded (and sharded) model before any CPU wrapper hides the layer types.
    ``tp_rank`` / ``tp_size``: this rank's place among the ranks that shard a layer (with
    pipeline stages a row-sharded layer's group is the global one, not its shards').
    """
    out = []
    for i, layer in enumerate(model.model.layers):
        for block, names in TARGETS.items():
            parent = getattr(layer, block, None)
            for name in names:
                module = getattr(parent, name, None) if parent is not None else None
                if module is None or "weight" not in module:
                    continue
                kind, in_dims, out_dims = compat_mlx.linear_layout(module)
                if kind == "plain":
                    rank, size = 0, 1
                else:
                    rank, size = tp_rank, tp_size
                in_full = in_dims * size if kind == "row" else in_dims
                out_full = out_dims * size if kind == "column" else out_dims
                out.append((parent, name, Target(first_layer + i, f"{block}.{name}", kind,
                                                 in_full, out_full, rank, size)))
    return out


# ---- reading adapters --------------------------------------------------------------
def read_adapter(lora_id: int, name: str, path: str, max_rank: int,
                 targets: dict[tuple[int, str], Target], num_layers: int,
                 dtype: mx.Dtype) -> Adapter:
    """Read and check an adapter directory (PEFT or mlx-lm format); raise ``ValueError``
    naming the problem and the fix."""
    where = Path(path).expanduser()
    label = f"LoRA adapter {name!r} ({path})"
    if not where.is_dir():
        raise ValueError(f"{label}: no such directory. Give the directory that holds "
                         "adapter_config.json and the adapter's safetensors file.")
    cfg_file = where / "adapter_config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{label}: adapter_config.json is missing (PEFT and mlx-lm both "
                         "write one next to the weights).")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{label}: adapter_config.json is not valid JSON ({e})") from None
    if (where / "adapter_model.safetensors").is_file():
        rank, scale, tensors = _peft(label, config, where / "adapter_model.safetensors")
    elif (where / "adapters.safetensors").is_file():
        rank, scale, tensors = _mlx_lm(label, config, where / "adapters.safetensors")
    else:
        hint = " (adapter_model.bin: save it with safe_serialization=True)" if \
            (where / "adapter_model.bin").is_file() else ""
        raise ValueError(f"{label}: no adapter_model.safetensors (PEFT) or "
                         f"adapters.safetensors (mlx-lm) found{hint}.")
    rank = max([rank] + [a.shape[1] for a, _ in tensors.values() if a is not None])
    if rank > max_rank:
        raise ValueError(f"{label}: rank {rank} is above --max-lora-rank {max_rank}; "
                         f"restart with --max-lora-rank {rank} or more.")
    weights: dict[tuple[int, str], tuple[mx.array, mx.array]] = {}
    for key, (a, b) in tensors.items():
        layer, module = key
        if layer >= num_layers:
            raise ValueError(f"{label}: layer {layer} does not exist (the base model has "
                             f"{num_layers} layers): the adapter was made for another model.")
        if module.split(".")[-1] not in {n for ns in TARGETS.values() for n in ns}:
            raise ValueError(f"{label}: target module {module!r} is not supported; LoRA "
                             "here covers " + ", ".join(n for ns in TARGETS.values()
                                                        for n in ns) + ".")
        if a is None or b is None:
            raise ValueError(f"{label}: layer {layer} {module} has only one of its two "
                             "LoRA matrices.")
        target = targets.get(key)
        if target is None:
            continue  # a layer another pipeline stage runs
        if a.shape[0] != target.in_full or b.shape[1] != target.out_full:
            raise ValueError(
                f"{label}: layer {layer} {module} maps {a.shape[0]} -> {b.shape[1]} "
                f"features, the base model's {target.in_full} -> {target.out_full}: the "
                "adapter was trained on another base model.")
        weights[key] = target.share(a.astype(dtype), (b * scale).astype(dtype))
    if not tensors:
        raise ValueError(f"{label}: the weights file holds no LoRA matrices.")
    return Adapter(lora_id, name, str(where), rank, weights)


def _load(label: str, file: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(file))
    except Exception as e:  # noqa: BLE001 (MLX raises RuntimeError/ValueError alike)
        raise ValueError(f"{label}: cannot read {file.name}: {e}") from None


def _pairs(label: str, raw: dict[str, mx.array], transpose: bool) -> dict:
    """{(layer, "block.name"): [A [in, r], B [r, out]]} from a weights file's keys."""
    out: dict[tuple[int, str], list] = {}
    for key, value in raw.items():
        m = _KEY.search(key)
        if m is None:
            raise ValueError(f"{label}: weight {key!r} is not a decoder projection's LoRA "
                             "matrix (embedding, lm_head and modules_to_save are not "
                             "supported).")
        layer, block, name, which = int(m[1]), m[2], m[3], m[4].upper()
        pair = out.setdefault((layer, f"{block}.{name}"), [None, None])
        pair[0 if which == "A" else 1] = value.T if transpose else value
    return out


def _peft(label: str, config: dict, file: Path):
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{label}: peft_type {config.get('peft_type')!r} is not LoRA.")
    for key, what in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out layers")):
        if config.get(key):
            raise ValueError(f"{label}: {what} adapters are not supported.")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if config.get(key):
            raise ValueError(f"{label}: {key} is not supported; train with one rank and "
                             "alpha for every module, and no modules_to_save.")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{label}: adapters with trained biases (bias="
                         f"{config['bias']!r}) are not supported.")
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    tensors = _pairs(label, _load(label, file), transpose=True)  # A [r, in], B [out, r]
    return rank, scale, {k: tuple(v) for k, v in tensors.items()}


def _mlx_lm(label: str, config: dict, file: Path):
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise ValueError(f"{label}: mlx-lm fine_tune_type {kind!r} is not supported (LoRA "
                         "only; fuse a DoRA or full fine-tune with `mlx_lm.fuse` instead).")
    params = config.get("lora_parameters") or {}
    if "rank" not in params or "scale" not in params:
        raise ValueError(f"{label}: adapter_config.json needs lora_parameters.rank and "
                         ".scale (mlx-lm's format).")
    tensors = _pairs(label, _load(label, file), transpose=False)  # A [in, r], B [r, out]
    return int(params["rank"]), float(params["scale"]), {k: tuple(v) for k, v in tensors.items()}


# ---- the model side ----------------------------------------------------------------
class RowSlots:
    """Which adapter slot each row of the current forward uses (shared by all wrappers).

    ``rows`` is None when no row uses an adapter, an int when all rows use one slot, else
    an int32 array with one slot per row.
    """

    rows: int | mx.array | None = None

    def set(self, slots: list[int]) -> None:
        if not any(slots):
            self.rows = None
        elif len(set(slots)) == 1:
            self.rows = slots[0]
        else:
            self.rows = mx.array(slots, dtype=mx.uint32)


class LoRAProjection(nn.Module):
    """A base projection plus the delta of each row's adapter slot."""

    def __init__(self, base: nn.Module, target: Target, slots: int, max_rank: int,
                 dtype: mx.Dtype, rows: RowSlots) -> None:
        super().__init__()
        self.base = base
        self.target = target
        n = target.tp_size
        in_local = target.in_full // n if target.kind == "row" else target.in_full
        out_local = target.out_full // n if target.kind == "column" else target.out_full
        self.lora_a = mx.zeros((slots + 1, in_local, max_rank), dtype=dtype)
        self.lora_b = mx.zeros((slots + 1, max_rank, out_local), dtype=dtype)
        object.__setattr__(self, "_rows", rows)  # not a child module

    def load_slot(self, slot: int, a: mx.array | None, b: mx.array | None) -> None:
        """Put an adapter's matrices, this rank's share (None: zeros), in ``slot``."""
        self.lora_a[slot] = 0
        self.lora_b[slot] = 0
        if a is None:
            return
        r = a.shape[1]
        self.lora_a[slot, :, :r] = a
        self.lora_b[slot, :r, :] = b

    def _delta(self, x: mx.array, rows) -> mx.array:
        if isinstance(rows, int):
            return (x @ self.lora_a[rows]) @ self.lora_b[rows]
        return mx.gather_mm(mx.gather_mm(x, self.lora_a, None, rows), self.lora_b, None, rows)

    def __call__(self, x: mx.array) -> mx.array:
        rows = self._rows.rows
        if self.target.kind != "row":
            y = self.base(x)
            return y if rows is None else y + self._delta(x, rows).astype(y.dtype)
        # row-sharded: this rank's partial product and partial delta, then one all-reduce
        y = compat_mlx.row_sharded_partial(self.base, x)
        if rows is not None:
            y = y + self._delta(x, rows).astype(y.dtype)
        return compat_mlx.row_sharded_finish(self.base, y)


class LoRASlots:
    """The adapters of one worker: read ones (at most ``max_cpu_loras``, least recently used
    first out unless pinned) and active ones (``max_loras`` slots in the model)."""

    def __init__(self, model: nn.Module, lora_config, dtype: mx.Dtype, first_layer: int,
                 num_layers: int, tp_rank: int = 0, tp_size: int = 1) -> None:
        self.max_loras = lora_config.max_loras
        self.max_rank = lora_config.max_lora_rank
        self.max_cpu = max(lora_config.max_cpu_loras or self.max_loras, self.max_loras)
        self.dtype = dtype
        self.num_layers = num_layers
        self.rows = RowSlots()
        self.wrappers: dict[tuple[int, str], LoRAProjection] = {}
        self.targets: dict[tuple[int, str], Target] = {}
        self._pending = describe_targets(model, first_layer, tp_rank, tp_size)  # for wrap()
        for _, _, target in self._pending:
            self.targets[(target.layer, target.path)] = target
        self.read: OrderedDict[int, Adapter] = OrderedDict()  # lora id -> adapter, LRU order
        self.pinned: set[int] = set()
        self.slot_of: dict[int, int] = {}  # active lora id -> slot (1..max_loras)

    def wrap(self) -> int:
        """Wrap every target projection (after the CPU room's wrappers); how many."""
        for parent, name, target in self._pending:
            wrapper = LoRAProjection(getattr(parent, name), target, self.max_loras,
                                     self.max_rank, self.dtype, self.rows)
            setattr(parent, name, wrapper)
            self.wrappers[(target.layer, target.path)] = wrapper
        self._pending = []
        mx.eval([(w.lora_a, w.lora_b) for w in self.wrappers.values()])
        return len(self.wrappers)

    @property
    def cache_bytes(self) -> int:
        """Memory the read adapters may take: ``max_cpu_loras`` adapters of the largest
        size a slot holds (on a Mac the same memory as the KV cache's)."""
        return self.max_cpu * sum(w.lora_a[0].nbytes + w.lora_b[0].nbytes
                                  for w in self.wrappers.values())

    # ---- the worker's LoRA calls ----------------------------------------------------
    def add(self, lora_request, keep: frozenset[int] = frozenset()) -> bool:
        """Read (and check) an adapter; False if it was read already. When all places are
        taken, the least recently used adapter not pinned and not in ``keep`` (the
        adapters of the step being run) makes room."""
        lora_id = lora_request.lora_int_id
        if lora_id in self.read and not getattr(lora_request, "load_inplace", False):
            self.read.move_to_end(lora_id)
            return False
        adapter = read_adapter(lora_id, lora_request.lora_name, lora_request.lora_path,
                               self.max_rank, self.targets, self.num_layers, self.dtype)
        mx.eval([w for pair in adapter.weights.values() for w in pair])
        self.remove(lora_id)  # a reload in place: the old weights go once the new are read
        while len(self.read) >= self.max_cpu:
            victim = next((i for i in self.read if i not in self.pinned and i not in keep),
                          None)
            if victim is None:
                raise ValueError(f"Cannot keep LoRA adapter {adapter.name!r}: all "
                                 f"{self.max_cpu} adapter places (--max-cpu-loras) are "
                                 "pinned or in use; raise --max-cpu-loras or unpin one.")
            self.remove(victim)
        self.read[lora_id] = adapter
        logger.info("LoRA adapter %r (id %d) read: rank %d, %d projections, %.1f MiB",
                    adapter.name, lora_id, adapter.rank, len(adapter.weights),
                    adapter.nbytes / 2**20)
        return True

    def remove(self, lora_id: int) -> bool:
        if lora_id not in self.read:
            return False
        del self.read[lora_id]
        self.pinned.discard(lora_id)
        slot = self.slot_of.pop(lora_id, None)
        if slot is not None:
            for w in self.wrappers.values():
                w.load_slot(slot, None, None)
        return True

    def pin(self, lora_id: int) -> bool:
        if lora_id not in self.read:
            raise ValueError(f"LoRA adapter id {lora_id} is not loaded; add it first.")
        self.pinned.add(lora_id)
        return True

    def ids(self) -> set[int]:
        return set(self.read)

    # ---- per step ---------------------------------------------------------------------
    def activate(self, lora_requests: dict[int, object]) -> None:
        """Give every adapter of this step a slot (reading it first if needed)."""
        changed = False
        for lora_id, request in lora_requests.items():
            if lora_id in self.slot_of:
                continue
            if lora_id not in self.read:
                self.add(request, keep=frozenset(lora_requests))
            used = set(self.slot_of.values())
            free = [s for s in range(1, self.max_loras + 1) if s not in used]
            if not free:  # evict an active adapter this step does not use
                victim = next(i for i in self.slot_of if i not in lora_requests)
                free = [self.slot_of.pop(victim)]
            adapter, slot = self.read[lora_id], free[0]
            for key, w in self.wrappers.items():
                w.load_slot(slot, *adapter.weights.get(key, (None, None)))
            self.slot_of[lora_id] = slot
            changed = True
        if changed:  # every slot written this step, in one evaluation
            mx.eval([(w.lora_a, w.lora_b) for w in self.wrappers.values()])
        for lora_id in lora_requests:
            self.read.move_to_end(lora_id)

    def set_rows(self, lora_ids: list[int]) -> None:
        """The slots of the next forward's rows (lora id 0: the base model)."""
        self.rows.set([self.slot_of[i] if i else 0 for i in lora_ids])
