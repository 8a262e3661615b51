"""LoRA adapters through the MLX runner on the default model, against independent
references: transformers + PEFT for a PEFT adapter, mlx-lm with the adapter for an mlx-lm
one. (TP=2 = TP=1 with adapters: test_tensor_parallel.py; served: tests/serve/test_serve_lora.py.)"""

from __future__ import annotations

import json
import shutil
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from vllm import SamplingParams
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest

from vllm_ray_metal.engine import lora as engine_lora
from vllm_ray_metal.testing import lora
from vllm_ray_metal.testing.llm import make_llm, shutdown_llm
from vllm_ray_metal.testing.models import CHAT_PROMPTS, chat_token_ids, tiny_llama

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory) -> dict[str, LoRARequest]:
    where = tmp_path_factory.mktemp("lora")
    return {
        "peft": LoRARequest("peft", 1, lora.peft_adapter(where / "peft", model_dir, size=0.15)),
        "mlx": LoRARequest("mlx", 2, lora.mlx_lm_adapter(where / "mlx", model_dir, size=0.08)),
        "rslora": LoRARequest("rslora", 3, lora.peft_adapter(
            where / "rslora", model_dir, rank=4, alpha=4.0, targets=lora.ATTENTION,
            rslora=True, seed=3, size=0.3)),
    }


@pytest.fixture(scope="module")
def llm(model_dir):
    # two slots for three adapters: the scheduler runs at most two per step, the runner
    # swaps slots between steps
    engine = make_llm(model_dir, enable_lora=True, max_loras=2, max_cpu_loras=3,
                      max_lora_rank=8, max_num_batched_tokens=256)
    yield engine
    shutdown_llm(engine)


@pytest.fixture(scope="module")
def prompts(model_dir) -> list[list[int]]:
    return chat_token_ids(model_dir, CHAT_PROMPTS)


def generate(llm, prompts, loras, n: int = NEW_TOKENS) -> list[list[int]]:
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True),
                        lora_request=loras, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def alone(llm, prompts, adapters) -> dict[str, list[list[int]]]:
    """Each adapter's tokens (and the base model's), one adapter per batch."""
    out = {"base": generate(llm, prompts, None)}
    for name, request in adapters.items():
        out[name] = generate(llm, prompts, request)
    return out


@pytest.mark.engine
def test_adapters_equal_their_references(model_dir, prompts, adapters, alone):
    assert alone["peft"] == lora.peft_greedy(model_dir, adapters["peft"].lora_path, prompts,
                                             NEW_TOKENS)
    assert alone["rslora"] == lora.peft_greedy(model_dir, adapters["rslora"].lora_path,
                                               prompts, NEW_TOKENS)
    assert alone["mlx"] == lora.mlx_lm_greedy(model_dir, adapters["mlx"].lora_path, prompts,
                                              NEW_TOKENS)
    for name in adapters:  # each adapter changes what the model says
        assert sum(a != b for a, b in zip(alone[name], alone["base"])) >= 2, name


@pytest.mark.engine
def test_a_batch_mixing_adapters_and_the_base_equals_each_alone(llm, prompts, adapters,
                                                                alone):
    names = ["peft", "mlx", None, "rslora"]
    rows = [(names[(i + j) % 4], p) for j, p in enumerate(prompts) for i in range(4)]
    got = generate(llm, [p for _, p in rows], [adapters[n] if n else None for n, _ in rows])
    want = [alone[n or "base"][prompts.index(p)] for n, p in rows]
    assert got == want


