"""RayMetalExecutor on live loopback clusters (no mocks of Ray).

Cluster: head 127.0.0.2 without the key, worker node 127.0.0.3 with METAL=1 — so a
worker that runs at all runs on the remote node. Each scenario is a fresh driver.
"""

from __future__ import annotations

import pytest

from vllm_ray_metal.distributed import cluster
from vllm_ray_metal.testing import scenarios
from vllm_ray_metal.testing.cluster import LocalRayCluster
from vllm_ray_metal.testing.models import chat_token_ids, hf_greedy


@pytest.fixture(scope="module")
def two_nodes():
    with LocalRayCluster([("127.0.0.2", {}), ("127.0.0.3", {"METAL": 1})]) as c:
        yield c


def run_scenario(c: LocalRayCluster, backend: str, env: dict | None = None,
                 timeout: float = 420) -> tuple[dict, str]:
    out = scenarios.run("gen", c, backend, env=env, timeout=timeout)
    return out.result, out.output


@pytest.fixture(scope="module")
def reference_tokens(model_dir, hf_reference) -> list[int]:
    """transformers' greedy tokens for the scenario's chat: what every backend must give
    (the scenario stops at EOS, so they are compared up to its length)."""
    (ids,) = chat_token_ids(model_dir, ["What is the capital of France?"])
    return hf_greedy(hf_reference, ids, 16)


@pytest.mark.ray
def test_stock_ray_executor_raises_keyerror_on_custom_key(two_nodes):
    """Documents the upstream bug this library exists for."""
    res, err = run_scenario(two_nodes, "stock")
    assert "error" in res
    assert "KeyError: 'METAL'" in err and "get_node_and_physical_gpu_ids" in err


@pytest.mark.ray
@pytest.mark.parametrize("backend", ["vllm_ray_metal.RayMetalExecutor", "ray", "auto"])
def test_qualname_ray_and_auto_selection(two_nodes, reference_tokens, backend):
    """Every way of choosing the executor places the worker on the remote node; the
    qualname run also sets VLLM_HOST_IP to an address no node has (works: workers use
    Ray's node address, and a warning names the mismatch)."""
    mismatch = backend.startswith("vllm_ray_metal")
    res, err = run_scenario(two_nodes, backend,
                            {"VLLM_HOST_IP": "127.0.0.1"} if mismatch else None)
    assert "error" not in res, res.get("traceback", err[-3000:])
    assert "Paris" in res["text"]
    assert res["token_ids"] == reference_tokens[:len(res["token_ids"])]
    (worker,) = res["workers"]
    assert worker["host_ip"] == "127.0.0.3"  # Ray's address of the node, not the driver's
    assert res["engine_core"] == "InprocClient"  # config.py: no engine process to spawn
    # the worker monitor is joined after the workers are killed (compat/vllm_executor.py),
    # not after waiting out its 5 s poll
    print(f"engine shutdown: {res['shutdown_s']:.2f} s")
    assert res["shutdown_s"] < 2.0
    if mismatch:
        assert "differs from this process's Ray node address" in err


@pytest.mark.ray
def test_missing_key_fails_fast_with_node_table_and_fix():
    with LocalRayCluster([("127.0.0.4", {})]) as c:
        res, err = run_scenario(c, "class", timeout=120)
    assert res["error"].startswith("PlacementError")
    assert res["error_s"] < 10
    assert "127.0.0.4" in res["error"] and "vllm-ray-metal start" in res["error"]
    assert all(key in res["error"] for key in ("'METAL'", "mlx", "GPU"))  # all three named
    assert "ray start --address" in res["error"]


@pytest.mark.unit
def test_too_few_units_message_names_counts_and_command():
    nodes = [cluster.NodeInfo("a", "10.0.0.1", True, True, {"METAL": 1.0, "CPU": 8.0}),
             cluster.NodeInfo("b", "10.0.0.2", False, False, {"METAL": 1.0})]
    with pytest.raises(cluster.PlacementError) as info:
        cluster.check_capacity("METAL", 2, nodes)
    msg = str(info.value)
    assert "1 unit(s) of 'METAL'" in msg and "10.0.0.2" in msg and "DEAD" in msg
    assert "--units 1" in msg
    cluster.check_capacity("METAL", 1, nodes)  # one alive unit is enough for one worker
    import ray

    assert not ray.is_initialized()  # building the message must not start a local Ray


@pytest.mark.unit
def test_response_reads_do_not_sleep_through_a_lost_notification():
    """vLLM's queue reader sleeps on a zmq notification from the writer, and now and then
    that notification never arrives (5-6 times in a start of LLM(...); ~0.5% of replies sent
    a millisecond apart between two processes): the read then sleeps until its poll times
    out. The engine reads worker replies through ``WatchedQueue``, whose short poll step
    bounds such a stall; with upstream's 1 s step those stalls were ~2 s of a ~4.5 s start.
    Here the reader's notifications are switched off (it unsubscribes from the writer's
    socket: vllm...shm_broadcast.SpinCondition.local_notify_socket), so every read
    depends on the poll step."""
    import threading
    import time

    import zmq

    from vllm_ray_metal.compat import vllm as compat_vllm
    from vllm_ray_metal.distributed.worker_actor import WatchedQueue
    from vllm_ray_metal.testing.queues import queue_pair

    writer, reader = queue_pair()
    compat_vllm.set_reader_spin(reader, 0.0)  # as the executor sets it: sleep, don't spin
    reader._spin_condition.local_notify_socket.setsockopt_string(zmq.UNSUBSCRIBE, "")

    class Alive:  # the executor's state as the queue reads it (weakly referenced)
        is_failed = shutting_down = False

    alive = Alive()
    watched = WatchedQueue(reader, alive)
    for k in range(5):
        later = threading.Timer(0.05, writer.enqueue, args=((k, time.perf_counter() + 0.05),))
        later.start()
        got, sent = watched.dequeue(timeout=30)
        waited = time.perf_counter() - sent
        later.join()
        assert got == k and waited < 0.5, (k, waited)


@pytest.mark.unit
def test_response_reads_poll_briefly_right_after_a_reply():
    """A worker's reply that follows its previous one within about a millisecond (the
    second phase of a step) usually comes without its zmq notification. So for a few
    milliseconds after a reply the reader polls in short steps; later in long ones."""
    import time

    from vllm_ray_metal.distributed.worker_actor import WatchedQueue

    class Queue:  # replies come after ``misses`` empty polls; records each poll's timeout
        def __init__(self) -> None:
            self.timeouts: list[float] = []
            self.misses = 0

        def dequeue(self, timeout=None):
            self.timeouts.append(timeout)
            if self.misses:
                self.misses -= 1
                raise TimeoutError
            return "reply"

    class Alive:
        is_failed = shutting_down = False

    queue, alive = Queue(), Alive()
    watched = WatchedQueue(queue, alive)
    assert watched.dequeue() == "reply"  # no reply before: the long step
    assert queue.timeouts == [WatchedQueue.POLL_S]
    queue.timeouts, queue.misses = [], 2
    assert watched.dequeue() == "reply"  # right after one: short steps
    assert queue.timeouts == [WatchedQueue.RECENT_POLL_S] * 3
    time.sleep(WatchedQueue.RECENT_S * 2)
    queue.timeouts = []
    assert watched.dequeue(timeout=30) == "reply"
    assert queue.timeouts == [WatchedQueue.POLL_S]
    assert WatchedQueue.RECENT_POLL_S < WatchedQueue.POLL_S
