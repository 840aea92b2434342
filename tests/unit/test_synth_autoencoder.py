"""The tiny preset's VAE warm-up: the perceptual distance over EfficientNet-Lite0, the fit itself
(pixel + perceptual terms, crops), and resuming an interrupted fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meddiff.config import load_config
from meddiff.config.synthesis import ArchConfig
from meddiff.errors import ConfigError
from meddiff.synthesis import components as C
from meddiff.synthesis.autoencoder import fit_vae
from meddiff.synthesis.perceptual import PerceptualDistance, efficientnet_lite0_trunk
from meddiff.weights import weight_file


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def distance():
    return PerceptualDistance("efficientnet-lite0")


@pytest.fixture(scope="module")
def tissue() -> np.ndarray:
    """Real 64-px patches of scikit-image's IHC colon image (nuclei and membranes)."""
    from meddiff.data.samples import ihc_tissue

    img = ihc_tissue()
    return np.stack([img[r : r + 64, c : c + 64] for r in (0, 150, 300) for c in (0, 200)])


def _pixels(images: np.ndarray) -> torch.Tensor:
    return C.preprocess_images(images, images.shape[1])


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    from torchvision.transforms.functional import gaussian_blur

    return gaussian_blur(x, kernel_size=2 * int(3 * sigma) + 1, sigma=sigma)


def test_the_trunk_carries_the_weight_file(distance):
    src = torch.load(weight_file("efficientnet-lite0"), map_location="cpu", weights_only=True)
    trunk = efficientnet_lite0_trunk()
    torch.testing.assert_close(trunk.conv_stem.weight, src["_conv_stem.weight"])
    torch.testing.assert_close(
        trunk.blocks[1][0].conv_pw.weight, src["_blocks.1._expand_conv.weight"]
    )
    assert not any(p.requires_grad for p in trunk.parameters()) and not trunk.training


def test_distance_is_zero_for_the_same_image_and_grows_with_blur(distance, tissue):
    x = _pixels(tissue)
    assert distance(x, x).abs().max() < 1e-6
    d = [float(distance(x, _blur(x, s)).mean()) for s in (0.5, 1.0, 2.0)]
    assert 0 < d[0] < d[1] < d[2]


def test_distance_gradients_reach_the_image_not_the_trunk(distance, tissue):
    x = _pixels(tissue[:2])
    y = _blur(x, 1.0).requires_grad_(True)
    distance(y, x).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in distance.trunk.parameters())


def test_unknown_network_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown perceptual network 'vgg99'"):
        PerceptualDistance("vgg99")


def _vae():
    torch.manual_seed(0)
    arch = ArchConfig(vae_channels=[8, 16], vae_layers_per_block=1, norm_num_groups=4)
    return C.build_vae(arch, 32)


def test_fit_with_perceptual_term_and_crops_learns_to_reconstruct(tissue):
    vae = _vae()
    x = C.preprocess_images(tissue, 32)

    def error() -> float:
        with torch.no_grad():
            return float(((vae.decode(vae.encode(x).latent_dist.mean).sample - x) ** 2).mean())

    logged = []
    before = error()
    fit_vae(
        vae, tissue, 32, 40, batch_size=4, crop=16, lr=1e-2,
        perceptual="efficientnet-lite0", perceptual_weight=0.5, log_every=20,
        on_log=lambda step, m: logged.append((step, m)),
    )  # fmt: skip
    assert error() < 0.65 * before  # whole 32-px images, though it only saw 16-px crops
    assert [s for s, _ in logged] == [20, 40]
    assert set(logged[-1][1]) == {"vae_loss", "vae_mse", "vae_perceptual"}
    assert logged[-1][1]["vae_perceptual"] > 0
    assert not any(p.requires_grad for p in vae.parameters())


class _Killed(Exception):
    pass


def test_an_interrupted_fit_resumes_to_the_same_weights(tissue, tmp_path):
    kw = {"batch_size": 3, "crop": 16, "lr": 5e-3, "seed": 3, "key": {"run": 1}}
    straight = _vae()
    fit_vae(straight, tissue, 32, 6, **kw)
    state = tmp_path / "warmup.pt"

    def kill_at_5(step, metrics):
        if step == 5:  # after step 3's save, with step 4 done and not saved
            raise _Killed

    with pytest.raises(_Killed):
        fit_vae(_vae(), tissue, 32, 6, state=state, checkpoint_every=3, log_every=1,
                on_log=kill_at_5, **kw)  # fmt: skip
    assert torch.load(state, weights_only=False)["step"] == 3
    resumed = _vae()
    steps = []
    fit_vae(resumed, tissue, 32, 6, state=state, checkpoint_every=3, log_every=1,
            on_log=lambda step, m: steps.append(step), **kw)  # fmt: skip
    assert steps == [4, 5, 6]
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_a_state_saved_for_other_settings_is_not_resumed(tissue, tmp_path):
    state = tmp_path / "warmup.pt"
    fit_vae(_vae(), tissue, 32, 2, batch_size=2, state=state, key={"run": 1})
    fresh, other = _vae(), _vae()
    fit_vae(fresh, tissue, 32, 2, batch_size=2, key={"run": 2})
    fit_vae(other, tissue, 32, 2, batch_size=2, state=state, key={"run": 2})
    for a, b in zip(fresh.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert torch.load(state, weights_only=False)["key"] == {"run": 2}


def test_crop_settings_are_checked():
    with pytest.raises(ConfigError, match="vae_warmup_crop 18 must be divisible"):
        load_config("tiny", overrides=["synthesis.model.arch.vae_warmup_crop=18"])
    with pytest.raises(ConfigError, match="larger than the resolution 32"):
        load_config("tiny", overrides=["synthesis.model.arch.vae_warmup_crop=64"])
    cfg = load_config("tiny")
    assert cfg.synthesis.model.arch.vae_perceptual == "efficientnet-lite0"
    assert load_config().synthesis.model.arch.vae_perceptual is None
