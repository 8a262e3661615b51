"""The engine room: what one MLX rank computes (worker, model runner, paged KV cache,
sampler, model loading, its share of tensor and pipeline parallelism)."""
