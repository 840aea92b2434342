"""The cluster path on a real multi-node Ray: a head and a worker node, each its own ``ray start``
with token auth, jobs submitted with ``ray job submit --working-dir`` (README, "Running on a
cluster"). Work must spread over both nodes and give what the embedded default gives; a worker
node killed mid-job must cost neither rows nor a second registered model.

One cluster is shared by the module (starting two nodes takes a minute or more on 2 cores).
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from multinode import Cluster

from meddiff.cli import main as cli_main
from meddiff.data import shards
from meddiff.data.pcam import pcam_filename

# Minutes each on 2 busy cores (docs/cluster.md has the figures): above the suite's 900 s limit.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

QUIET = ["--set", "runtime.progress=false"]
# Small read blocks and two reads at once, so an ingest has enough tasks to spread over nodes.
INGEST = ["--preset", "tiny", "--set", "data.pcam.rows_per_block=8"]
INGEST += ["--set", "data.read_concurrency=2", *QUIET]


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    """Overrides the shared embedded Ray (conftest): this module works on its own cluster, and
    the embedded comparison runs start the embedded Ray when they need it (and it is stopped
    here if it was not running before)."""
    import ray

    from meddiff import runtime

    running = ray.is_initialized()
    yield
    if not running:
        runtime.shutdown()


@pytest.fixture(scope="module")
def cluster():
    started = time.perf_counter()
    # Two logical CPUs per node: a training worker and the Ray Data tasks feeding it fit on one
    # node, which is what lets training go on when the other node is lost. One train_slot per
    # node spreads a two-worker training run over both nodes.
    with Cluster(workers=1, num_cpus=2, object_store_mb=192, resources={"train_slot": 1}) as c:
        c.started_s = time.perf_counter() - started
        yield c


@pytest.fixture
def record(request):
    """Print a test's figures on one line (collected into the notes from a -s run)."""

    def _record(name: str, figures: dict) -> None:
        print(f"\nFIGURES {name}: {json.dumps(figures)}")

    return _record


def _submit(cluster: Cluster, entrypoint: list[str], **kw) -> tuple[str, str]:
    """Submit and wait; returns (submission id, job output). Fails the test if the job failed."""
    sid = f"meddiff-{uuid.uuid4().hex[:8]}"
    done = cluster.submit(entrypoint, submission_id=sid, **kw)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in out, out[-4000:]
    return sid, out


def _nodes_used(cluster: Cluster, sid: str) -> Counter:
    """How many of a job's tasks (and actor tasks) ran on each node, by node name."""
    names = cluster.node_ids()
    tasks = cluster.job_tasks(cluster.job_id(sid))
    return Counter(names.get(t["node_id"], "?") for t in tasks if t.get("node_id"))


def _rows(path: Path) -> dict[tuple[str, int], tuple[int, bytes]]:
    """(source file name, index) -> (label, image bytes) of a shard directory."""
    b = shards.load_shards(path)
    keys = [(Path(s).name, int(i)) for s, i in zip(b["source"], b["index"], strict=True)]
    assert len(set(keys)) == len(keys), "a patch appears twice"
    return {
        k: (int(lbl), img.tobytes())
        for k, lbl, img in zip(keys, b["label"], b["image"], strict=True)
    }


def test_cluster_has_two_nodes_with_steering_resources(cluster):
    nodes = cluster.alive_nodes()
    assert len(nodes) == 2
    assert sorted(cluster.node_ids().values()) == ["head", "worker0"]
    print(f"\ncluster up in {cluster.started_s:.0f} s")


def _ensure_worker(cluster: Cluster) -> None:
    """A live worker node (an earlier test may have killed it): start a fresh one if needed."""
    if not cluster.alive_workers():
        cluster.add_worker(f"worker{len(cluster.nodes) - 1}")


