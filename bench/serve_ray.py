"""A bundle on Ray Serve with N replicas, against one `compressor serve` process, in one run on one machine.

    python bench/serve_ray.py BUNDLE [--replicas 2] [--concurrency 32] [--seconds 20]

Needs `pip install "ray[serve]"` and wrk. Each replica builds the server's ASGI app itself
(`compressor.serve.app(bundle, threads=T)`, handed to `serve.ingress` as a builder, so that nothing loaded is
pickled), with T = the machine's cores / replicas onnxruntime threads. The single process gets all cores. Both
get one SST-2 dev sentence per /predict request from wrk; requests/s, p50 and p99 per setup. Writes
runs/serve_load/NAME-ray.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import sentences, server, wait_healthy, write_result, wrk_load  # noqa: E402  (the bench beside this one)


@contextlib.contextmanager
def ray_serve(bundle: Path, replicas: int) -> Any:
    """The bundle deployed on a local Ray Serve with `replicas` replicas; its HTTP address."""
    import ray
    from ray import serve

    from compressor.serve import app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores, include_dashboard=False, logging_level="ERROR")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    threads = max(1, cores // replicas)
    path = str(bundle.resolve())

    def builder() -> Any:  # a function: Ray Serve calls it on each replica to build that replica's app
        return app(path, threads=threads)

    deployment = serve.deployment(serve.ingress(builder)(), name="bundle", num_replicas=replicas,
                                  ray_actor_options={"num_cpus": cores / replicas})
    serve.run(deployment.bind(), route_prefix="/",
              logging_config={"enable_access_log": False, "log_level": "WARNING"})  # no line per request
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv: list[str]) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--out", type=Path, default=Path("runs/serve_load"))
    args = parser.parse_args(argv)
    from compressor.run.record import cpu_name

    texts = sentences()
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    result: dict[str, Any] = {"bundle": manifest.get("name"), "cpu": cpu_name(), "cores": os.cpu_count()}
    with server(args.bundle, []) as url:
        result["one_process"] = wrk_load(url, texts, args.concurrency, args.seconds, args.out)
    with ray_serve(args.bundle, args.replicas) as url:
        httpx.post(f"{url}/predict", json={"inputs": texts[0]}, timeout=60)
        result[f"ray_{args.replicas}_replicas"] = wrk_load(url, texts, args.concurrency, args.seconds, args.out)
    ray_row = result[f"ray_{args.replicas}_replicas"]
    ray_row["x_one_process"] = ray_row["requests_per_s"] / result["one_process"]["requests_per_s"]
    write_result(result, args.out / f"{manifest.get('name', 'bundle')}-ray.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
