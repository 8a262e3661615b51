"""Why P3 falls short: where a TP=2 decode step loses against half of a TP=1 step.

bench_tp.py times the whole stack; this script takes its llama's decoder stack alone
(mlx-lm's model and KV cache with the runner's CPU wrappers, all but rope's per-step
tables; this package's BLAS shim, one BLAS thread a process; a batch of rows decoding
after a 32-token prompt, no logits) through four set-ups:

* ``tp1``: one process with every weight;
* ``tp2-alone``: rank 0 of a TP=2 shard runs while rank 1 idles, its all-reduces
  skipped: what halving the weights buys by itself (fixed per-step work does not halve);
* ``tp2-shared``: both ranks at once, all-reduces still skipped: adds sharing one
  machine's memory bus and cores;
* ``tp2``: both ranks with MLX's ring all-reduces over loopback TCP, as vLLM runs them.

Then a timed ``tp2`` pass evaluates each all-reduce's input first and times the
collective alone. Both ranks read the same monotonic clock (one machine), so each call
splits into skew (one rank waiting for the other to arrive) and latency (from the later
arrival to the first rank done). Skipped all-reduces give wrong numbers; only the time
is used. Ranks are plain processes on the loopback addresses bench_tp's raylets use.

    python benchmarks/profile_tp.py            # the ~1.1B llama of bench_tp (~4.4 GB)
    python benchmarks/profile_tp.py --smoke    # a tiny llama, a few steps
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_tp  # noqa: E402
import common  # noqa: E402

from vllm_ray_metal.testing.cluster import free_port  # noqa: E402

MODES = ("tp1", "tp2-alone", "tp2-shared", "tp2", "tp2-timed")
NOTE = ("P3 why (profile_tp.py, two runs on 2026-11-30, bench_tp's ~1.1B llama, 4 rows, "
        "decoder stack only; the table holds the second): TP=1 248.9 / 255.2 ms a step; one "
        "TP=2 rank alone, without all-reduces, 130.5 / 133.5 ms (1.91x both: what halving "
        "the weights buys, with the per-step work that does not halve); both ranks at once "
        "145.4 / 153.5 ms (1.71 / 1.66x: sharing one machine's memory bus and 2 cores); with "
        "MLX's ring all-reduces 158.4 / 171.0 ms (1.57 / 1.49x). (Two earlier runs on "
        "mlx-lm's plain layers, without the runner's fused projections, compiled norms and "
        "numpy SwiGLU: 1.88 / 1.79 / 1.59 and 1.77 / 1.76 / 1.64.) In the full stack the "
        "engine, Ray and the logits take the ratio to the 1.35-1.55 bench_tp gives across "
        "runs (TP=1's step in Ray is within noise of this step plus its logits; TP=2's is "
        "~15-20 ms longer: the engine and raylets run at nice 0, Ray's workers at 15, and "
        "time taken from either rank stalls both at the next all-reduce). Timed one by one "
        "(44 a step), a typical all-reduce takes 0.11-0.16 ms after both ranks arrive, but "
        "the tail (p99 5.2 / 7.5 ms) carries 75 / 77% of the collectives' time. MLX's ring "
        "backend (read in its source) serves each socket with a thread that retries a "
        "non-blocking send/recv in a loop while work is pending, so with one core per rank "
        "a spinning receiver can hold a core that a sender or its rank's next step needs "
        "until the scheduler preempts it. Test of that: with the ring's sockets made blocking "
        "(a 100 us or 1 ms receive timeout, so a waiting thread sleeps in the kernel; "
        "scratch code, not in the package) the timed pass lost its tail (p99 0.3-0.5 ms, "
        "0-6% of the time in slow calls, against p99 4.1-6.8 ms and 51-75% in the same "
        "session), but the untimed step did not get faster (163-221 ms against 155-194): a "
        "sleeping receiver then waits to be woken on a busy core. Also tried without a "
        "change beyond noise: lower priority for the ring's threads or for the main "
        "thread, pinning each rank to a core, shorter scheduler slices. On two Macs each "
        "rank has its own cores and memory bus (not measured).")


def rank_process(rank: int, world: int, model: str, rows: int, steps: int) -> None:
    """Child: load (and shard) the model, then run the modes named on stdin."""
    from vllm_ray_metal import cpu

    cpu.preload()  # as the worker does: before MLX
    cpu.setup_process(ranks_on_node=os.cpu_count() or 1)  # one BLAS thread a process
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    group = mx.distributed.init(backend="ring", strict=True) if world > 1 else None
    net, _ = load_model(Path(model), lazy=True)
    if group is not None:
        net.shard(group)
    mx.eval(net.parameters())
    cpu.install(net, mx.float32)  # the runner's CPU wrappers (rope's per-step tables
    # need the runner's per-row positions; with mlx-lm's own cache they pass through)

    real_all_sum, calls, how = mx.distributed.all_sum, [], {"reduce": "real"}

    def all_sum(x, *args, **kwargs):  # mlx-lm's sharded layers call it at run time
        if how["reduce"] == "skip":
            return x
        if how["reduce"] == "timed":
            mx.eval(x)
            start = time.perf_counter()
            y = real_all_sum(x, *args, **kwargs)
            mx.eval(y)
            calls.append((start, time.perf_counter()))
            return y
        return real_all_sum(x, *args, **kwargs)

    mx.distributed.all_sum = all_sum
    prompt = mx.array([[100 + 7 * b + j for j in range(32)] for b in range(rows)])
    step_in = mx.array([[5 + b] for b in range(rows)])

    def decode(n: int) -> list[float]:
        cache = make_prompt_cache(net)
        mx.eval(net.model(prompt, cache=cache))
        calls.clear()  # keep the decode steps' collectives only
        times = []
        for _ in range(n):
            start = time.perf_counter()
            mx.eval(net.model(step_in, cache=cache))
            times.append(time.perf_counter() - start)
        return times

    common.emit({"ready": True})
    for line in sys.stdin:
        mode = line.strip()
        if mode == "quit":
            break
        how["reduce"] = {"tp2-alone": "skip", "tp2-shared": "skip",
                         "tp2-timed": "timed"}.get(mode, "real")
        decode(3)  # warm-up
        times = decode(steps)
        common.emit({"step_ms": [t * 1e3 for t in times], "calls": calls})


class Ranks:
    """The rank processes of one group, driven over their stdin/stdout."""

    def __init__(self, world: int, model: str, rows: int, steps: int) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.hostfile, self.procs = None, []
        if world > 1:
            hosts = [[f"{ip}:{free_port(ip)}"] for ip in bench_tp.NODES[:world]]
            fd, self.hostfile = tempfile.mkstemp(suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(hosts, f)
            env["MLX_HOSTFILE"] = self.hostfile
        try:
            for rank in range(world):
                self.procs.append(subprocess.Popen(
                    [sys.executable, __file__, "--child", str(rank), "--world", str(world),
                     "--model", model, "--rows", str(rows), "--steps", str(steps)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                    env={**env, "MLX_RANK": str(rank)}))
            for p in self.procs:
                self._read(p)  # ready
        except BaseException:
            self.close(graceful=False)
            raise

    @staticmethod
    def _read(p: subprocess.Popen) -> dict:
        """The child's next result line (other output is skipped)."""
        for line in p.stdout:
            if line.startswith(common.MARK):
                return json.loads(line[len(common.MARK):])
        raise SystemExit(f"rank process {p.pid} exited ({p.wait()})")

    def run(self, mode: str, ranks: list[int]) -> list[dict]:
        for r in ranks:
            self.procs[r].stdin.write(mode + "\n")
            self.procs[r].stdin.flush()
        return [self._read(self.procs[r]) for r in ranks]

    def close(self, graceful: bool = True) -> None:
        """Stop the ranks: asked to quit, or killed (after a failure a peer may be stuck in
        a collective that never completes)."""
        for p in self.procs:
            if p.poll() is None:
                if graceful:
                    p.stdin.write("quit\n")
                    p.stdin.close()
                else:
                    p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.hostfile:
            os.unlink(self.hostfile)
            self.hostfile = None

    def __enter__(self) -> "Ranks":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(graceful=exc_type is None)