def _wait_until(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


# Rows of the node-loss ingest (a read task each): enough for the state API to report a finished
# task on the worker node, and the kill to land, before the job ends. With 128 the job once
# ended first on CI's quiet machine; 384 take 94 s here with the kill and the rerun.
NODE_LOSS_ROWS = 384


@pytest.fixture(scope="module")
def node_loss_pcam_dir(tmp_path_factory):
    from meddiff.data.samples import SampleSizes, sample_pcam

    root = tmp_path_factory.mktemp("pcam-node-loss")
    sample_pcam(root, SampleSizes(train=NODE_LOSS_ROWS, valid=0, test=0), seed=0)
    return root


def test_ingest_survives_losing_the_worker_node(cluster, node_loss_pcam_dir, tmp_path, record):
    """Ray Data reruns the lost node's tasks on the head: every row exactly once."""
    _ensure_worker(cluster)
    [worker] = cluster.alive_workers()
    out = tmp_path / "shards"
    sid = f"meddiff-{uuid.uuid4().hex[:8]}"
    # One-row blocks read one at a time: a read task per row, long enough to kill a node mid-way.
    slow = [*INGEST, "--set", "data.pcam.rows_per_block=1", "--set", "data.read_concurrency=1"]
    start = time.perf_counter()
    submitted = cluster.submit(
        ["python", "jobs/ingest.py", "--input", str(node_loss_pcam_dir), "--split", "train",
         "--out", str(out), *slow],
        submission_id=sid, wait=False,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job = _wait_until(lambda: _job_id_or_none(cluster, sid), 180, "the job to start")

    def worker_has_run_tasks():
        return any(
            t["node_id"] == worker.node_id and t["state"] == "FINISHED"
            for t in cluster.job_tasks(job)
        )

    _wait_until(worker_has_run_tasks, 300, "a finished task on the worker node", poll=1)
    assert not shards.is_shard_dir(out), "the job ended before the node could be killed"
    pids = cluster.kill_node(worker.name)
    status = cluster.wait_for_job(sid, timeout=600)
    logs = cluster.job_logs(sid)
    assert "SUCCEEDED" in status, logs[-4000:]
    rows = _rows(out)  # asserts no (source, index) twice
    assert sorted(rows) == [(pcam_filename("train", "x"), i) for i in range(NODE_LOSS_ROWS)]
    assert shards.read_manifest(out)["rows"] == NODE_LOSS_ROWS
    record(
        "ingest_node_loss",
        {"rows_in": NODE_LOSS_ROWS, "rows_out": len(rows), "killed_pids": len(pids),
         "seconds": round(time.perf_counter() - start, 1)},
    )  # fmt: skip


def _wait_for_free_train_slots(cluster: Cluster, want: int, timeout: float = 120) -> None:
    """Best effort: wait until ``ray status`` shows ``want`` train slots free. Elastic training
    starts with the workers that fit at that moment; a worker node that had just (re)joined
    once gave a one-worker run (CI), which this test cannot use. Goes on after ``timeout`` or
    when the status cannot be read (the assertions then say what happened)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = cluster.ray("status", "--address", cluster.address, check=False)
        m = re.search(r"([\d.]+)/([\d.]+) train_slot", done.stdout)
        if m is None or float(m[2]) - float(m[1]) >= want:
            return
        time.sleep(2)


def _job_id_or_none(cluster: Cluster, sid: str) -> str | None:
    try:
        return cluster.job_id(sid)
    except ValueError:  # not listed yet
        return None


# THOR's tiny DDPM at 32 px (as tests/integration/test_thor_pipeline.py), two workers, one per
# node (train_slot), elastic down to one, a checkpoint every CKPT steps.
STEPS, CKPT = 40, 5
THOR = [
    "--preset", "tiny", *QUIET,
    "--set", "thor.model.image_size=32", "--set", "thor.model.channels=[16, 32]",
    "--set", "thor.model.attention_levels=[false, true]",
    "--set", "thor.model.num_head_channels=32", "--set", "thor.model.norm_groups=8",
    "--set", "thor.train.batch_size=4", "--set", "thor.train.epoch_images=64",
    "--set", f"thor.train.max_steps={STEPS}", "--set", f"thor.train.checkpoint_every={CKPT}",
    "--set", "thor.train.log_every=1", "--set", "thor.train.sample_every=0",
    "--set", "thor.train.num_workers=2", "--set", "thor.train.min_workers=1",
    "--set", "thor.train.resources_per_worker={train_slot: 1}",
]  # fmt: skip


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    from meddiff.config.data import MriConfig
    from meddiff.data.brain import BrainSampleSizes, sample_brain

    out = tmp_path_factory.mktemp("brain") / "brain"
    sample_brain(out, MriConfig(image_size=32), BrainSampleSizes(lesion=2, normal=2), seed=0)
    return out / "train"


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """SeaweedFS on loopback with a bucket; this process reaches it through ``storage``."""
    import servers

    from meddiff import storage
    from meddiff.config import StorageConfig
    from meddiff.runtime import _environ

    with servers.seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as s3, _environ(**s3.env()):
        s3.create_bucket("meddiff-mn")
        storage.configure(StorageConfig(endpoint_url=s3.endpoint))
        yield s3
        storage._settings = None


def test_training_spans_both_nodes_and_resumes_on_the_survivor(cluster, brain, bucket, record):
    """Ray Train puts one worker on each node, each writing its part of every checkpoint to the
    bucket (--out s3://...: no shared filesystem); when the worker node is lost it restarts from
    the bucket's latest checkpoint with the one worker that still fits (elastic), and registers
    once."""
    import mlflow

    from meddiff import storage
    from meddiff.training import latest_checkpoint

    _ensure_worker(cluster)
    [worker] = cluster.alive_workers()
    _wait_for_free_train_slots(cluster, 2)
    out, name = f"s3://meddiff-mn/thor-{uuid.uuid4().hex[:6]}", f"thor-mn-{uuid.uuid4().hex[:6]}"
    sid = f"meddiff-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    submitted = cluster.submit(
        ["python", "jobs/train_thor.py", "--data", str(brain), "--out", out, *THOR,
         "--set", f"thor.train.registered_name={name}",
         "--set", f"storage.endpoint_url={bucket.endpoint}"],
        env_vars=bucket.env(), submission_id=sid, wait=False,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    checkpoints = f"{out}/ray/thor-train"
    first = _wait_until(lambda: latest_checkpoint(checkpoints), 600, "the first checkpoint")
    # Both ranks' parts are in the bucket: rank 1's was uploaded from the worker node.
    parts = storage.list_files(first)
    assert {"meddiff_rank0.json", "meddiff_rank1.json"} <= set(parts), parts
    job = cluster.job_id(sid)
    names = cluster.node_ids()
    train_workers = [a for a in cluster.job_actors(job) if "TrainWorker" in a["class_name"]]
    first_ids = {a["actor_id"] for a in train_workers}
    first_nodes = sorted(names.get(a["node_id"], "?") for a in train_workers)
    assert first_nodes == ["head", worker.name], first_nodes
    cluster.kill_node(worker.name)

    status = cluster.wait_for_job(sid, timeout=900)
    logs = cluster.job_logs(sid)
    assert "SUCCEEDED" in status, logs[-4000:]
    assert storage.is_complete(out)
    summary = json.loads(storage.read_text(f"{out}/train_summary.json"))
    assert summary["steps"] == STEPS

    # Steps lost: the last step trained before the loss minus the step training resumed from.
    client = mlflow.MlflowClient()
    run_id = summary["mlflow_run_id"]
    resumed = sorted(
        client.get_metric_history(run_id, "resumed_from_step"), key=lambda m: m.timestamp
    )
    assert [m.value for m in resumed][0] == 0 and len(resumed) >= 2, resumed
    resume = resumed[1]
    assert resume.value > 0 and resume.value % CKPT == 0
    before = [m.step for m in client.get_metric_history(run_id, "loss")
              if m.timestamp < resume.timestamp]  # fmt: skip
    lost = max(before) - int(resume.value)
    assert 0 <= lost <= CKPT
    # After the loss the training workers ran on the head.
    restarted = [
        a for a in cluster.job_actors(job)
        if "TrainWorker" in a["class_name"] and a["actor_id"] not in first_ids
    ]  # fmt: skip
    assert restarted and {names.get(a["node_id"]) for a in restarted} == {"head"}
    versions = client.search_model_versions(f"name='{name}'")
    assert len(versions) == 1 and summary["model_uri"] == f"models:/{name}/1"
    record(
        "train_node_loss",
        {"steps": STEPS, "checkpoint_every": CKPT, "first_nodes": first_nodes,
         "checkpoints": checkpoints, "first_checkpoint_parts": len(parts),
         "last_step_before_loss": max(before), "resumed_from": int(resume.value),
         "steps_lost": lost, "registered_versions": len(versions),
         "workers_after_loss": len(restarted),
         "seconds": round(time.perf_counter() - start, 1)},
    )  # fmt: skip


def test_a_working_dir_without_the_package_fails_clearly(cluster, sample_pcam_dir, tmp_path):
    empty = tmp_path / "not-the-repo"
    empty.mkdir()
    (empty / "README.txt").write_text("submitted from the wrong directory\n")
    done = cluster.submit(
        ["python", "jobs/ingest.py", "--input", str(sample_pcam_dir), "--out", str(tmp_path / "o")],
        working_dir=empty,
        timeout=300,
    )
    out = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)  # without the CLI's colours
    assert done.returncode != 0, out
    assert "failed" in out.lower(), out
    assert "can't open file" in out and "jobs/ingest.py" in out, out
    assert not (tmp_path / "o").exists()


def test_unreachable_ray_address_is_a_one_line_error(sample_pcam_dir, tmp_path):
    import subprocess
    import sys

    from multinode import free_ports

    [port] = free_ports(1)
    meddiff = str(Path(sys.executable).with_name("meddiff"))
    done = subprocess.run(
        [meddiff, "data", "ingest", "--input", str(sample_pcam_dir), "--out", str(tmp_path / "o"),
         "--address", f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ""},
    )  # fmt: skip
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("meddiff: error:")]
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr and not (tmp_path / "o").exists()


def test_ingest_and_prompts_use_both_nodes_and_match_the_embedded_run(
    cluster, sample_pcam_dir, tmp_path
):
    _ensure_worker(cluster)  # the node-failure tests before this one killed theirs
    worker = cluster.alive_workers()[0].name
    shards_dir, prompts_dir = tmp_path / "cluster-shards", tmp_path / "cluster-prompts"
    ingest = ["python", "jobs/ingest.py", "--input", str(sample_pcam_dir), "--split", "train"]
    sid_i, _ = _submit(cluster, [*ingest, "--out", str(shards_dir), *INGEST])
    prompts = ["python", "jobs/build_prompts.py", "--preset", "tiny", *QUIET]
    prompts += ["--set", "prompts.embed.concurrency=2", "--set", "prompts.embed.num_cpus=0.5"]
    sid_p, _ = _submit(cluster, [*prompts, "--input", str(shards_dir), "--out", str(prompts_dir)])
    used_i, used_p = _nodes_used(cluster, sid_i), _nodes_used(cluster, sid_p)
    print(f"\ningest tasks per node: {dict(used_i)}; prompts tasks per node: {dict(used_p)}")
    assert set(used_i) == {"head", worker}, used_i
    assert set(used_i + used_p) == {"head", worker}

    # The same two steps on the embedded default give the same rows, labels and prompts.
    local_shards, local_prompts = tmp_path / "local-shards", tmp_path / "local-prompts"
    base = ["data", "ingest", "--input", str(sample_pcam_dir), "--split", "train"]
    assert cli_main([*base, "--out", str(local_shards), *INGEST]) == 0
    assert _rows(shards_dir) == _rows(local_shards)
    assert len(_rows(shards_dir)) == 128
    for key in ("rows", "labels", "columns"):
        assert shards.read_manifest(shards_dir)[key] == shards.read_manifest(local_shards)[key]
    assert cli_main(["prompts", "build", *prompts[2:], "--input", str(local_shards),
                     "--out", str(local_prompts)]) == 0  # fmt: skip
    assert (prompts_dir / "prompts.csv").read_text() == (local_prompts / "prompts.csv").read_text()
    cluster_pairs = shards.load_shards(prompts_dir / "pairs")
    local_pairs = shards.load_shards(local_prompts / "pairs")
    order_c = np.lexsort((cluster_pairs["index"], cluster_pairs["source"].astype(str)))
    order_l = np.lexsort((local_pairs["index"], local_pairs["source"].astype(str)))
    for col in ("index", "label", "cluster", "prompt"):
        assert list(cluster_pairs[col][order_c]) == list(local_pairs[col][order_l]), col
