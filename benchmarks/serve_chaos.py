"""Load and chaos on the anomaly service as an operator runs it: `meddiff serve run` with
the shipped tiny.yaml's anomaly application (two model replicas) on its own embedded Ray, N
clients on 127.0.0.1 only, and four phases of equal length:

1. steady: load alone;
2. kill: one model replica is killed (SIGKILL, by PID: a process this script started);
3. promote: the alias moves to another version while the load goes on;
4. SIGTERM: the server gets SIGTERM and drains; clients go on until it has exited.

Prints, per phase, the answers by status, 503s with Retry-After, other 5xx, *dropped*
connections (accepted, then closed or reset without an answer, or no answer within the
timeout) and *refused* ones (nothing listening any more: the server has gone, which is not a
drop), and the versions that answered. Target: no 5xx other than 503 + Retry-After, no dropped
connection, in every phase.

    .venv/bin/python benchmarks/serve_chaos.py --clients 4 --phase-s 20

Models are tiny random THOR UNets (tiny preset, 64×64) registered in a throwaway MLflow store;
the plan is tiny.yaml's (DDIM stride 25, 3 draws). Everything runs under a temporary folder and
is stopped by PID at the end (or after --timeout-s).
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
import yaml

NAME = "chaos-thor"
TOKEN = "chaos-token-0123456789abcdef-xyz"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def register(root: Path, store: str) -> tuple[list[str], object]:
    import torch

    from meddiff.config import load_config
    from meddiff.thor.model import save_model
    from meddiff.thor.unet import DiffusionUNet
    from meddiff.tracking import register_model, start_run
    from meddiff.tracking.aliases import promote

    cfg = load_config("tiny", overrides=[f"tracking.uri={store}"])
    versions = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = save_model(root / f"thor{seed}", DiffusionUNet(cfg.thor.model), cfg.thor.model,
                           cfg.thor.schedule)  # fmt: skip
        with start_run(cfg, "chaos"):
            versions.append(register_model(model, NAME))
    promote(NAME, versions[0], "production", cfg.tracking)
    return versions, cfg


def config(root: Path, store: str, plan: list[str], grace_s: float) -> Path:
    from meddiff.serving.check import shipped_config

    data = yaml.safe_load(shipped_config("tiny").read_text())
    app = data["applications"][0]
    app["args"].update(token_file=str(root / "token"), audit_log=str(root / "audit.jsonl"),
                       metrics_port=0, drain_grace_s=grace_s,
                       set=[*app["args"]["set"], *plan, f"tracking.uri={store}"])  # fmt: skip
    app["deployments"][0]["user_config"].update(model=f"models:/{NAME}@production", refresh_s=1)
    data["applications"] = [app]
    data["http_options"]["port"] = free_port()
    path = root / "serve.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def classify(err: Exception) -> str:
    text = repr(err)
    if "Connection refused" in text or "NewConnectionError" in text:
        return "refused"
    return "dropped"


class Clients:
    """N clients in a loop; each answer is recorded under the phase it was sent in."""

    def __init__(self, url: str, png: bytes, n: int, timeout_s: float):
        self.url, self.png, self.timeout_s = url, png, timeout_s
        self.phase = "steady"
        self.rows: list[tuple[str, str, str | None]] = []
        self.details: dict[tuple[str, str], str] = {}  # the first answer of each kind, per phase
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)
        ]

    def _run(self, i: int) -> None:
        while not self.stop.is_set():
            phase = self.phase
            try:
                r = requests.post(self.url, data=self.png, params={"seed": i},
                                  headers={"Authorization": f"Bearer {TOKEN}",
                                           "Content-Type": "image/png"},
                                  timeout=self.timeout_s)  # fmt: skip
            except requests.RequestException as err:
                kind = classify(err)
                self.rows.append((phase, kind, None))
                self.details.setdefault((phase, kind), repr(err)[:200])
                time.sleep(0.5 if kind == "refused" else 0)
                continue
            code = str(r.status_code)
            if r.status_code == 503 and r.headers.get("Retry-After"):
                code = "503+RA"
                time.sleep(min(float(r.headers["Retry-After"]), 2.0))
            self.rows.append((phase, code, r.headers.get("X-Model-Version")))
            if r.status_code != 200:
                self.details.setdefault((phase, code), r.text[:200])

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=self.timeout_s + 5)


def replica_pids(root_pid: int) -> list:
    import psutil

    out = []
    for p in psutil.Process(root_pid).children(recursive=True):
        try:
            if "ServeReplica:anomaly:AnomalyModel" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            continue
    return out


def table(rows, phases) -> str:
    cols = ["200", "503+RA", "other 4xx", "other 5xx", "dropped", "refused"]
    lines = ["| phase | requests | " + " | ".join(cols) + " | versions |",
             "|---" * (len(cols) + 3) + "|"]  # fmt: skip
    for phase in phases:
        mine = [r for r in rows if r[0] == phase]
        count = collections.Counter()
        for _, code, _ in mine:
            if code in ("200", "503+RA", "dropped", "refused"):
                count[code] += 1
            elif code.startswith("4"):
                count["other 4xx"] += 1
            else:
                count["other 5xx"] += 1
        versions = collections.Counter(v for _, c, v in mine if c == "200")
        seen = ", ".join(f"v{v}: {n}" for v, n in sorted(versions.items())) or "-"
        lines.append(f"| {phase} | {len(mine)} | " + " | ".join(str(count[c]) for c in cols)
                     + f" | {seen} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--phase-s", type=float, default=20.0)
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--grace-s", type=float, default=30.0, help="args.drain_grace_s")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        dest="plan",
        help="more overrides of the anomaly app (e.g. thor.infer.stride=50)",
    )
    p.add_argument("--timeout-s", type=float, default=1200.0, help="bound on the whole run")
    args = p.parse_args()
    from meddiff.data.images import encode_png
    from meddiff.tracking.aliases import promote

    tmp = Path(tempfile.mkdtemp(prefix="meddiff-chaos-"))
    store = f"sqlite:///{tmp / 'mlruns.db'}"
    (tmp / "token").write_text(TOKEN + "\n")
    os.environ["MLFLOW_TRACKING_URI"] = store
    versions, cfg = register(tmp, store)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "meddiff.cli", "serve", "run", "--config",
         str(config(tmp, store, args.plan, args.grace_s)), "--timeout-s", "1200"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True).start()
    clients = None
    try:
        while not any("SIGTERM drains" in line for line in out):
            if proc.poll() is not None or time.monotonic() - started > args.timeout_s:
                print("".join(out[-40:]))
                return 1
            time.sleep(0.5)
        url = next(line.split()[1] for line in out if line.startswith("anomaly: http"))
        print(f"serving after {time.monotonic() - started:.0f} s at {url}", flush=True)
        png = encode_png(np.random.default_rng(0).random((64, 64)).astype(np.float32), bits=16)
        clients = Clients(f"{url}/v1/anomaly", png, args.clients, args.request_timeout_s)
        clients.start()
        time.sleep(args.phase_s)
        clients.phase = "kill replica"
        victims = replica_pids(proc.pid)
        victims[0].kill()
        print(f"killed model replica pid {victims[0].pid} ({len(victims)} were running)")
        time.sleep(args.phase_s)
        clients.phase = "promote"
        promote(NAME, versions[1], "production", cfg.tracking)
        print(f"promoted {NAME} {versions[0]} -> {versions[1]}")
        time.sleep(args.phase_s)
        clients.phase = "SIGTERM"
        term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=args.timeout_s)
        print(f"serve run exited {code}, {time.monotonic() - term:.1f} s after SIGTERM")
        time.sleep(2)  # clients meet the closed port
    finally:
        if clients is not None:
            clients.join()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (tmp / "serve.log").write_text("".join(out))
    print("".join(line for line in out if "drained" in line), end="")
    for (phase, kind), detail in sorted(clients.details.items()):
        print(f"first {kind} in {phase}: {detail}")
    plan = " ".join(args.plan) or "tiny.yaml's"
    print(
        f"\n{args.clients} clients, {args.phase_s:g} s phases, plan {plan}, drain grace "
        f"{args.grace_s:g} s; models and the server's log under {tmp}\n"
    )
    print(table(clients.rows, ["steady", "kill replica", "promote", "SIGTERM"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
