"""cluster.yaml, checked offline: Ray's own config preparation and schema validation (there is no
``ray up --dry-run``), and everything it mounts, installs and runs exists in this repository."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
REMOTE_REPO = "~/meddiff/"  # where file_mounts puts the repository on every node


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _commands(cfg: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands")
    keys += ("worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    cmds = [c for k in keys for c in cfg.get(k, [])]
    for node in cfg["available_node_types"].values():
        cmds += node.get("worker_setup_commands", []) + node.get("initialization_commands", [])
    return cmds


def _settings(cfg: dict) -> dict[str, str]:
    """KEY=VALUE pairs the settings command writes to ~/meddiff.env."""
    [cmd] = [c for c in cfg["setup_commands"] if c.rstrip().endswith("> ~/meddiff.env")]
    words = shlex.split(cmd.rsplit(">", 1)[0])
    return dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))


def test_ray_prepares_and_validates_the_config(cluster):
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)  # raises on any schema or consistency error
    assert prepared["head_node_type"] == "head"
    assert prepared["available_node_types"]["head"]["max_workers"] == 0


def test_validation_would_catch_a_misspelt_key(cluster):
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_worker"]["resourcez"] = broken["available_node_types"][
        "gpu_worker"
    ].pop("resources")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_what_it_mounts_and_installs_exists_in_the_repo(cluster):
    for remote, local in cluster["file_mounts"].items():
        if not local.startswith("~"):  # user files (the auth token) live on the launching machine
            assert (ROOT / local).exists(), f"file_mounts {remote}: {local} not in the repo"
    assert cluster["file_mounts"]["/home/ubuntu/meddiff"] == "."
    used = {m for c in _commands(cluster) for m in re.findall(r"~/meddiff/([\w./-]+)", c)}
    assert "requirements/lock.txt" in used
    for path in used:
        assert (ROOT / path).exists(), f"cluster.yaml uses ~/meddiff/{path}, not in the repo"


def test_jobs_it_submits_exist(cluster):
    text = (ROOT / "cluster.yaml").read_text()
    jobs = set(re.findall(r"python (jobs/\w+\.py)", text))
    assert jobs, "cluster.yaml shows no job submission"
    for job in jobs:
        assert (ROOT / job).is_file(), f"cluster.yaml submits {job}, not in the repo"


def test_settings_in_one_place_reach_every_ray_process(cluster):
    settings = _settings(cluster)
    assert re.fullmatch(r"https?://\S+", settings["MLFLOW_TRACKING_URI"])
    assert re.fullmatch(r"https?://\S+", settings["AWS_ENDPOINT_URL"])
    # Set nowhere else (one place), and loaded before every `ray start`.
    for cmd in _commands(cluster):
        if "> ~/meddiff.env" not in cmd:
            assert "MLFLOW_TRACKING_URI=" not in cmd and "AWS_ENDPOINT_URL=" not in cmd
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        [start] = [c for c in cluster[key] if "ray start" in c]
        assert start.startswith(". ~/meddiff.env &&"), start
        assert "RAY_AUTH_MODE=token" in start  # token auth stays on


def test_gpu_workers_fit_deepspeed_training(cluster):
    nodes = cluster["available_node_types"]
    multi = [n for n in nodes.values() if n["resources"].get("GPU", 0) >= 4]
    assert multi, "no multi-GPU node type for DeepSpeed"
    for node in multi:
        assert node["resources"]["CPU"] >= 4 * node["resources"]["GPU"]  # data loading per GPU
        assert node["node_config"]["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] >= 200
    # DeepSpeed is part of the pinned environment every node installs.
    assert re.search(r"^deepspeed==", (ROOT / "requirements/lock.txt").read_text(), re.M)
    # Every worker type carries the resource that steers work off the head.
    for name, node in nodes.items():
        assert node["resources"].get("worker_node" if name != "head" else "head_node") == 1