def collective_split(a: list, b: list) -> dict:
    """Per-call skew and latency (ms) of the two ranks' timed all-reduces."""
    n = min(len(a), len(b))
    a, b = np.array(a[:n]), np.array(b[:n])
    arrive = np.maximum(a[:, 0], b[:, 0])
    skew = np.abs(a[:, 0] - b[:, 0]) * 1e3
    latency = (np.minimum(a[:, 1], b[:, 1]) - arrive) * 1e3
    return {"calls": n, "latency_pcts_ms": np.percentile(latency, [50, 90, 99]).round(3).tolist(),
            "latency_mean_ms": float(latency.mean()), "skew_median_ms": float(np.median(skew)),
            "skew_mean_ms": float(skew.mean()),
            "slow_share": float(latency[latency > 1.0].sum() / max(latency.sum(), 1e-12))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", type=int)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--model")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.child is not None:
        rank_process(args.child, args.world, args.model, args.rows, args.steps)
        return
    if args.smoke:
        args.steps = 3
    from vllm_ray_metal import default_model
    from vllm_ray_metal.default_model import cache_root

    name = "bench-llama-tiny" if args.smoke else "bench-llama-1.1b"
    shape = bench_tp.SMOKE if args.smoke else bench_tp.FULL
    model = bench_tp.build_model(cache_root() / name, shape, default_model())

    with Ranks(1, model, args.rows, args.steps) as one:
        results = {"tp1": one.run("tp1", [0])}
    with Ranks(2, model, args.rows, args.steps) as two:
        results["tp2-alone"] = two.run("tp2-alone", [0])
        for mode in MODES[2:]:
            results[mode] = two.run(mode, [0, 1])
    step = {m: max(common.median(r["step_ms"]) for r in results[m]) for m in MODES}
    calls = results["tp2-timed"]
    split = collective_split(calls[0]["calls"], calls[1]["calls"])
    per_step = split["calls"] / args.steps
    rows = [
        {"id": "P3 why", "measure": f"decoder step, {args.rows} rows ({name}, no logits), "
         "median ms: TP=1; one TP=2 rank alone without all-reduces; both ranks without; "
         "both with; ratios TP=1 ÷ each",
         "figure": " / ".join(f"{step[m]:.1f}" for m in MODES[:4]),
         "ratio": " / ".join(f"{step['tp1'] / step[m]:.2f}" for m in MODES[1:4]),
         "target": "—"},
        {"id": "P3 why", "measure": "one MLX ring all-reduce in the TP=2 step (input evaluated "
         "first): latency after both ranks arrive, p50 / p90 / p99 ms; share of latency in "
         "calls over 1 ms; skew between arrivals, median / mean ms",
         "figure": (" / ".join(f"{v:.2f}" for v in split["latency_pcts_ms"])
                    + f"; {split['slow_share'] * 100:.0f}% in slow calls; skew "
                    f"{split['skew_median_ms']:.2f} / {split['skew_mean_ms']:.2f}"),
         "ratio": f"{per_step:.0f} calls a step: {split['latency_mean_ms'] * per_step:.1f} ms "
                  f"latency + {split['skew_mean_ms'] / 2 * per_step:.1f} ms waiting",
         "target": "—"}]
    payload = {"results": {m: [{"step_ms": r["step_ms"]} for r in results[m]] for m in MODES},
               "step_ms": step, "all_reduce": split, "rows": rows,
               "model": dict(shape), "batch_rows": args.rows, "notes": [NOTE]}
    common.publish("tp_profile", payload, args.smoke, "TP=2 decoder step against TP=1",
                   {"median step": (list(MODES[:4]), [step[m] for m in MODES[:4]]),
                    "half of TP=1": (list(MODES[:4]), [step["tp1"] / 2] * 4)},
                   "set-up", "ms a step")


if __name__ == "__main__":
    main()
