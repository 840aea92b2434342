"""`meddiff serve check`: strict keys (Ray's schema drops misspelt ones), meddiff's args and
user_config, and the shipped Serve configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from meddiff.errors import ConfigError
from meddiff.serving.check import check_config, shipped_config


def write(tmp_path, data) -> Path:
    p = tmp_path / "serve.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def tiny() -> dict:
    return yaml.safe_load(shipped_config("tiny").read_text())


@pytest.mark.parametrize("name", ["tiny", "full"])
def test_shipped_configs_are_valid(name):
    entries = check_config(shipped_config(name), resolve_models=False)
    assert [e["kind"] for e in entries] == ["anomaly", "synthesis"]


def test_misspelt_deployment_key_is_named_with_suggestion(tmp_path):
    data = tiny()
    dep = data["applications"][0]["deployments"][0]
    dep["max_ongoing_requestz"] = dep.pop("max_ongoing_requests")
    with pytest.raises(
        ConfigError,
        match=r"max_ongoing_requestz: unknown key \(did you mean 'max_ongoing_requests'",
    ):
        check_config(write(tmp_path, data), resolve_models=False)


def test_nested_and_top_level_keys_are_checked(tmp_path):
    data = tiny()
    data["applications"][0]["deployments"][0]["ray_actor_options"]["num_cpu"] = 3
    data["http_option"] = {}
    with pytest.raises(ConfigError) as err:
        check_config(write(tmp_path, data), resolve_models=False)
    assert "ray_actor_options.num_cpu: unknown key" in str(err.value)
    assert "http_option: unknown key" in str(err.value)


def test_meddiff_args_and_user_config_are_strict(tmp_path):
    data = tiny()
    data["applications"][0]["args"]["max_body"] = 5
    with pytest.raises(ConfigError, match="args: max_body"):
        check_config(write(tmp_path, data), resolve_models=False)
    data = tiny()
    data["applications"][0]["args"]["set"] = ["thor.infer.strid=25"]
    with pytest.raises(ConfigError, match="strid: unknown key"):
        check_config(write(tmp_path, data), resolve_models=False)
    data = tiny()
    data["applications"][1]["deployments"][0]["user_config"]["max_batch_size"] = 0
    with pytest.raises(ConfigError, match="user_config: max_batch_size"):
        check_config(write(tmp_path, data), resolve_models=False)


def test_unknown_builder_is_refused(tmp_path):
    data = tiny()
    data["applications"][0]["import_path"] = "mymod:app"
    with pytest.raises(ConfigError, match="import_path 'mymod:app'"):
        check_config(write(tmp_path, data), resolve_models=False)


def test_tiny_config_fits_two_cores():
    """Every replica the shipped tiny.yaml can ask for (at its maximum scale) fits a 2-CPU machine
    without a GPU; tests/integration/test_serving_ops.py deploys it to RUNNING."""
    cpus = gpus = 0.0
    for app in tiny()["applications"]:
        for dep in app["deployments"]:
            scale = dep.get("autoscaling_config", {}).get(
                "max_replicas", dep.get("num_replicas", 1)
            )
            opts = dep.get("ray_actor_options", {})
            cpus += scale * opts.get("num_cpus", 1)
            gpus += scale * opts.get("num_gpus", 0)
    assert cpus <= 2 and gpus == 0, (cpus, gpus)


def test_default_config_is_package_data_found_through_importlib_resources():
    from importlib.resources import files

    from meddiff.commands.serve import DEFAULT_CONFIG

    assert Path(str(files("meddiff.serving") / "configs" / "tiny.yaml")) == DEFAULT_CONFIG
    assert DEFAULT_CONFIG.is_file()
    with pytest.raises(ConfigError, match=r"no shipped Serve config 'tinny'; shipped: full, tiny"):
        shipped_config("tinny")


def test_an_installed_wheel_ships_the_serve_configs(tmp_path):
    """The wheel holds the Serve configs, and meddiff installed from it, with no checkout around
    it, finds its default config there (the repository's layout once did it through
    ``parents[3]``)."""
    import shutil
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[2]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    junk = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(root / "platform", src / "platform", ignore=junk)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(src), "-w",
                    str(tmp_path / "dist")], check=True, capture_output=True)  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("meddiff-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"meddiff/serving/configs/tiny.yaml", "meddiff/serving/configs/full.yaml"} <= names
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)  # fmt: skip
    code = "from meddiff.commands.serve import DEFAULT_CONFIG as c; print(c, c.is_file())"
    env = {**os.environ, "PYTHONPATH": str(site)}  # before the checkout's editable install
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout.split()  # fmt: skip
    assert out == [str(site / "meddiff" / "serving" / "configs" / "tiny.yaml"), "True"]
