from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from meddiff.data import pcam
from meddiff.data.pcam import PCamWriter, open_pcam, read_meta, read_rows, write_pcam
from meddiff.errors import DataError


def _images(n: int, size: int = 96, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _write_raw(root: Path, split: str, x: np.ndarray, y: np.ndarray) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with h5py.File(root / pcam.pcam_filename(split, "x"), "w") as f:
        f.create_dataset("x", data=x)
    with h5py.File(root / pcam.pcam_filename(split, "y"), "w") as f:
        f.create_dataset("y", data=y)


def test_write_then_read_round_trip(tmp_path: Path):
    images, labels = _images(10), np.array([0, 1] * 5)
    write_pcam(tmp_path, "valid", images, labels)
    split = open_pcam(tmp_path, "valid")
    assert split.num_rows == 10 and split.patch_size == 96
    rows = read_rows(split, 2, 7)
    np.testing.assert_array_equal(rows["image"], images[2:7])
    np.testing.assert_array_equal(rows["label"], labels[2:7])
    np.testing.assert_array_equal(rows["index"], np.arange(2, 7))


def test_blocks_cover_range_in_bounded_pieces(tmp_path: Path):
    write_pcam(tmp_path, "train", _images(23), np.zeros(23, dtype=int))
    blocks = list(pcam.iter_blocks(open_pcam(tmp_path, "train"), 3, 23, rows=8))
    assert [len(b["label"]) for b in blocks] == [8, 8, 4]
    assert blocks[-1]["index"][-1] == 22


def test_gzipped_split_is_read_through_cache(tmp_path: Path):
    src = tmp_path / "src"
    images = _images(4)
    write_pcam(src, "test", images, np.array([1, 0, 1, 0]))
    for kind in ("x", "y"):
        name = pcam.pcam_filename("test", kind)
        with open(src / name, "rb") as f_in, gzip.open(src / (name + ".gz"), "wb") as f_out:
            shutil.copyfileobj(f_in, f_out)
        (src / name).unlink()
    split = open_pcam(src, "test", cache_dir=tmp_path / "cache")
    assert split.x_source.name.endswith(".h5.gz") and split.x_path.suffix == ".h5"
    np.testing.assert_array_equal(read_rows(split, 0, 4)["image"], images)
    # a second open reuses the decompressed copy
    assert open_pcam(src, "test", cache_dir=tmp_path / "cache").x_path == split.x_path


def test_corrupt_gzip_is_named_and_leaves_no_cache(tmp_path: Path):
    write_pcam(tmp_path, "test", _images(2), np.array([0, 1]))
    x = tmp_path / pcam.pcam_filename("test", "x")
    (tmp_path / (x.name + ".gz")).write_bytes(gzip.compress(x.read_bytes())[:500])
    x.unlink()
    with pytest.raises(DataError, match=r"_test_x\.h5\.gz: cannot decompress"):
        open_pcam(tmp_path, "test", cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*"))


def test_missing_split_file(tmp_path: Path):
    write_pcam(tmp_path, "train", _images(2), np.array([0, 1]))
    (tmp_path / pcam.pcam_filename("train", "y")).unlink()
    with pytest.raises(DataError, match=r"missing camelyonpatch_level_2_split_train_y\.h5"):
        open_pcam(tmp_path, "train")


def test_length_mismatch(tmp_path: Path):
    _write_raw(tmp_path, "train", _images(5), np.zeros((4, 1, 1, 1), np.uint8))
    with pytest.raises(DataError, match="has 5 patches but .*_y.h5 has 4 labels"):
        open_pcam(tmp_path, "train")


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.zeros((3, 64, 64, 3), np.uint8), r"shape \(3, 64, 64, 3\); expected \(N, 96, 96, 3\)"),
        (np.zeros((3, 96, 96), np.uint8), r"shape \(3, 96, 96\)"),
        (np.zeros((3, 96, 96, 3), np.float32), "dtype float32; expected uint8"),
    ],
)
def test_wrong_shape_or_dtype_names_file(tmp_path: Path, x: np.ndarray, message: str):
    _write_raw(tmp_path, "train", x, np.zeros((3, 1, 1, 1), np.uint8))
    with pytest.raises(DataError, match=rf"_train_x\.h5: dataset 'x' has {message}"):
        open_pcam(tmp_path, "train")


def test_bad_labels(tmp_path: Path):
    _write_raw(tmp_path, "train", _images(3), np.array([0, 2, 1], np.uint8).reshape(3, 1, 1, 1))
    with pytest.raises(DataError, match="label 2 at row 1"):
        open_pcam(tmp_path, "train")
    _write_raw(tmp_path, "valid", _images(3), np.zeros((3, 1), np.uint8))
    with pytest.raises(DataError, match=r"dataset 'y' has shape \(3, 1\)"):
        open_pcam(tmp_path, "valid")


def test_not_hdf5(tmp_path: Path):
    write_pcam(tmp_path, "train", _images(2), np.array([0, 1]))
    (tmp_path / pcam.pcam_filename("train", "x")).write_text("this is not HDF5")
    with pytest.raises(
        DataError, match=r"_train_x\.h5: not a readable HDF5 file \(no HDF5 signature"
    ):
        open_pcam(tmp_path, "train")


def test_missing_dataset_lists_what_is_there(tmp_path: Path):
    write_pcam(tmp_path, "train", _images(2), np.array([0, 1]))
    with h5py.File(tmp_path / pcam.pcam_filename("train", "x"), "w") as f:
        f.create_dataset("images", data=_images(2))
    with pytest.raises(DataError, match="no dataset 'x' \\(found: images\\)"):
        open_pcam(tmp_path, "train")


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_file(tmp_path: Path, keep: float):
    write_pcam(tmp_path, "train", _images(600), np.zeros(600, dtype=int))
    x = tmp_path / pcam.pcam_filename("train", "x")
    data = x.read_bytes()
    x.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(DataError, match=r"_train_x\.h5: .*truncated"):
        open_pcam(tmp_path, "train")


def test_writer_is_all_or_nothing(tmp_path: Path):
    with pytest.raises(RuntimeError), PCamWriter(tmp_path, "train") as writer:
        writer.write(_images(4), [0, 1, 0, 1])
        raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_batches_and_writes_meta(tmp_path: Path):
    with PCamWriter(tmp_path, "train") as writer:
        with pytest.raises(DataError, match=r"uint8 \(n, 96, 96, 3\)"):
            writer.write(_images(2, size=64), [0, 1])
        with pytest.raises(DataError, match="one 0/1 label per image"):
            writer.write(_images(2), [0, 3])
        writer.write(_images(2), [0, 1], meta={"prompt": ["a", "b"], "seed": [1, 2]})
        writer.write(_images(1), [1], meta={"prompt": ["c"], "seed": [3]})
    assert open_pcam(tmp_path, "train").num_rows == 3
    meta = read_meta(tmp_path, "train")
    assert [r["prompt"] for r in meta] == ["a", "b", "c"] and meta[2]["seed"] == "3"
    assert read_meta(tmp_path, "valid") is None
