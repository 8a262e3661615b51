"""The compat room: every touch of vLLM, Ray, MLX or mlx-lm internals goes through here.

``vllm.py`` (vLLM's internals the engine and platform use), ``vllm_executor.py`` (vLLM's
Ray executor, with hooks), ``ray.py`` and ``mlx.py``. Nothing outside this room imports a
private upstream symbol; ``tests/compat/`` checks each one's behaviour.
"""
