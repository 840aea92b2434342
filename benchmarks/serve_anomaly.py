"""What the HTTP serving layer costs: the anomaly service against the inferer called directly,
on the same tiny THOR model and plan, in one run:

- direct: ``AnomalyRunner.run`` on batches of the service's batch size, one thread (the limit a
  one-CPU replica can reach);
- HTTP: the service (the shipped tiny.yaml's anomaly app, one model replica of one CPU) with 1,
  4 and 8 concurrent clients, batching on (``max_batch_size`` 4) and off (1).

Both services are deployed side by side (two applications, one replica each) and every setting is
measured in ``--rounds`` short rounds taken in turn (direct batch 1, direct batch 4, HTTP on, HTTP
off, then again), so a change in the machine's load falls on all settings alike; a row's images/s
is its median round (every round is printed too).

Prints images/s, p50/p99 latency, mean batch size, and the ratio to the direct images/s; then,
at 8 clients, the service against the direct limit (target: at least 0.8x) and the shipped
tiny.yaml's default batching setting against the other one (target: no slower).

    python benchmarks/serve_anomaly.py [--requests 16] [--rounds 3] [--model DIR] [--set thor.infer.draws=1]
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q)) if xs else float("nan")


class Row:
    """One setting's rounds: images/s of each round, latencies, batch sizes."""

    def __init__(self) -> None:
        self.rates, self.lat, self.batches = [], [], []

    def result(self) -> dict:
        # The median round: one round caught by a burst of other work does not decide a row.
        return {"images_per_s": float(np.median(self.rates)), "p50": percentile(self.lat, 50),
                "p99": percentile(self.lat, 99), "batch": float(np.mean(self.batches)),
                "rounds": ", ".join(f"{r:.2f}" for r in self.rates)}  # fmt: skip


def direct(runner: AnomalyRunner, images: list[np.ndarray], batch: int, row: Row) -> None:
    """One round: the inferer on ``images`` in batches of ``batch``, one thread."""
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        t = time.perf_counter()
        chunk = images[i : i + batch]
        runner.run(chunk, list(range(i, i + len(chunk))))
        row.lat.append(time.perf_counter() - t)
        row.batches.append(len(chunk))
    row.rates.append(len(images) / (time.perf_counter() - start))


def over_http(url: str, token: str, pngs: list[bytes], clients: int, handle, row: Row) -> None:
    """One round: ``pngs`` sent by ``clients`` concurrent clients; adds the replica's batches."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "image/png"}
    session = requests.Session()

    def one(i: int) -> float:
        t = time.perf_counter()
        r = session.post(f"{url}/v1/anomaly", data=pngs[i % len(pngs)], params={"seed": i},
                         headers=headers, timeout=600)  # fmt: skip
        r.raise_for_status()
        return time.perf_counter() - t

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients)))  # warm-up: every client connected
        handle.reset_stats.remote().result()
        start = time.perf_counter()
        row.lat += list(pool.map(one, range(len(pngs))))
        row.rates.append(len(pngs) / (time.perf_counter() - start))
    mean = handle.stats.remote().result()["mean_batch_size"]
    row.batches.append(mean)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16, help="images per round and setting")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each setting in turn")
    parser.add_argument("--model", help="THOR model directory (default: a random tiny one)")
    parser.add_argument("--batch", type=int, default=4, help="max_batch_size with batching on")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()

    from ray import serve

    from meddiff import runtime
    from meddiff.config import RuntimeConfig
    from meddiff.serving.check import shipped_config
    from meddiff.serving.launch import deploy, shutdown

    data = yaml.safe_load(shipped_config("tiny").read_text())
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
    torch.set_num_threads(1)  # as one replica of one CPU
    runner.run(images[:1], [0])  # warm-up
    print(f"plan: {runner.plan['schedule']}, {runner.plan['forwards_per_image']} forwards/image, "
          f"{args.requests} images of {size}x{size} per round, {args.rounds} rounds")  # fmt: skip

    runtime.connect(RuntimeConfig(num_cpus=2, object_store_memory_mb=256))
    token = "bench-token-" + "x" * 20
    (tmp / "token").write_text(token)
    apps = []
    for on in (True, False):
        a = copy.deepcopy(app)
        a["name"], a["route_prefix"] = ("on", "/on") if on else ("off", "/off")
        a["args"] = {"preset": "tiny", "set": plan, "token_file": str(tmp / "token")}
        dep = a["deployments"][0]
        dep.pop("autoscaling_config")
        dep.update(num_replicas=1, max_ongoing_requests=16, max_queued_requests=-1)
        dep["user_config"] = {"model": model, "max_batch_size": args.batch if on else 1,
                              "batch_wait_timeout_s": 0.01}  # fmt: skip
        apps.append(a)
    data["applications"] = apps
    data["http_options"]["port"] = free_port()
    names = {on: "on" if on else "off" for on in (True, False)}
    label = {1: "1 client", 4: "4 clients", 8: "8 clients"}
    rows = {f"direct, batch {b}": Row() for b in (1, args.batch)}
    rows |= {f"HTTP, {label[c]}, batching {names[on]}": Row() for on in (True, False)
             for c in (1, 4, 8)}  # fmt: skip
    try:
        urls = deploy(data)
        handles = {on: serve.get_deployment_handle("AnomalyModel", names[on]) for on in names}
        for r in range(args.rounds):
            for b in (1, args.batch):
                direct(runner, images, b, rows[f"direct, batch {b}"])
            for c in (1, 4, 8):
                for on in (True, False):  # the two settings back to back, under the same load
                    key = f"HTTP, {label[c]}, batching {names[on]}"
                    over_http(urls[names[on]], token, pngs, c, handles[on], rows[key])
            print(f"  round {r + 1} of {args.rounds} measured", flush=True)
    finally:
        shutdown()
        runtime.shutdown()
    rows = {k: v.result() for k, v in rows.items()}
    limit = max(rows[f"direct, batch {b}"]["images_per_s"] for b in (1, args.batch))

    print(f"\n{'setting':<36} {'images/s':>9} {'x direct':>9} {'p50 s':>8} {'p99 s':>8} "
          f"{'batch':>6}  rounds (images/s)")  # fmt: skip
    for name, r in rows.items():
        print(f"{name:<36} {r['images_per_s']:>9.2f} {r['images_per_s'] / limit:>9.2f} "
              f"{r['p50']:>8.3f} {r['p99']:>8.3f} {r['batch']:>6.2f}  {r['rounds']}")  # fmt: skip
    print(f"\n(x direct: against the better direct row, {limit:.2f} images/s, the limit of one "
          "single-thread replica)")  # fmt: skip
    default_on = int(default_batch) > 1
    at8 = {on: rows[f"HTTP, 8 clients, batching {'on' if on else 'off'}"]["images_per_s"]
           for on in (True, False)}  # fmt: skip
    best = max(at8.values())
    print(f"8 clients: service {best / limit:.2f}x direct (target >= 0.80); tiny.yaml's "
          f"default (max_batch_size {default_batch}, batching {'on' if default_on else 'off'}) "
          f"{at8[default_on]:.2f} images/s vs {at8[not default_on]:.2f} with batching "
          f"{'off' if default_on else 'on'}: {at8[default_on] / at8[not default_on]:.2f}x "
          "(target >= 1.00)")  # fmt: skip


if __name__ == "__main__":
    main()
