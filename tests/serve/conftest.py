"""One server for the serve modules that need a plain generate server (a start is the
slow part): a two-node cluster, the worker on 127.0.0.53, 32 MiB of KV (~720 tokens,
so 200 concurrent requests must preempt), hermes tool calling on, and LoRA on with two
adapters (``peft``, ``mlx``) and run-time adapter loading allowed."""

from __future__ import annotations

import contextlib

import pytest

from vllm_ray_metal.testing.serve import served


@pytest.fixture(scope="session")
def served_adapters(model_dir, tmp_path_factory) -> dict[str, str]:
    """The adapters the shared server is started with: name -> path."""
    from vllm_ray_metal.testing import lora

    where = tmp_path_factory.mktemp("serve-lora")
    return {"peft": lora.peft_adapter(where / "peft", model_dir, size=0.15),
            "mlx": lora.mlx_lm_adapter(where / "mlx", model_dir, size=0.08)}


@pytest.fixture(scope="session")
def server(model_dir, served_adapters, tmp_path_factory, close_after_last_use):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    modules = [f"{name}={path}" for name, path in served_adapters.items()]
    with contextlib.ExitStack() as stack:
        srv = stack.enter_context(served(model_dir, log, "127.0.0.52", "127.0.0.53", 32,
                                         "--enable-auto-tool-choice", "--tool-call-parser",
                                         "hermes", "--enable-lora", "--max-loras", "2",
                                         "--max-lora-rank", "8", "--lora-modules", *modules,
                                         env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}))
        close_after_last_use("server", stack.close)
        yield srv
