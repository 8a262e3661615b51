"""The distributed room: placing MLX workers on Ray nodes (executor, worker actor,
cluster checks and placement, data-parallel replicas)."""
