"""A real multi-node Ray cluster on this machine, for the cluster-path tests.

Each node is its own ``ray start --block`` (its own raylet, object store, ports and temp dir) with
token auth on, as on a cloud cluster; the head carries the custom resource ``head_node`` and each
worker ``worker_node``, so work can be steered to a node. Jobs go in through ``ray job submit``.

Other Ray instances run on the same machine, so nothing here calls ``ray stop``: a node is stopped
by terminating its ``ray start --block`` process, and anything of it still alive afterwards is
killed by the PIDs recorded for that node (the process tree under it). :meth:`Cluster.kill_node`
kills a node's processes at once with SIGKILL, as when a machine disappears.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int, avoid: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """``n`` distinct free ports, none in ``avoid`` (ports handed out before, maybe not yet bound)."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid and port not in ports:
            ports.append(port)
    return ports


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    temp_dir: Path
    node_id: str = ""
    pids: set[int] = field(default_factory=set)
    killed: bool = False  # by kill_node, on purpose: its exit is not a failed start

    def record_pids(self) -> set[int]:
        """The PIDs of this node's process tree (``ray start`` and all it spawned), so far."""
        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        self.pids |= {self.proc.pid, *(p.pid for p in tree)}
        return self.pids


class Cluster:
    """A head node and ``workers`` worker nodes on loopback. Use as a context manager."""

    def __init__(
        self,
        workers: int = 1,
        num_cpus: int = 1,
        object_store_mb: int = 192,
        resources: dict[str, float] | None = None,
    ):
        # Short temp dirs: Ray's unix socket paths must stay under ~107 characters.
        self.root = Path(tempfile.mkdtemp(prefix="mdc", dir="/tmp"))
        self.num_cpus = num_cpus
        self.resources = dict(resources or {})  # on every node, besides head_node/worker_node
        self.object_store_mb = object_store_mb
        token = self.root / "auth_token"
        token.write_text(secrets.token_hex(32))
        self.env = {
            **os.environ,
            # A job's `python` must be this environment's, as on a cluster whose nodes put the
            # meddiff venv first on PATH (cluster.yaml).
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            "RAY_ADDRESS": "",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.gcs_port, self.dashboard_port = free_ports(2)
        self.used_ports = {self.gcs_port, self.dashboard_port}
        self.gcs = f"127.0.0.1:{self.gcs_port}"
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: list[Node] = []
        self._workers = workers

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        try:
            self._start_with_retries("head")
            for i in range(self._workers):
                self.add_worker(f"worker{i}")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def add_worker(self, name: str) -> Node:
        return self._start_with_retries(name)

    def _start_with_retries(self, name: str, attempts: int = 3) -> Node:
        """Start a node and wait until it serves; on a busy machine Ray's fixed 30 s for a raylet
        to register can pass, and `ray start` then exits: start it again (bounded, logged)."""
        for attempt in range(1, attempts + 1):
            if name == "head" and attempt > 1:  # leftovers of the failed head may hold its ports
                self.gcs_port, self.dashboard_port = free_ports(2, avoid=self.used_ports)
                self.used_ports |= {self.gcs_port, self.dashboard_port}
                self.gcs = f"127.0.0.1:{self.gcs_port}"
                self.address = f"http://127.0.0.1:{self.dashboard_port}"
            node = self._start(name, label=name if attempt == 1 else f"{name}-{attempt}")
            self.nodes.append(node)
            try:
                if name == "head":
                    self.wait_for_jobs_api()
                self._identify(node)
                return node
            except RuntimeError as err:  # the node's `ray start` exited
                self._stop_node(node)
                self.nodes.remove(node)
                print(f"starting Ray node {name}: attempt {attempt} of {attempts} failed: {err}")
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def _identify(self, node: Node) -> None:
        """Wait until ``node`` has joined and record its Ray node id (the one not seen before)."""
        known = {n.node_id for n in self.nodes if n.node_id}
        deadline = time.monotonic() + 600
        while True:
            alive = self.wait_for_nodes(sum(n.proc.poll() is None for n in self.nodes))
            new = [n["node_id"] for n in alive if n["node_id"] not in known]
            if new:
                [node.node_id] = new
                return
            # The count matched before the new node joined: a node killed moments ago is still
            # listed alive until Ray's health check marks it dead (seen on an idle machine).
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {node.name} did not join the cluster at {self.gcs}")
            time.sleep(1)

    def _start(self, name: str, label: str) -> Node:
        """Start node ``name``; ``label`` names its temp dir and log (one per attempt)."""
        head = name == "head"
        temp = self.root / label
        temp.mkdir()
        ports = free_ports(8, avoid=self.used_ports)
        self.used_ports.update(ports)
        cmd = [
            RAY, "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
            f"--num-cpus={self.num_cpus}", f"--object-store-memory={self.object_store_mb * 2**20}",
            f"--resources={json.dumps({'head_node' if head else 'worker_node': 1, **self.resources})}",
            f"--temp-dir={temp}", f"--node-manager-port={ports[0]}",
            f"--object-manager-port={ports[1]}", f"--dashboard-agent-listen-port={ports[2]}",
            f"--dashboard-agent-grpc-port={ports[3]}", f"--runtime-env-agent-port={ports[4]}",
            f"--metrics-export-port={ports[5]}",
        ]  # fmt: skip
        if head:
            cmd += [
                "--head", f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
                "--dashboard-host=127.0.0.1", f"--ray-client-server-port={ports[6]}",
            ]  # fmt: skip
        else:
            cmd += [f"--address={self.gcs}"]
        log = open(self.root / f"{label}.log", "wb")  # noqa: SIM115 (the node outlives this call)
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return Node(name, proc, temp)

    def stop(self) -> None:
        """Stop every node this cluster started, workers first, and only those processes."""
        for node in reversed(self.nodes):
            self._stop_node(node)
        shutil.rmtree(self.root, ignore_errors=True)

    def _stop_node(self, node: Node) -> None:
        pids = node.record_pids()
        if node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its own processes
            try:
                node.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        _kill_pids(pids)

    def kill_node(self, name: str) -> list[int]:
        """SIGKILL every process of node ``name`` at once (a machine that disappears)."""
        node = self.node(name)
        pids = sorted(node.record_pids())
        node.killed = True
        _kill_pids(pids)
        node.proc.wait(timeout=30)
        return pids

    def _record_all(self) -> None:
        """Note every node's process tree now: a `ray start` that exits leaves its children
        orphaned, out of reach of a later tree walk."""
        for node in self.nodes:
            if node.proc.poll() is None:
                node.record_pids()

    def alive_workers(self) -> list[Node]:
        return [n for n in self.nodes if n.name != "head" and n.proc.poll() is None]

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    # -- queries --------------------------------------------------------------------------------

    def ray(self, *args: str, timeout: float = 120, check: bool = True, **kw):
        """Run the ``ray`` CLI against this cluster (jobs API address and token)."""
        done = subprocess.run(
            [RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout, **kw
        )
        if check and done.returncode:
            raise RuntimeError(f"ray {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done

    def wait_for_jobs_api(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._record_all()
            head = self.node("head").proc
            if head.poll() is not None:
                raise RuntimeError(f"ray start --head exited with {head.returncode}: {self.log()}")
            if not self.ray("job", "list", "--address", self.address, check=False).returncode:
                return
            time.sleep(2)
        raise TimeoutError(f"Ray jobs API at {self.address} did not come up")

    def alive_nodes(self, check: bool = True) -> list[dict] | None:
        """Alive nodes from the state API; None (with check=False) while that API is not up yet
        (the dashboard starts its modules one by one, the jobs API may answer first)."""
        args = ("list", "nodes", "--address", self.address, "--format", "json")
        done = self.ray(*args, check=check)
        if done.returncode:
            return None
        return [n for n in _json(done.stdout) if n["state"] == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout: float = 600) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._record_all()
            nodes = self.alive_nodes(check=False)
            if nodes is not None and len(nodes) == count:
                return nodes
            for n in self.nodes:
                if n.proc.poll() is not None and not n.killed:
                    raise RuntimeError(f"node {n.name} exited with {n.proc.returncode}")
            time.sleep(1)
        raise TimeoutError(f"{count} nodes did not join the cluster at {self.gcs}")

    def node_ids(self) -> dict[str, str]:
        """Ray node id -> this cluster's node name ("head", "worker0", ...)."""
        return {n.node_id: n.name for n in self.nodes}

    def job_id(self, submission_id: str) -> str:
        """The Ray job id (hex) of a submitted job, as the state API names it."""
        out = self.ray("list", "jobs", "--address", self.address, "--format", "json", "--detail")
        [job] = [j for j in _json(out.stdout) if j.get("submission_id") == submission_id]
        return job["job_id"]

    def log(self, name: str = "head") -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    # -- jobs -----------------------------------------------------------------------------------

    def submit(
        self,
        entrypoint: list[str],
        *,
        working_dir: Path = ROOT,
        env_vars: dict[str, str] | None = None,
        submission_id: str | None = None,
        wait: bool = True,
        timeout: float = 900,
    ) -> subprocess.CompletedProcess:
        """``ray job submit --working-dir`` with a runtime env, as on a cloud cluster."""
        runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}}
        runtime_env["env_vars"].update(env_vars or {})
        args = ["job", "submit", "--address", self.address, "--working-dir", str(working_dir)]
        args += ["--runtime-env-json", json.dumps(runtime_env)]
        if submission_id:
            args += ["--submission-id", submission_id]
        if not wait:
            args.append("--no-wait")
        return self.ray(*args, "--", *entrypoint, timeout=timeout, check=False)

    def job_status(self, submission_id: str) -> str:
        done = self.ray("job", "status", "--address", self.address, submission_id)
        # An ended job prints "Job 'x' succeeded|failed|was stopped", others "Status for job ...".
        text = (done.stdout + done.stderr).lower()
        for word in ("succeeded", "failed", "stopped"):
            if f"' {word}" in text or f"was {word}" in text:
                return word.upper()
        return "RUNNING"

    def wait_for_job(self, submission_id: str, timeout: float = 900) -> str:
        """Wait until a job ends; returns its final status line (SUCCEEDED, FAILED, STOPPED)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.job_status(submission_id)
            if any(s in status for s in ("SUCCEEDED", "FAILED", "STOPPED")):
                return status
            time.sleep(3)
        raise TimeoutError(f"job {submission_id} did not end in {timeout} s")

    def job_logs(self, submission_id: str) -> str:
        return self.ray("job", "logs", "--address", self.address, submission_id).stdout

    def job_actors(self, job_id: str) -> list[dict]:
        """Every actor of a job (alive or dead) with the node it ran on (Ray's state API)."""
        return self._job_state("actors", job_id)

    def job_tasks(self, job_id: str) -> list[dict]:
        """Every task of a job with the node it ran on (Ray's state API)."""
        return self._job_state("tasks", job_id)

    def _job_state(self, kind: str, job_id: str) -> list[dict]:
        out = self.ray(
            "list", kind, "--address", self.address, "--format", "json", "--detail",
            "--limit", "10000", "--filter", f"job_id={job_id}",
        )  # fmt: skip
        return _json(out.stdout)


def _json(stdout: str):
    """The JSON list ``ray list ... --format json`` prints (it may print notes around it; with
    nothing to list it prints only "No resource in the cluster")."""
    if "[" not in stdout:
        return []
    return json.loads(stdout[stdout.index("[") : stdout.rindex("]") + 1])


def _kill_pids(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
