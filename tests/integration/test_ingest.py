from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest

from meddiff.cli import find_user_error, user_message
from meddiff.cli import main as cli_main
from meddiff.config import Config, load_config
from meddiff.data import pcam, shards
from meddiff.data.datasets import patch_dataset
from meddiff.data.ingest import ingest
from meddiff.errors import DataError


def test_ingest_streams_pcam_into_shards(tiny_cfg: Config, sample_pcam_dir: Path, tmp_path: Path):
    out = tmp_path / "shards"
    manifest = ingest(tiny_cfg, sample_pcam_dir, out, split="train")
    assert manifest["rows"] == 128 and shards.is_shard_dir(out)
    assert not (tmp_path / "shards.partial").exists()

    source = pcam.read_rows(pcam.open_pcam(sample_pcam_dir, "train"), 0, 128)
    loaded = shards.load_shards(out)
    order = np.argsort(loaded["index"])
    np.testing.assert_array_equal(loaded["image"][order], source["image"])
    np.testing.assert_array_equal(loaded["label"][order], source["label"])
    assert set(loaded["source"]) == {str(sample_pcam_dir / pcam.pcam_filename("train", "x"))}
    assert manifest["labels"] == {
        str(k): int(v) for k, v in zip(*np.unique(source["label"], return_counts=True), strict=True)
    }

    # The shards stream back through Ray Data as the same batches.
    assert patch_dataset(out, tiny_cfg.data).count() == 128

    runs = mlflow.search_runs(
        experiment_names=["meddiff"], filter_string="tags.`meddiff.job` = 'ingest'"
    )
    assert (runs["metrics.rows"] == 128).any()
    assert "params.data.pcam.rows_per_block" in runs.columns  # the resolved config is logged


def test_pcam_blocks_arrive_whole(sample_pcam_dir: Path):
    # Ray Data must not cut the reader's blocks into pieces (it does when left to choose the
    # number of read tasks for a short file), so the consumer gets them without re-assembly.
    cfg = load_config("tiny", overrides=["data.pcam.rows_per_block=64"])
    ds = patch_dataset(sample_pcam_dir, cfg.data)
    sizes = [len(b["label"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy")]
    assert sizes == [64, 64]


def test_ingest_limit_and_refuses_to_clobber(
    tiny_cfg: Config, sample_pcam_dir: Path, tmp_path: Path
):
    out = tmp_path / "shards"
    assert ingest(tiny_cfg, sample_pcam_dir, out, split="valid", limit=20)["rows"] == 20
    code = cli_main(
        ["data", "ingest", "--preset", "tiny", "--input", str(sample_pcam_dir), "--out", str(out)]
    )
    assert code == 2
    assert shards.read_manifest(out)["rows"] == 20  # untouched


def test_corrupt_input_gives_clear_error_and_no_output(
    sample_pcam_dir: Path, tmp_path: Path, capsys
):
    bad = tmp_path / "bad"
    bad.mkdir()
    for kind in ("x", "y"):
        name = pcam.pcam_filename("train", kind)
        data = (sample_pcam_dir / name).read_bytes()
        (bad / name).write_bytes(data[: len(data) // 2] if kind == "x" else data)
    out = tmp_path / "out"
    code = cli_main(["data", "ingest", "--preset", "tiny", "--input", str(bad), "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "camelyonpatch_level_2_split_train_x.h5" in err and "truncated" in err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_unknown_input_is_named(tmp_path: Path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    code = cli_main(
        [
            "data",
            "ingest",
            "--preset",
            "tiny",
            "--input",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "not a PCam directory" in capsys.readouterr().err


def test_user_errors_raised_inside_ray_reach_the_cli_unwrapped():
    import ray

    def _fail(batch):  # local, so Ray ships it by value to the workers
        raise DataError("slide.tif: no tissue found")

    with pytest.raises(Exception) as task_err:
        ray.get(ray.remote(_fail).remote({}))
    with pytest.raises(Exception) as data_err:
        ray.data.range(4).map_batches(_fail).materialize()
    for err in (task_err.value, data_err.value):
        found = find_user_error(err)
        assert isinstance(found, DataError)
        assert user_message(found) == "slide.tif: no tissue found"
    assert find_user_error(RuntimeError("a bug")) is None
