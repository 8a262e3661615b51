"""LoRA adapters through the MLX runner on the default model, against independent
references: transformers + PEFT for a PEFT adapter, mlx-lm with the adapter for an mlx-lm
one. (TP=2 = TP=1 with adapters: test_tensor_parallel.py; served: tests/serve/test_lora.py.)"""

from __future__ import annotations

import json
import shutil
import time

import pytest
from safetensors.numpy import load_file, save_file
from vllm import SamplingParams
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest

from vllm_ray_metal.testing import lora
from vllm_ray_metal.testing.llm import make_llm, shutdown_llm
from vllm_ray_metal.testing.models import CHAT_PROMPTS, chat_token_ids, tiny_llama

pytestmark = pytest.mark.engine
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


def test_adapters_equal_their_references(model_dir, prompts, adapters, alone):
    assert alone["peft"] == lora.peft_greedy(model_dir, adapters["peft"].lora_path, prompts,
                                             NEW_TOKENS)
    assert alone["rslora"] == lora.peft_greedy(model_dir, adapters["rslora"].lora_path,
                                               prompts, NEW_TOKENS)
    assert alone["mlx"] == lora.mlx_lm_greedy(model_dir, adapters["mlx"].lora_path, prompts,
                                              NEW_TOKENS)
    for name in adapters:  # each adapter changes what the model says
        assert sum(a != b for a, b in zip(alone[name], alone["base"])) >= 2, name


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
