"""L why: what MLX's exp costs on this rig's CPU backend, and what attention would cost with
a vectorised one.

Two measurements, float32, one process with the worker's BLAS:
  1. ns an element of MLX's exp, sigmoid, softmax and multiply, and of numpy's exp, on
     the same buffer (256 x 1,536 elements: a 256-token prefill's gate);
  2. one layer's decode attention over 8 rows of SmolLM2's shapes (9 query heads, 3 KV
     heads, 64 dims) at 1.5k, 4k and 7.5k positions: MLX's fused SDPA, MLX's softmax of
     the same scores alone, and the same attention with the softmax done by numpy
     (scores and values products in MLX). The numpy variant is a measuring stick for a
     vectorised exp, checked against SDPA's output; it is not in the package.

    python benchmarks/profile_exp.py
    python benchmarks/profile_exp.py --smoke     # seconds: small shapes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

HEADS, KV_HEADS, DIM, ROWS = 9, 3, 64, 8


def elementwise_ns(elements: int, repeats: int) -> dict[str, float]:
    import mlx.core as mx
    import numpy as np

    a = mx.random.normal((elements // 1536, 1536))
    mx.eval(a)
    host = np.array(a)
    ops = {"mx.exp": lambda: mx.eval(mx.exp(a)), "mx.sigmoid": lambda: mx.eval(mx.sigmoid(a)),
           "mx.softmax": lambda: mx.eval(mx.softmax(a, axis=-1)),
           "mx.multiply": lambda: mx.eval(a * a), "np.exp": lambda: np.exp(host)}
    return {name: common.median_ms(fn, repeats) * 1e6 / elements for name, fn in ops.items()}


def attention_ms(context: int, repeats: int) -> dict[str, float]:
    import mlx.core as mx
    import numpy as np

    scale = DIM ** -0.5
    q = mx.random.normal((ROWS, HEADS, 1, DIM))
    k, v = (mx.random.normal((ROWS, KV_HEADS, context, DIM)) for _ in range(2))
    mx.eval(q, k, v)
    grouped = (q * scale).reshape(ROWS, KV_HEADS, HEADS // KV_HEADS, DIM)
    scores = grouped @ k.swapaxes(-1, -2)  # (rows, kv heads, heads per kv head, context)
    mx.eval(scores)

    def fused():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)

    def numpy_softmax():
        s = grouped @ k.swapaxes(-1, -2)
        mx.eval(s)
        p = np.array(s)
        p -= p.max(axis=-1, keepdims=True)
        np.exp(p, out=p)
        p /= p.sum(axis=-1, keepdims=True)
        out = mx.array(p) @ v
        return out.reshape(ROWS, HEADS, 1, DIM)

    diff = mx.abs(fused() - numpy_softmax()).max().item()
    return {"sdpa_ms": common.median_ms(lambda: mx.eval(fused()), repeats),
            "softmax_ms": common.median_ms(lambda: mx.eval(mx.softmax(scores, axis=-1)), repeats),
            "numpy_softmax_ms": common.median_ms(lambda: mx.eval(numpy_softmax()), repeats),
            "max_abs_diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    from vllm_ray_metal import cpu

    cpu.preload()  # the worker's BLAS, loaded before MLX as the worker does
    cpu.setup_process()
    contexts = [64, 128] if args.smoke else [1536, 4096, 7680]
    repeats = 2 if args.smoke else args.repeats
    elements = 1536 * (4 if args.smoke else 256)
    ns = elementwise_ns(elements, repeats)
    attention = {str(c): attention_ms(c, repeats) for c in contexts}
    top = attention[str(contexts[-1])]
    rows = [
        {"id": "L why", "measure": f"ns an element on MLX's CPU backend, float32, {elements:,} "
                                   "elements: exp / sigmoid / softmax / multiply; numpy's exp "
                                   "in brackets; ratio MLX exp ÷ numpy exp",
         "figure": " / ".join(f"{ns[k]:.2f}" for k in ("mx.exp", "mx.sigmoid", "mx.softmax",
                                                        "mx.multiply"))
                   + f" ({ns['np.exp']:.2f})",
         "ratio": f"{ns['mx.exp'] / ns['np.exp']:.0f}", "target": "—"},
        {"id": "L why", "measure": f"one layer's decode attention, {ROWS} rows x {contexts[-1]} "
                                   "positions (SmolLM2 shapes), ms: MLX SDPA; MLX softmax of its "
                                   "scores alone; the same attention with numpy's softmax; "
                                   "ratio SDPA ÷ numpy variant",
         "figure": f"{top['sdpa_ms']:.2f} / {top['softmax_ms']:.2f} / "
                   f"{top['numpy_softmax_ms']:.2f}",
         "ratio": f"{top['sdpa_ms'] / top['numpy_softmax_ms']:.2f}", "target": "—"},
    ]
    payload = {"results": {"elementwise_ns": ns, "attention": attention}, "rows": rows,
               "repeats": repeats, "notes": []}
    series = {label: (contexts, [attention[str(c)][key] for c in contexts])
              for label, key in (("MLX SDPA", "sdpa_ms"), ("MLX softmax alone", "softmax_ms"),
                                 ("attention, numpy softmax", "numpy_softmax_ms"))}
    common.publish("exp_profile", payload, args.smoke,
                   f"One layer's decode attention, {ROWS} rows", series, "positions", "ms")


if __name__ == "__main__":
    main()
