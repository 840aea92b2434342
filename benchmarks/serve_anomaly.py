"""What the HTTP serving layer costs: the anomaly service against the inferer called directly,
on the same tiny THOR model and plan, in one run:

- direct: ``AnomalyRunner.run`` on batches of the service's batch size, one thread (the limit a
  one-CPU replica can reach);
- HTTP: the service (serve/tiny.yaml's anomaly app, one model replica of one CPU) with 1, 4 and
  8 concurrent clients, batching on (``max_batch_size`` 4) and off (1).

Prints images/s, p50/p99 latency, mean batch size, and the ratio to the direct images/s; then,
at 8 clients, the service against the direct limit (target: at least 0.8x) and serve/tiny.yaml's
default batching setting against the other one (target: no slower).

    python benchmarks/serve_anomaly.py [--requests 48] [--model DIR] [--set thor.infer.draws=1]
"""

from __future__ import annotations

import argparse
import copy
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import torch
import yaml

from meddiff.config import load_config
from meddiff.data.images import encode_png
from meddiff.serving.runners import AnomalyRunner
from meddiff.thor.model import save_model
from meddiff.thor.unet import DiffusionUNet

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q)) if xs else float("nan")


def direct(runner: AnomalyRunner, images: list[np.ndarray], batch: int) -> dict:
    torch.set_num_threads(1)
    runner.run(images[:batch], list(range(batch)))  # warm-up
    lat = []
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        t = time.perf_counter()
        chunk = images[i : i + batch]
        runner.run(chunk, list(range(i, i + len(chunk))))
        lat.append(time.perf_counter() - t)
    seconds = time.perf_counter() - start
    return {"images_per_s": len(images) / seconds, "p50": percentile(lat, 50),
            "p99": percentile(lat, 99), "batch": float(batch)}  # fmt: skip


def over_http(url: str, token: str, pngs: list[bytes], clients: int, stats) -> dict:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "image/png"}
    session = requests.Session()

    def one(i: int) -> float:
        t = time.perf_counter()
        r = session.post(f"{url}/v1/anomaly", data=pngs[i % len(pngs)], params={"seed": i},
                         headers=headers, timeout=600)  # fmt: skip
        r.raise_for_status()
        return time.perf_counter() - t

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients)))  # warm-up
        stats("reset")
        start = time.perf_counter()
        lat = list(pool.map(one, range(len(pngs))))
        seconds = time.perf_counter() - start
    return {"images_per_s": len(pngs) / seconds, "p50": percentile(lat, 50),
            "p99": percentile(lat, 99), "batch": stats("get")["mean_batch_size"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48, help="images per measurement")
    parser.add_argument("--model", help="THOR model directory (default: a random tiny one)")
    parser.add_argument("--batch", type=int, default=4, help="max_batch_size with batching on")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()

    from ray import serve

    from meddiff import runtime
    from meddiff.config import RuntimeConfig
    from meddiff.serving.launch import deploy, shutdown

    data = yaml.safe_load((ROOT / "serve" / "tiny.yaml").read_text())
    app = copy.deepcopy(data["applications"][0])
    default_batch = app["deployments"][0]["user_config"]["max_batch_size"]
    plan = [*app["args"]["set"], *args.overrides]
    cfg = load_config("tiny", overrides=plan)
    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    model = args.model
    if model is None:
        torch.manual_seed(0)
        model = str(save_model(tmp / "model", DiffusionUNet(cfg.thor.model), cfg.thor.model,
                               cfg.thor.schedule))  # fmt: skip
    rng = np.random.default_rng(0)
    size = cfg.thor.model.image_size
    images = [rng.random((size, size)).astype(np.float32) for _ in range(args.requests)]
    pngs = [encode_png(im, bits=16) for im in images]

    runner = AnomalyRunner(model, cfg)
    print(f"plan: {runner.plan['schedule']}, {runner.plan['forwards_per_image']} forwards/image, "
          f"{args.requests} images of {size}x{size}")  # fmt: skip
    rows = [("direct, batch 1", direct(runner, images, 1)),
            (f"direct, batch {args.batch}", direct(runner, images, args.batch))]  # fmt: skip
    limit = max(r["images_per_s"] for _, r in rows)
    del runner

    runtime.connect(RuntimeConfig(num_cpus=2, object_store_memory_mb=256))
    token = "bench-token-" + "x" * 20
    (tmp / "token").write_text(token)
    app["args"] = {"preset": "tiny", "set": plan, "token_file": str(tmp / "token")}
    dep = app["deployments"][0]
    dep.pop("autoscaling_config")
    dep.update(num_replicas=1, max_ongoing_requests=16, max_queued_requests=-1)
    data["applications"] = [app]
    data["http_options"]["port"] = free_port()
    handle = None

    def stats(what: str):
        if what == "reset":
            return handle.reset_stats.remote().result()
        return handle.stats.remote().result()

    try:
        for batching in (True, False):
            dep["user_config"] = {"model": model, "max_batch_size": args.batch if batching else 1,
                                  "batch_wait_timeout_s": 0.01}  # fmt: skip
            url = deploy(data)["anomaly"]
            handle = serve.get_deployment_handle("AnomalyModel", "anomaly")
            for clients in (1, 4, 8):
                name = f"HTTP, {clients} client{'s' if clients > 1 else ''}, batching {'on' if batching else 'off'}"
                rows.append((name, over_http(url, token, pngs, clients, stats)))
                print(f"  measured {name}", flush=True)
    finally:
        shutdown()
        runtime.shutdown()

    print(
        f"\n{'setting':<36} {'images/s':>9} {'x direct':>9} {'p50 s':>8} {'p99 s':>8} {'batch':>6}"
    )
    for name, r in rows:
        print(f"{name:<36} {r['images_per_s']:>9.2f} {r['images_per_s'] / limit:>9.2f} "
              f"{r['p50']:>8.3f} {r['p99']:>8.3f} {r['batch']:>6.2f}")  # fmt: skip
    print(f"\n(x direct: against the better direct row, {limit:.2f} images/s, the limit of one "
          "single-thread replica)")  # fmt: skip
    default_on = int(default_batch) > 1
    at8 = {on: dict(rows)[f"HTTP, 8 clients, batching {'on' if on else 'off'}"]["images_per_s"]
           for on in (True, False)}  # fmt: skip
    best = max(at8.values())
    print(f"8 clients: service {best / limit:.2f}x direct (target >= 0.80); serve/tiny.yaml's "
          f"default (max_batch_size {default_batch}, batching {'on' if default_on else 'off'}) "
          f"{at8[default_on]:.2f} images/s vs {at8[not default_on]:.2f} with batching "
          f"{'off' if default_on else 'on'}: {at8[default_on] / at8[not default_on]:.2f}x "
          "(target >= 1.00)")  # fmt: skip


if __name__ == "__main__":
    main()
