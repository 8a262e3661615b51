"""One server for the serve modules that need a plain generate server (a start is the
slow part): a two-node cluster, the worker on 127.0.0.53, 32 MiB of KV (~720 tokens,
so 200 concurrent requests must preempt), and hermes tool calling on."""

from __future__ import annotations

import contextlib

import pytest

from vllm_ray_metal.testing.serve import served


@pytest.fixture(scope="session")
def server(model_dir, tmp_path_factory, close_after_last_use):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with contextlib.ExitStack() as stack:
        srv = stack.enter_context(served(model_dir, log, "127.0.0.52", "127.0.0.53", 32,
                                         "--enable-auto-tool-choice", "--tool-call-parser",
                                         "hermes"))
        close_after_last_use("server", stack.close)
        yield srv
