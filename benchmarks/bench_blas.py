"""A decode step's weight products through MLX: the shim's kernel vs OpenBLAS, by rows.

Builds SmolLM2-135M's weight shapes (30 layers of fused q/k/v, o, fused gate/up and down,
then the 49152-row output matrix; 537 MB of float32, random) and times one pass of
``x @ W.T`` over all of them for each row count, the way a decode step with that many
sequences runs them, once with the shim's own kernel and once with OpenBLAS behind the
same shim (``VLLM_RAY_METAL_BLAS_KERNEL=none``: sgemv for one row, sgemm otherwise).
Writes ``benchmarks/results/blas_kernel.json`` and a PNG, and regenerates BENCHMARKS.md.

    python benchmarks/bench_blas.py                # rows 1..64, 1 and 2 threads, 9 repeats
    python benchmarks/bench_blas.py --smoke        # 2 small layers (the test suite's run)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from vllm_ray_metal import cpu  # noqa: E402
from vllm_ray_metal.cpu import blas  # noqa: E402

cpu.preload()  # before MLX, as the worker does
import mlx.core as mx  # noqa: E402

# (out, in) of one SmolLM2 layer's products after fused.py, and the output matrix
LAYER = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
LOGITS = (49152, 576)


def step_ms(weights: list[mx.array], rows: int, repeats: int) -> float:
    """Median ms of one pass of ``x @ W.T`` over every weight, evaluated per product."""
    xs = {k: mx.random.normal((rows, k)) for k in {w.shape[1] for w in weights}}
    mx.eval(*xs.values())

    def one_pass() -> None:
        for w in weights:
            mx.eval(xs[w.shape[1]] @ w.T)

    return common.median_ms(one_pass, repeats)  # (its warm-up warms caches and threads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--rows", default="1,2,4,8,16,32,64")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()
    layers, logits = (2, (4096, 576)) if args.smoke else (30, LOGITS)
    rows = [1, 4] if args.smoke else [int(r) for r in args.rows.split(",")]
    repeats = 2 if args.smoke else args.repeats
    best = blas.kernel()
    if best in (None, "none"):
        sys.exit(f"the shim's kernel is not in use here (kernel: {best}); nothing to compare")
    weights = [mx.random.normal(shape) * 0.02 for _ in range(layers) for shape in LAYER]
    weights.append(mx.random.normal(logits) * 0.02)
    mx.eval(*weights)
    results: dict = {}
    for threads in [int(t) for t in args.threads.split(",")]:
        blas.set_threads(threads)
        for kernel in ("none", best):
            blas.use_kernel(kernel)
            label = f"{'OpenBLAS' if kernel == 'none' else 'kernel ' + kernel}, {threads} thr"
            results[label] = {str(r): step_ms(weights, r, repeats) for r in rows}
    blas.use_kernel(best)
    row_16 = "16" if "16" in next(iter(results.values())) else str(rows[-1])
    threads_max = args.threads.split(",")[-1]
    ours = results[f"kernel {best}, {threads_max} thr"][row_16]
    base = results[f"OpenBLAS, {threads_max} thr"][row_16]
    payload = {
        "results": results, "kernel": best, "layers": layers,
        "rows": [{"id": "B1", "measure": f"one decode step's weight products (SmolLM2 shapes, "
                                         f"{row_16} rows, {threads_max} threads): OpenBLAS "
                                         f"ms / kernel ms",
                  "figure": f"{base:.1f} vs {ours:.1f} ms", "ratio": f"{base / ours:.2f}",
                  "target": "—"}],
    }
    series = {label: ([int(r) for r in by_rows], list(by_rows.values()))
              for label, by_rows in results.items()}
    common.publish("blas_kernel", payload, args.smoke, "Weight products of one decode step",
                   series, "rows (sequences)", "ms", logx=True)

if __name__ == "__main__":
    main()
