"""Ports and exposure (issue 5): nothing this library opens listens on all interfaces."""

from __future__ import annotations

import os

import psutil
import pytest


@pytest.mark.unit
def test_tcpstore_listens_on_the_node_address_only(monkeypatch):
    """Upstream's TCPStore listens on '::'; the worker actor's binds its Ray node address."""
    import ray

    from vllm_ray_metal.distributed.worker_actor import MetalRayWorkerProc

    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.58")
    proc = MetalRayWorkerProc.__new__(MetalRayWorkerProc)  # only the method under test
    before = _listening()
    url = proc.create_dist_init_method()
    port = int(url.rsplit(":", 1)[1])
    assert url == f"tcp://127.0.0.58:{port}"
    try:
        assert [a for a in _listening() - before if a[1] == port] == [("127.0.0.58", port)]
    finally:
        proc.dist_init_sock.detach()  # the store owns the descriptor and closes it
        del proc.dist_init_store


def _listening() -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(os.getpid()).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN}


@pytest.mark.unit
def test_serve_binds_loopback_unless_told(monkeypatch, model_dir):
    """Exposure: our `serve` adds --host 127.0.0.1 when neither --host nor --uds is given."""
    from vllm_ray_metal import cli
    from vllm_ray_metal.compat import vllm as compat_vllm

    seen = []
    monkeypatch.setattr(compat_vllm, "run_vllm_cli", seen.append)
    cli.main(["serve", model_dir, "--port", "8001"])
    cli.main(["serve", model_dir, "--host", "0.0.0.0"])
    cli.main(["serve", "--model", model_dir, "--uds", "/tmp/x.sock"])
    cli.main(["serve", model_dir, "--config", "serve.yaml"])  # the file may set the host
    assert seen[0][-2:] == ["--host", "127.0.0.1"]
    assert seen[1].count("--host") == 1 and "0.0.0.0" in seen[1]
    assert "--host" not in seen[2] and "--host" not in seen[3]
