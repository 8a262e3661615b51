"""The checkpoints Macs run: mlx-community-style 4-bit (and 8-bit) with bf16 scales.

Made here with ``mlx_lm.convert -q --dtype bfloat16``; config.json then says bfloat16 (as
mlx-community's do), so vLLM runs bf16 activations. Reference: raw mlx-lm (its model, its
own KV cache, argmax) on the same directory in the same dtype. The model is the tiny
llama (8 heads / 4 KV heads, SmolLM2's tokenizer): bf16 arithmetic on MLX's CPU backend is
far too slow here for the default model (it is native on Metal).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from vllm_ray_metal.testing import scenarios
from vllm_ray_metal.testing.cluster import LocalRayCluster
from vllm_ray_metal.testing.llm import make_llm, shutdown_llm

NEW_TOKENS = 16


def convert(source: str, target: Path, bits: int) -> str:
    """``mlx_lm convert -q --q-bits BITS --dtype bfloat16``, then config.json's dtype set
    to what the weights are, as mlx-community's say (convert keeps the source's float32,
    under transformers' old and new key)."""
    if not (target / "config.json").is_file():
        from mlx_lm import convert as mlx_convert

        mlx_convert(source, str(target), quantize=True, q_bits=bits, q_group_size=64,
                    dtype="bfloat16")
    cfg_file = target / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
    cfg_file.write_text(json.dumps(cfg, indent=2))
    assert cfg["quantization"]["bits"] == bits
    return str(target)


def mlx_lm_greedy(model_dir: str, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Raw mlx-lm: ``load`` and ``generate_step`` (its prompt cache, its argmax sampler); no
    vllm-ray-metal code involved."""
    from mlx_lm import load

    model, _ = load(model_dir)
    return [raw_greedy(model, ids, n) for ids in prompts]


def raw_greedy(model, ids: list[int], n: int) -> list[int]:
    """mlx-lm's ``generate_step``: its prefill projects only the last position onto the
    vocabulary (bf16 projections are slow on MLX's CPU backend)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    return [int(tok) for tok, _ in generate_step(mx.array(ids), model, max_tokens=n)]


@pytest.fixture(scope="module")
def checkpoints(tiny, tmp_path_factory) -> dict[int, str]:
    root = tmp_path_factory.mktemp("quantized")
    return {bits: convert(tiny, root / f"tiny-{bits}bit-bf16", bits) for bits in (4, 8)}


@pytest.mark.engine
def test_quantized_bf16_checkpoint_equals_raw_mlx_lm(checkpoints, prompts):
    path = checkpoints[4]  # what mlx-community publishes most (8 bits: the TP=2 test)
    llm = make_llm(path, max_model_len=512, kv_cache_memory_bytes=64 << 20)
    try:
        assert str(llm.llm_engine.model_config.dtype) == "torch.bfloat16"
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                            SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS,
                                           ignore_eos=True), use_tqdm=False)
    finally:
        shutdown_llm(llm)
    ours = [list(o.outputs[0].token_ids) for o in outs]
    assert len(prompts) >= 4
    assert ours == mlx_lm_greedy(path, prompts, NEW_TOKENS)


RAW_TP = """
import json, sys
import mlx.core as mx
from vllm_ray_metal.compat import mlx as compat_mlx
from mlx_lm.generate import generate_step
from vllm_ray_metal.testing.scenarios import report

path, rank, hosts, prompts, n = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), \
    json.loads(sys.argv[4]), int(sys.argv[5])
group = compat_mlx.init_ring_group(hosts, rank, "ring")
model = compat_mlx.load_model(path, lazy=True)
model.shard(group)  # mlx-lm's own tensor parallelism
mx.eval(model.parameters())
out = [[int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=n)]
       for ids in prompts]
report({"rank": rank, "outputs": out})
"""


def mlx_lm_tp_greedy(path: str, prompts: list[list[int]], n: int, tp: int) -> list[list[int]]:
    """Raw mlx-lm at TP=``tp``: ``Model.shard`` over an MLX ring of ``tp`` processes."""
    import subprocess
    import sys

    from vllm_ray_metal.testing.cluster import free_port

    hosts = json.dumps([f"127.0.0.1:{free_port()}" for _ in range(tp)])
    procs = [subprocess.Popen([sys.executable, "-c", RAW_TP, path, str(r), hosts,
                               json.dumps(prompts), str(n)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(tp)]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    lines = [ln for out, _ in outs for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == tp, [err[-2000:] for _, err in outs]
    results = [json.loads(ln[len("RESULT "):]) for ln in lines]
    assert all(r["outputs"] == results[0]["outputs"] for r in results)  # ranks agree
    return results[0]["outputs"]


@pytest.mark.ray
def test_quantized_8bit_bf16_tp2_equals_raw_mlx_lm_tp2(checkpoints, prompts):
    """The same at 8 bits under TP=2, against mlx-lm's own sharded model: bf16 partial sums
    round differently from one rank's, so TP=1 is not the reference here."""
    path = checkpoints[8]
    want = mlx_lm_tp_greedy(path, prompts, NEW_TOKENS, tp=2)
    with LocalRayCluster.one_unit_each(96, 97) as c:
        res = scenarios.run("gen", c, "class", {"model": path, "prompts": prompts,
                                                 "max_tokens": NEW_TOKENS,
                                                 "llm": {"tensor_parallel_size": 2}}).ok()
    assert res["outputs"] == want
    assert [w["group_size"] for w in res["workers"]] == [2, 2]
