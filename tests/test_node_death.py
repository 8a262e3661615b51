"""Node death while `vllm serve` answers (issue 5): stop the raylet that hosts the MLX worker.

vLLM's convention (vllm/entrypoints/launchers/launcher.py, ``terminate_if_errored``): when the
engine dies, in-flight requests get an error, ``/health`` answers 503, and the API server
exits unless ``VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1``. Each step must happen within a bound and
every process the test started (server, engine core, raylets, the worker) must be gone.
"""

from __future__ import annotations

import threading
import time
import urllib.error

import psutil
import pytest

from ray_cluster import LocalRayCluster, _running
from serve_helpers import ServeProcess, health, post, stream

BOUND_S = 60


def _inflight(base: str, streaming: bool, first_token: threading.Event, out: dict) -> None:
    """A long greedy request; records how it ended and when."""
    body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 400,
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


def test_worker_node_death_errors_requests_reports_health_and_exits(model_dir, tmp_path):
    cluster = LocalRayCluster([("127.0.0.54", {}), ("127.0.0.55", {"METAL": 1})])
    server = None
    try:
        cluster.start()
        server = ServeProcess(cluster, model_dir, tmp_path / "serve.log", "--max-model-len",
                              "512", "--kv-cache-memory-bytes", str(32 << 20))
        server.wait_healthy()
        cluster._record_pids()  # now including the MLX worker actor on 127.0.0.55
        worker_node = cluster.nodes[1]
        first = threading.Event()
        results = [{} for _ in range(3)]
        threads = [threading.Thread(target=_inflight, args=(server.base, i < 2, first, r))
                   for i, r in enumerate(results)]
        for t in threads:
            t.start()
        assert first.wait(120), "no token streamed before the fault"
        time.sleep(1.0)

        killed = time.monotonic()
        worker_node.proc.terminate()  # `ray start --block` of the worker node: the node stops
        statuses: list[tuple[float, int | None]] = []
        while server.proc.poll() is None and time.monotonic() - killed < BOUND_S + 30:
            statuses.append((time.monotonic() - killed, health(server.base, timeout=2)))
            time.sleep(0.2)
        exited = time.monotonic() - killed
        for t in threads:
            t.join(timeout=30)

        outcomes = [r.get("outcome") for r in results]
        to_error = [r["t"] - killed for r in results if "t" in r]
        first_bad = next((t for t, s in statuses if s != 200), None)
        print(f"node death: outcomes={outcomes} time_to_error_s={[round(x, 1) for x in to_error]}"
              f" health_not_200_after_s={first_bad} health_codes={sorted({s for _, s in statuses}, key=str)}"
              f" server_exit_s={exited:.1f} rc={server.proc.returncode}")
        assert all(o and not o.startswith("finished") for o in outcomes), outcomes
        assert len(to_error) == 3 and max(to_error) < BOUND_S, to_error
        assert first_bad is not None and first_bad < BOUND_S, statuses[-5:]
        assert 503 in {s for _, s in statuses}, "/health never answered 503 before exit"
        assert server.proc.returncode is not None and exited < BOUND_S, "server kept running"
        # nothing left running by itself: the server's children (engine core) and every
        # process of the stopped node, before our teardown would kill stragglers
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (server.alive_pids() or _alive(worker_node.pids)):
            time.sleep(0.5)
        leftovers = server.alive_pids() + _alive(worker_node.pids)
        assert not leftovers, [psutil.Process(p).cmdline() for p in leftovers]
    finally:
        if server is not None:
            server.stop()
        cluster.stop()


def _alive(pids: set[int]) -> list[int]:
    return [p for p in pids if _running(p)]