def _bad_adapters(model_dir, peft_dir, where) -> list[tuple[str, str]]:
    """(path, what the error must say) for adapters the engine must refuse."""
    cases = [(str(where / "missing"), "no such directory")]
    big = where / "rank16"  # above --max-lora-rank 8
    lora.peft_adapter(big, model_dir, rank=16, targets=["q_proj"])
    cases.append((str(big), "--max-lora-rank"))
    lacking = where / "lacking"  # a projection the model does not have
    shutil.copytree(peft_dir, lacking)
    tensors = load_file(str(lacking / "adapter_model.safetensors"))
    tensors = {k.replace("self_attn.q_proj", "self_attn.qkv_proj"): v for k, v in tensors.items()}
    save_file(tensors, str(lacking / "adapter_model.safetensors"))
    cases.append((str(lacking), "qkv_proj"))
    other = where / "other"  # made for another base model (hidden size 256, not 576)
    lora.peft_adapter(other, tiny_llama(where / "tiny", model_dir), targets=["q_proj"])
    cases.append((str(other), "another base model"))
    unread = where / "no-config"
    shutil.copytree(peft_dir, unread)
    (unread / "adapter_config.json").unlink()
    cases.append((str(unread), "adapter_config.json"))
    dora = where / "dora"
    shutil.copytree(peft_dir, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    cases.append((str(dora), "DoRA"))
    return cases


@pytest.mark.engine
def test_bad_adapters_fail_fast_naming_the_problem(llm, model_dir, prompts, adapters, alone,
                                                   tmp_path):
    for i, (path, needle) in enumerate(_bad_adapters(model_dir, adapters["peft"].lora_path,
                                                     tmp_path)):
        started = time.perf_counter()
        with pytest.raises(Exception) as err:
            generate(llm, prompts[:1], LoRARequest(f"bad{i}", 100 + i, path), n=2)
        assert needle in str(err.value), (path, str(err.value))
        assert time.perf_counter() - started < 5, path
    # nothing was lost: the engine still serves, adapters and base alike
    assert generate(llm, prompts[:2], [adapters["peft"], None]) == \
        [alone["peft"][0], alone["base"][1]]


@pytest.mark.engine
def test_run_time_add_pin_remove_and_lru(llm, prompts, adapters, alone):
    engine = llm.llm_engine
    for request in adapters.values():
        engine.add_lora(request)
    assert {r.lora_int_id for r in adapters.values()} <= set(engine.list_loras())
    assert engine.pin_lora(adapters["peft"].lora_int_id)
    # a fourth adapter with --max-cpu-loras 3: the least recently used unpinned one goes
    extra = LoRARequest("again", 4, adapters["mlx"].lora_path)
    engine.add_lora(extra)
    loaded = set(engine.list_loras())
    assert 4 in loaded and 1 in loaded and len(loaded) == 3
    assert generate(llm, prompts[:1], extra) == alone["mlx"][:1]
    assert engine.remove_lora(4)
    assert 4 not in set(engine.list_loras())
    # an evicted or removed adapter is read again when a request names it
    for name, request in adapters.items():
        assert generate(llm, prompts[:1], request) == alone[name][:1]


# ---- reading adapters and applying them (no engine) ----------------------------------
IN, OUT = 12, 10
TARGETS = {(0, "self_attn.q_proj"): engine_lora.Target(0, "self_attn.q_proj", "plain", IN,
                                                       OUT, 0, 1)}


def _write_peft(where, config: dict, a: np.ndarray, b: np.ndarray) -> str:
    where.mkdir()
    (where / "adapter_config.json").write_text(json.dumps(config))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b},
              str(where / "adapter_model.safetensors"))
    return str(where)


@pytest.mark.unit
@pytest.mark.parametrize("rslora, scale", [(False, 16 / 4), (True, 16 / 2)])
def test_peft_format_is_read_transposed_with_its_scale_in_b(tmp_path, rslora, scale):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, IN)).astype(np.float32), rng.normal(size=(OUT, 4)).astype(np.float32)
    path = _write_peft(tmp_path / "p", {"r": 4, "lora_alpha": 16, "use_rslora": rslora,
                                        "target_modules": ["q_proj"]}, a, b)
    got = engine_lora.read_adapter(1, "p", path, 8, TARGETS, 2, mx.float32)
    (got_a, got_b), = got.weights.values()
    assert got.rank == 4 and np.allclose(np.array(got_a), a.T)
    assert np.allclose(np.array(got_b), b.T * scale)


