"""200 concurrent requests against `vllm serve` through RayMetalExecutor (issue 5, load).

Mixed prompt lengths, max_tokens, endpoints, streaming and not, temperature 0. Every request
must complete exactly once with the greedy output of the same request run alone on the same
server, and a deliberately small KV budget must make the scheduler preempt (not fail).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from vllm_ray_metal.testing.serve import metric, post, stream

pytestmark = pytest.mark.serve

N_REQUESTS = 200
SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Mountains rise above the valley where farmers grow wheat and barley.",
    "A small robot learned to paint pictures of the ocean at sunset.",
    "Scientists measured the speed of light with a rotating mirror.",
]
QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2 plus 2?",
             "Write one word about the sea.", "Who wrote Hamlet?"]


def combos() -> list[dict]:
    """20 distinct requests: 10 completions with prompts of ~15-75 tokens, 10 chats."""
    out = []
    for i in range(10):
        text = " ".join(SENTENCES[(i + j) % 4] for j in range(1 + i // 2))
        out.append({"path": "/v1/completions", "max_tokens": 4 + i,
                    "body": {"prompt": f"Story {i}: {text} Then"}})
    for i in range(10):
        context = " ".join(SENTENCES[j % 4] for j in range(i % 3))
        out.append({"path": "/v1/chat/completions", "max_tokens": 16 - 2 * (i % 6),
                    "body": {"messages": [{"role": "user",
                                           "content": f"{context} {QUESTIONS[i % 5]}".strip()}]}})
    return out


def body(combo: dict) -> dict:
    return {"model": "smollm2", "temperature": 0, "max_tokens": combo["max_tokens"],
            **combo["body"]}


def run(base: str, combo: dict, streaming: bool) -> dict:
    """One request; its id, text, finish reason and completion token count."""
    url = base + combo["path"]
    chat = "chat" in combo["path"]
    if not streaming:
        res = post(url, body(combo), timeout=400)
        choice = res["choices"][0]
        return {"id": res["id"], "finish": choice["finish_reason"],
                "text": choice["message"]["content"] if chat else choice["text"],
                "tokens": res["usage"]["completion_tokens"]}
    ids, parts, finish, tokens = set(), [], None, None
    for event in stream(url, {**body(combo), "stream_options": {"include_usage": True}},
                        timeout=400):
        ids.add(event["id"])
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        for choice in event["choices"]:
            parts.append((choice.get("delta", {}).get("content") if chat else choice["text"])
                         or "")
            finish = choice.get("finish_reason") or finish
    assert len(ids) == 1, ids  # every chunk of one stream carries the same request id
    return {"id": ids.pop(), "finish": finish, "text": "".join(parts), "tokens": tokens}


def test_200_concurrent_requests_equal_solo_runs_with_preemption(server):
    # the shared server's 32 MiB of KV cache (~720 tokens) holds one max_model_len
    # request, far below what 200 concurrent requests want: the scheduler has to preempt
    base = server.base
    log_start = server.log.stat().st_size  # other modules' requests came before
    requests = combos()
    solo = [run(base, combo, streaming=False) for combo in requests]  # one at a time
    assert all(r["tokens"] > 0 for r in solo)
    served_before = metric(base, "vllm:request_success_total")
    preempted_before = metric(base, "vllm:num_preemptions_total")

    plan = [(i % len(requests), (i // len(requests)) % 2 == 1) for i in range(N_REQUESTS)]
    started = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=N_REQUESTS)
    try:
        futures = [pool.submit(run, base, requests[k], streaming) for k, streaming in plan]
        results = [f.result() for f in futures]  # raises if any request failed
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # a failure must not wait for the rest
    elapsed = time.perf_counter() - started

    assert len({r["id"] for r in results}) == N_REQUESTS  # no duplicated request
    served = metric(base, "vllm:request_success_total") - served_before
    assert served == N_REQUESTS  # none lost, none served twice
    mismatches = [(i, k, streaming, results[i]["text"], solo[k]["text"])
                  for i, (k, streaming) in enumerate(plan)
                  if (results[i]["text"], results[i]["finish"], results[i]["tokens"])
                  != (solo[k]["text"], solo[k]["finish"], solo[k]["tokens"])]
    assert not mismatches, mismatches[:5]
    preemptions = metric(base, "vllm:num_preemptions_total") - preempted_before
    tokens = sum(r["tokens"] for r in results)
    print(f"load: {N_REQUESTS} requests, {tokens} tokens in {elapsed:.1f}s, "
          f"{preemptions:.0f} preemptions")
    assert preemptions > 0
    with open(server.log, errors="replace") as log:
        log.seek(log_start)
        assert "Traceback" not in log.read()
