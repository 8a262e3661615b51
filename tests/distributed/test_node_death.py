"""Node death while `vllm serve` answers (issue 5): stop the raylet that hosts the MLX worker.

vLLM's convention (vllm/entrypoints/launchers/launcher.py, ``terminate_if_errored``): when the
engine dies, in-flight requests get an error and the API server exits, unless
``VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1``: then it stays up, ``/health`` answers 503 and new
requests fail. Each step must happen within a bound, and no process the test started
(server, engine core, raylets, the MLX worker) may be left running.
"""

from __future__ import annotations

import threading
import time
import urllib.error

import psutil
import pytest

from vllm_ray_metal.testing.cluster import LocalRayCluster, running
from vllm_ray_metal.testing.serve import ServeProcess, health, post, post_error, stream

BOUND_S = 90  # Ray drains a SIGTERMed node for up to 30 s; the rest is ours


def _inflight(base: str, streaming: bool, first_token: threading.Event, out: dict) -> None:
    """A long greedy request; records how it ended and when."""
    # outlives Ray's 30 s drain unless each request decodes faster than 50 tok/s
    body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 1500,
            "temperature": 0, "ignore_eos": True}
    try:
        if streaming:
            for event in stream(base + "/v1/completions", body, timeout=300):
                if "error" in event:
                    out["outcome"] = f"error event: {event['error']}"
                    break
                first_token.set()
                if event["choices"] and event["choices"][0].get("finish_reason"):
                    out["outcome"] = "finished " + event["choices"][0]["finish_reason"]
            else:
                out.setdefault("outcome", "stream ended without finish_reason")
        else:
            res = post(base + "/v1/completions", body, timeout=300)
            out["outcome"] = "finished " + res["choices"][0]["finish_reason"]
    except urllib.error.HTTPError as exc:
        out["outcome"] = f"HTTP {exc.code}: {exc.read().decode(errors='replace')[:300]}"
    except Exception as exc:  # connection reset/closed by a dying server is an error too
        out["outcome"] = f"{type(exc).__name__}: {exc}"
    out["t"] = time.monotonic()


def _worker_actor_pids(node) -> list[int]:
    """The MLX worker actor(s) a node hosts (Ray titles them after the actor class)."""
    out = []
    for pid in node.pids:
        try:
            if "MetalRayWorker" in " ".join(psutil.Process(pid).cmdline()):
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.serve
@pytest.mark.parametrize("mode", ["drain", "crash"])
def test_worker_node_death_errors_requests_reports_health(mode, model_dir, tmp_path):
    """drain: SIGTERM to the node's `ray start --block` (Ray drains up to 30 s, then stops
    the node); default vLLM settings, so the server must exit.
    crash: SIGKILL to the node's raylet; ``VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1``, so the
    server must stay up, answer /health 503 and fail new requests fast."""
    keep_alive = mode == "crash"
    cluster = LocalRayCluster([("127.0.0.54", {}), ("127.0.0.55", {"METAL": 1})])
    server = None
    try:
        cluster.start()
        server = ServeProcess(cluster, model_dir, tmp_path / "serve.log", "--max-model-len",
                              "2048", "--kv-cache-memory-bytes", str(256 << 20),
                              env={"VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "1"} if keep_alive else {})
        server.wait_healthy()
        cluster._record_pids()  # now including the MLX worker actor on 127.0.0.55
        worker_node = cluster.nodes[1]
        actors = _worker_actor_pids(worker_node)
        assert len(actors) == 1, "no MLX worker actor found on the worker node"
        first = threading.Event()
        results = [{} for _ in range(3)]
        threads = [threading.Thread(target=_inflight, args=(server.base, i < 2, first, r))
                   for i, r in enumerate(results)]
        for t in threads:
            t.start()
        assert first.wait(120), "no token streamed before the fault"
        time.sleep(1.0)

        killed = time.monotonic()
        if mode == "drain":
            worker_node.proc.terminate()  # the node's `ray start --block`: the node stops
        else:
            raylet = [p for p in psutil.Process(worker_node.proc.pid).children(recursive=True)
                      if p.name() == "raylet"]
            assert len(raylet) == 1
            raylet[0].kill()
        statuses: list[tuple[float, int | None]] = []
        while server.proc.poll() is None and time.monotonic() - killed < BOUND_S + 30:
            statuses.append((time.monotonic() - killed, health(server.base, timeout=2)))
            if keep_alive and statuses[-1][1] == 503 and all("t" in r for r in results):
                break
            time.sleep(0.2)
        for t in threads:
            t.join(timeout=30)

        outcomes = [r.get("outcome") for r in results]
        to_error = [r["t"] - killed for r in results if "t" in r]
        first_bad = next((t for t, s in statuses if s != 200), None)
        exited = time.monotonic() - killed if server.proc.poll() is not None else None
        print(f"node death ({mode}): outcomes={outcomes} time_to_error_s="
              f"{[round(x, 1) for x in to_error]} health_not_200_after_s={first_bad} "
              f"health_codes={sorted({s for _, s in statuses}, key=str)} server_exit_s={exited}")
        assert all(o and not o.startswith("finished") for o in outcomes), outcomes
        assert len(to_error) == 3 and max(to_error) < BOUND_S, to_error
        assert first_bad is not None and first_bad < BOUND_S, statuses[-5:]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _alive(set(actors)):
            time.sleep(0.5)
        assert not _alive(set(actors)), "the MLX worker outlived its node"
        if keep_alive:
            assert server.proc.poll() is None and 503 in {s for _, s in statuses}
            t0 = time.perf_counter()
            code, text = post_error(server.base + "/v1/completions",
                                    {"model": "smollm2", "prompt": "hi", "max_tokens": 2})
            print(f"node death ({mode}): new request -> HTTP {code} in "
                  f"{time.perf_counter() - t0:.2f}s")
            assert code >= 500 and time.perf_counter() - t0 < 10, (code, text)
            server.stop()
        else:
            assert exited is not None and exited < BOUND_S, "server kept running"
        # nothing left running by itself: the server's children (engine core) and, after
        # a drain, every process of the stopped node, before our teardown kills stragglers
        node_pids = worker_node.pids if mode == "drain" else set()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (server.alive_pids() or _alive(node_pids)):
            time.sleep(0.5)
        leftovers = server.alive_pids() + _alive(node_pids)
        assert not leftovers, [_cmdline(p) for p in leftovers]
    finally:
        if server is not None:
            server.stop()
        cluster.stop()
    every = server.pids.union(*(n.pids for n in cluster.nodes))
    assert not _alive(every), [_cmdline(p) for p in _alive(every)]


def _alive(pids: set[int]) -> list[int]:
    return [p for p in pids if running(p)]


def _cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())[:200]
    except psutil.NoSuchProcess:
        return str(pid)
