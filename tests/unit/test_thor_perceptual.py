"""THOR's perceptual term: spatial LPIPS over SqueezeNet (as the lpips package computes it) and
over HED's VGG16 trunk, which installs offline."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from meddiff.config.thor import InferConfig, ScheduleConfig, SimplexConfig
from meddiff.thor.inferer import ThorInferer
from meddiff.thor.perceptual import load_perceptual, map_kind
from meddiff.thor.schedule import DDPMSchedule
from meddiff.weights import weight_file


@pytest.fixture(scope="module")
def hed():
    return load_perceptual("vgg16-hed")


def _camera(size: int) -> np.ndarray:
    import skimage.data
    from skimage.transform import resize

    return resize(skimage.data.camera() / 255.0, (size, size), anti_aliasing=True)


def _t(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32))[None, None]


def test_squeeze_distance_equals_the_lpips_package():
    import lpips

    torch.manual_seed(0)
    mine = load_perceptual("random")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lpips.LPIPS(net="squeeze", spatial=True, pnet_rand=True, verbose=False).eval()
    layers = {n: m for block in mine.trunk for n, m in block.named_children()}
    for i in range(1, ref.net.N_slices + 1):
        for name, module in getattr(ref.net, f"slice{i}").named_children():
            module.load_state_dict(layers[name].state_dict())
    a, b = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        expected = ref(a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1), normalize=True)
        torch.testing.assert_close(mine(a, b), expected, atol=1e-6, rtol=1e-5)
        # The split the inferer uses (the reference image's features once) gives the same map.
        split = mine.distance(mine.features(a), mine.features(b), (32, 32))
        torch.testing.assert_close(split, expected, atol=1e-6, rtol=1e-5)
        # An image's map is the same, to the bit, whatever batch it is in.
        alone = mine.distance(mine.features(a[1:]), mine.features(b[1:]), (32, 32))
        assert torch.equal(alone[0], split[1])


def test_hed_trunk_is_loaded_as_hed_computes_edges(hed):
    """HED's own side outputs and fusion layer, read from the same file, on our trunk's features
    give an edge map of a photograph (against Canny's edges); the same trunk fed torchvision's
    input scaling instead of Caffe's BGR mean subtraction gives a worse one."""
    import h5py
    from skimage.feature import canny
    from sklearn.metrics import roc_auc_score

    img = _camera(128)
    edges = canny(img, sigma=2).ravel()

    def fused(x: torch.Tensor) -> np.ndarray:
        with h5py.File(weight_file("hed-vgg16"), "r") as f:
            sides = []
            for k, block in enumerate(hed.trunk, start=1):
                x = block(x)
                w = torch.from_numpy(f[f"dsn{k}/vars/0"][()]).permute(3, 2, 0, 1)
                side = torch.nn.functional.conv2d(x, w, torch.from_numpy(f[f"dsn{k}/vars/1"][()]))
                sides.append(torch.nn.functional.interpolate(side, size=img.shape, mode="bilinear"))
            w = torch.from_numpy(f["fuse/vars/0"][()]).permute(3, 2, 0, 1)
            out = torch.nn.functional.conv2d(
                torch.cat(sides, 1), w, torch.from_numpy(f["fuse/vars/1"][()])
            )
        return torch.sigmoid(out)[0, 0].numpy().ravel()

    x = _t(img).expand(-1, 3, -1, -1)
    with torch.no_grad():
        right = roc_auc_score(edges, fused(hed.preprocess(x)))
        wrong = roc_auc_score(edges, fused((x - 0.45) / 0.225))  # torchvision-style input
    assert right > 0.9 and right > wrong + 0.02


def test_vgg16_hed_orders_blur_and_noise_and_names_itself(hed):
    img = _camera(64)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        assert float(hed(_t(img), _t(img)).abs().max()) < 1e-6
        blur = [
            float(hed(_t(img), _t(ndimage.gaussian_filter(img, s))).mean()) for s in (0.5, 1, 2, 3)
        ]
        noise = [
            float(hed(_t(img), _t(np.clip(img + rng.normal(0, s, img.shape), 0, 1))).mean())
            for s in (0.01, 0.03, 0.1, 0.3)
        ]
    assert blur == sorted(blur) and noise == sorted(noise)
    assert hed.kind == map_kind("vgg16-hed") == "residual_x_lpips_vgg16_hed"
    # Per-layer weights: each layer's LPIPS weights' mean on every channel.
    lin = torch.load(weight_file("lpips-vgg-lin"), map_location="cpu", weights_only=True)
    for i in range(5):
        w = getattr(hed, f"w{i}").flatten()
        assert torch.allclose(w, torch.full_like(w, float(lin[f"lin{i}.model.1.weight"].mean())))
    per_channel = load_perceptual("vgg16-hed-lin")
    torch.testing.assert_close(per_channel.w3.flatten(), lin["lin3.model.1.weight"].flatten())
    assert per_channel.kind == "residual_x_lpips_vgg16_hed_channel_lin"


def test_thor_plan_and_maps_say_which_perceptual_term_made_them():
    from meddiff.config.thor import UNetConfig
    from meddiff.thor.unet import DiffusionUNet

    cfg = InferConfig(lpips="vgg16-hed", stride=50, noise_level=100, harmonization_steps=(50,))
    inferer = ThorInferer.from_config(DDPMSchedule(ScheduleConfig()), cfg, SimplexConfig())
    plan = inferer.describe()
    assert plan["map_kind"] == "residual_x_lpips_vgg16_hed" and plan["residual_only"] is False
    small = UNetConfig(
        image_size=32, channels=(8, 16), attention_levels=(False, False), norm_groups=8,
        num_head_channels=8,
    )  # fmt: skip
    torch.manual_seed(0)
    det = inferer(DiffusionUNet(small).eval(), torch.rand(2, 1, 32, 32), seeds=[1, 2])
    assert det.anomaly_map.shape == (2, 1, 32, 32) and float(det.anomaly_map.max()) > 0


def test_images_too_small_for_vgg16_are_refused_before_any_work(tmp_path):
    from meddiff.config import load_config
    from meddiff.config.thor import UNetConfig
    from meddiff.errors import ConfigError
    from meddiff.thor.detect import plan_for
    from meddiff.thor.model import save_model
    from meddiff.thor.unet import DiffusionUNet

    small = UNetConfig(
        image_size=8, channels=(8, 8), attention_levels=(False, False), norm_groups=4,
        num_head_channels=8,
    )  # fmt: skip
    out = save_model(tmp_path / "m", DiffusionUNet(small), small, ScheduleConfig())
    with pytest.raises(ConfigError, match=r"lpips=vgg16-hed needs images of at least 16x16"):
        plan_for(load_config("tiny"), str(out))
    off = load_config("tiny", overrides=["thor.infer.lpips=off"])
    assert plan_for(off, str(out))["residual_only"] is True
