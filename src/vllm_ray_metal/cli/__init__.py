"""The ``vllm-ray-metal`` command line."""

from vllm_ray_metal.cli.main import main

__all__ = ["main"]