@pytest.mark.unit
def test_mlx_lm_format_uses_its_scale(tmp_path):
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(IN, 2)).astype(np.float32), rng.normal(size=(2, OUT)).astype(np.float32)
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 2,
         "lora_parameters": {"rank": 2, "scale": 3.0, "dropout": 0.0}}))
    save_file({"model.layers.0.self_attn.q_proj.lora_a": a,
               "model.layers.0.self_attn.q_proj.lora_b": b},
              str(tmp_path / "adapters.safetensors"))
    got = engine_lora.read_adapter(1, "m", str(tmp_path), 8, TARGETS, 2, mx.float32)
    (got_a, got_b), = got.weights.values()
    assert np.allclose(np.array(got_a), a) and np.allclose(np.array(got_b), 3.0 * b)


@pytest.mark.unit
@pytest.mark.parametrize("change, needle", [
    (lambda c, a, b: ({**c, "r": 16}, np.zeros((16, IN), np.float32),
                      np.zeros((OUT, 16), np.float32)), "--max-lora-rank 8"),
    (lambda c, a, b: (c, np.zeros((4, IN + 1), np.float32), b), "another base model"),
    (lambda c, a, b: ({**c, "modules_to_save": ["lm_head"]}, a, b), "modules_to_save"),
    (lambda c, a, b: ({**c, "bias": "all"}, a, b), "biases"),
])
def test_bad_peft_adapters_name_the_problem(tmp_path, change, needle):
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    path = _write_peft(tmp_path / "p", *change(config, np.zeros((4, IN), np.float32),
                                               np.zeros((OUT, 4), np.float32)))
    with pytest.raises(ValueError, match=needle.replace("-", r"\-")):
        engine_lora.read_adapter(1, "p", path, 8, TARGETS, 2, mx.float32)


@pytest.mark.unit
def test_rows_get_their_own_slot_and_slot_0_is_the_base():
    base = nn.Linear(IN, OUT)
    rows = engine_lora.RowSlots()
    wrapped = engine_lora.LoRAProjection(base, TARGETS[(0, "self_attn.q_proj")], 2, 4,
                                         mx.float32, rows)
    keys = mx.random.split(mx.random.key(2), 4)
    ab = [(mx.random.normal((IN, r), key=keys[2 * i]), mx.random.normal((r, OUT), key=keys[2 * i + 1]))
          for i, r in enumerate((4, 2))]
    for slot, (a, b) in enumerate(ab, start=1):
        wrapped.load_slot(slot, a, b)
    x = mx.random.normal((3, 5, IN), key=mx.random.key(3))
    want = [base(x[i]) + (x[i] @ a) @ b if a is not None else base(x[i])
            for i, (a, b) in enumerate([ab[1], (None, None), ab[0]])]
    rows.set([2, 0, 1])  # mixed: gathered per row
    assert mx.allclose(wrapped(x), mx.stack(want), atol=1e-4)
    rows.set([1, 1, 1])  # one slot for all rows: plain products
    assert mx.allclose(wrapped(x), base(x) + (x @ ab[0][0]) @ ab[0][1], atol=1e-4)
    rows.set([0, 0, 0])
    assert rows.rows is None and mx.array_equal(wrapped(x), base(x))


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["column", "row"])
def test_a_rank_keeps_its_share_of_an_adapter(kind):
    target = engine_lora.Target(0, "self_attn.o_proj", kind, 8, 6, 1, 2)  # rank 1 of 2
    a, b = mx.arange(16, dtype=mx.float32).reshape(8, 2), mx.arange(12, dtype=mx.float32).reshape(2, 6)
    got_a, got_b = target.share(a, b)
    if kind == "column":  # output columns 3..5 of B, all of A
        assert mx.array_equal(got_a, a) and mx.array_equal(got_b, b[:, 3:])
    else:  # input rows 4..7 of A, all of B
        assert mx.array_equal(got_a, a[4:]) and mx.array_equal(got_b, b)
    wrapped = engine_lora.LoRAProjection(nn.Linear(8, 6), target, 1, 2, mx.float32,
                                         engine_lora.RowSlots())
    wrapped.load_slot(1, got_a, got_b)  # the slot holds exactly the share
    assert mx.array_equal(wrapped.lora_a[1], got_a) and mx.array_equal(wrapped.lora_b[1], got_b)
