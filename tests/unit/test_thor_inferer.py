"""The THOR inferer's loop: harmonization keeps lesion-free tissue, plan validation, batching."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from meddiff.config.thor import InferConfig, ScheduleConfig, SimplexConfig, UNetConfig
from meddiff.errors import ConfigError, DataError
from meddiff.thor import maps
from meddiff.thor.inferer import ThorInferer, draw_seed
from meddiff.thor.noise import make_noise
from meddiff.thor.schedule import DDPMSchedule
from meddiff.thor.unet import DiffusionUNet

SIZE = 32
SCHEDULE = DDPMSchedule(ScheduleConfig())


class ToyDenoiser:
    """A stand-in for a DDPM trained on healthy images, with known behaviour; a plain
    ``(x_t, t) → ε`` callable, not a module (the inferer needs nothing else).

    It recovers the clean image under x_t exactly (it is told the noise ε the inferer drew),
    replaces the lesion by healthy tissue (the learned prior), and blurs its estimate more the
    noisier the input (a real DDPM loses fine healthy detail at high t).
    """

    def __init__(self, eps: torch.Tensor, healthy: torch.Tensor, lesion: torch.Tensor, level: int):
        self.eps, self.healthy, self.lesion, self.level = eps, healthy, lesion, level
        self.calls = 0

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        step = int(t[0])
        ab = SCHEDULE.alpha_bar(step)
        clean = (x_t - math.sqrt(1 - ab) * self.eps) / math.sqrt(ab)
        clean = torch.where(self.lesion, self.healthy * 2 - 1, clean)
        x0 = maps.gaussian_blur(clean, 3.0 * step / self.level)
        return (x_t - math.sqrt(ab) * x0) / math.sqrt(1 - ab)


def scene() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input with a bright lesion, the healthy image, lesion mask), each (1, 1, 32, 32)."""
    g = torch.Generator().manual_seed(3)
    healthy = 0.5 + 0.15 * torch.rand(1, 1, SIZE, SIZE, generator=g)  # fine healthy texture
    lesion = torch.zeros(1, 1, SIZE, SIZE, dtype=torch.bool)
    lesion[..., 13:19, 13:19] = True
    image = torch.where(lesion, healthy + 0.3, healthy)
    return image, healthy, lesion


def run(method: str, stride: int = 25):
    image, healthy, lesion = scene()
    cfg = InferConfig(method=method, stride=stride, lpips="off", morph_kernel=5)
    inferer = ThorInferer(SCHEDULE, cfg, SimplexConfig())
    seeds = [11]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    eps = make_noise(inferer.noise, tuple(image.shape), inferer.level, SimplexConfig(), gens)
    net = ToyDenoiser(eps, healthy, lesion, inferer.level)
    return inferer(net, image, seeds=seeds, keep_step_maps=True), image, healthy, lesion, net


def test_thor_keeps_lesion_free_tissue_and_removes_the_lesion():
    thor, image, healthy, lesion, net = run("thor")
    ddpm, *_ = run("ddpm")
    far = ~maps.grey_dilation(lesion.float(), 9).bool()  # well away from the lesion
    thor_err = (thor.reconstruction - image).abs()[far].mean()
    ddpm_err = (ddpm.reconstruction - image).abs()[far].mean()
    # The plain reconstruction loses the healthy texture; THOR blends the input back in.
    assert thor_err < 0.3 * ddpm_err
    assert thor_err < 0.01
    # Inside the lesion THOR produces healthy tissue, not the input.
    core = torch.zeros_like(lesion)
    core[..., 14:18, 14:18] = True
    assert (thor.reconstruction - healthy).abs()[core].mean() < 0.05
    assert (thor.reconstruction - image).abs()[core].mean() > 0.2
    # So the final map is high on the lesion and low elsewhere.
    assert thor.anomaly_map[lesion].mean() > 5 * thor.anomaly_map[far].mean()
    assert thor.score.shape == (1,)
    assert thor.score[0] == pytest.approx(float(thor.anomaly_map.mean()))
    assert float(thor.anomaly_map.max()) <= 0.999


def test_thor_visits_strided_steps_plus_map_and_harmonization_steps():
    thor, *_, net = run("thor", stride=40)
    # T=350, stride 40: 350, 310, ..., 30, plus 0 and the multiples of 50 (maps, harmonization)
    inferer = ThorInferer(SCHEDULE, InferConfig(stride=40, lpips="off"), SimplexConfig())
    expected = sorted(set(range(350, -1, -40)) | set(range(0, 351, 50)), reverse=True)
    assert inferer.steps == expected
    assert net.calls == len(expected)
    assert sorted(thor.step_maps) == list(range(0, 351, 50))
    assert inferer.describe()["forwards_per_image"] == len(expected)


def test_full_schedule_visits_every_step_and_the_final_map_is_the_harmonic_mean():
    cfg = InferConfig(lpips="off", noise_level=120, harmonization_steps=(50, 100))
    inferer = ThorInferer(SCHEDULE, cfg, SimplexConfig())
    assert inferer.steps == list(range(120, -1, -1))
    assert inferer.harmonization == (100, 50)
    image, healthy, lesion = scene()
    net = ToyDenoiser(torch.zeros_like(image), healthy, lesion, 120)
    det = inferer(net, image, seeds=[1], keep_step_maps=True)
    assert net.calls == 121
    stacked = torch.stack([det.step_maps[t] for t in (100, 50, 0)])
    torch.testing.assert_close(det.anomaly_map, maps.harmonic_mean(stacked).clamp(0, 0.999))


def test_results_do_not_depend_on_batching():
    cfg = UNetConfig(image_size=16, channels=(8, 16), attention_levels=(False, True),
                     norm_groups=8, num_head_channels=16)  # fmt: skip
    torch.manual_seed(0)
    unet = DiffusionUNet(cfg).eval()
    for p in unet.parameters():  # non-zero outputs (the last layers start at zero)
        nn.init.normal_(p, std=0.05)
    images = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    inferer = ThorInferer(SCHEDULE, InferConfig(stride=50, lpips="off"), SimplexConfig())
    together = inferer(unet, images, seeds=[7, 8, 9])
    alone = inferer(unet, images[1:2], seeds=[8])
    torch.testing.assert_close(together.anomaly_map[1:2], alone.anomaly_map, atol=1e-5, rtol=0)


def test_draws_average_the_maps_of_independent_noise_draws():
    cfg = UNetConfig(image_size=16, channels=(8, 16), attention_levels=(False, True),
                     norm_groups=8, num_head_channels=16)  # fmt: skip
    torch.manual_seed(0)
    unet = DiffusionUNet(cfg).eval()
    for p in unet.parameters():
        nn.init.normal_(p, std=0.05)
    images = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    one = ThorInferer(SCHEDULE, InferConfig(stride=50, lpips="off"), SimplexConfig())
    three = ThorInferer(SCHEDULE, InferConfig(stride=50, lpips="off", draws=3), SimplexConfig())
    det = three(unet, images, seeds=[7, 8])
    singles = [one(unet, images, seeds=[draw_seed(s, k) for s in (7, 8)]) for k in range(3)]
    assert not torch.allclose(singles[0].anomaly_map, singles[1].anomaly_map)  # draws differ
    mean = torch.stack([d.anomaly_map for d in singles]).mean(dim=0)
    torch.testing.assert_close(det.anomaly_map, mean)
    torch.testing.assert_close(det.score, mean.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(det.reconstruction, singles[0].reconstruction)
    assert three.describe()["forwards_per_image"] == 3 * len(three.steps)


def test_noise_level_above_the_schedule_is_an_error():
    with pytest.raises(ConfigError, match=r"T=1200 .*last step is 999"):
        ThorInferer(SCHEDULE, InferConfig(noise_level=1200), SimplexConfig())


def test_harmonization_step_above_t_is_an_error():
    with pytest.raises(ConfigError, match=r"step 400, above the noise level T=350"):
        ThorInferer(SCHEDULE, InferConfig(harmonization_steps=(400, 50)), SimplexConfig())


def test_wrong_image_shape_is_an_error():
    image, healthy, lesion = scene()
    net = ToyDenoiser(torch.zeros_like(image), healthy, lesion, 350)
    inferer = ThorInferer(SCHEDULE, InferConfig(lpips="off"), SimplexConfig())
    with pytest.raises(DataError, match=r"\(B, 1, 32, 32\).*\(1, 3, 32, 32\)"):
        inferer(net, image.expand(1, 3, SIZE, SIZE), image_shape=(1, SIZE, SIZE))


def test_baselines_report_residual_maps_and_no_harmonization():
    inferer = ThorInferer(SCHEDULE, InferConfig(method="anoddpm"), SimplexConfig())
    plan = inferer.describe()
    assert plan["noise"] == "simplex" and plan["noise_level"] == 250
    assert plan["harmonization_steps"] == []
    assert "baseline" in plan["map_kind"]


def test_lpips_switched_off_in_config_gives_residual_only_plan_and_maps():
    from meddiff.config import load_config

    assert load_config("tiny").thor.infer.lpips == "vgg16-hed"  # the trunk that installs offline
    # fp32: the toy's blur is a convolution, which bf16 autocast would round (precision=auto is
    # bf16 on CPUs with native bf16); the comparison below is exact arithmetic.
    cfg = InferConfig(lpips="off", precision="fp32")
    inferer = ThorInferer.from_config(SCHEDULE, cfg, SimplexConfig())
    assert inferer.perceptual is None and inferer.residual_only
    plan = inferer.describe()
    assert plan["map_kind"] == "residual-only (LPIPS off)" and plan["residual_only"]
    image, healthy, lesion = scene()
    gens = [torch.Generator().manual_seed(5)]
    eps = make_noise("gaussian", tuple(image.shape), 350, SimplexConfig(), gens)
    net = ToyDenoiser(eps, healthy, lesion, 350)
    det = inferer(net, image, seeds=[5], keep_step_maps=True)
    # At T the toy's estimate is the healthy image blurred with σ = 3: the first map is its
    # residual against the input over its own maximum, with no perceptual factor.
    x0 = maps.gaussian_blur(torch.where(lesion, healthy, image) * 2 - 1, 3.0)
    expected = maps.anomaly_map(((x0 + 1) / 2).clamp(0, 1), image, None)
    torch.testing.assert_close(det.step_maps[350], expected, atol=1e-4, rtol=0)
    random_lpips = ThorInferer.from_config(SCHEDULE, InferConfig(lpips="random"), SimplexConfig())
    other = random_lpips(net, image, seeds=[5], keep_step_maps=True)
    assert float((other.step_maps[350] - expected).abs().max()) > 0.05


def test_missing_local_lpips_weights_is_a_model_error_naming_the_file(tmp_path):
    from meddiff.errors import ModelError

    missing = tmp_path / "squeezenet1_1.pth"
    cfg = InferConfig(lpips=str(missing))
    with pytest.raises(ModelError, match=rf"{missing}.*do not exist.*'off'"):
        ThorInferer.from_config(SCHEDULE, cfg, SimplexConfig())
    # The baselines' maps have no perceptual term, so they never load the weights.
    base = ThorInferer.from_config(
        SCHEDULE, cfg.model_copy(update={"method": "ddpm"}), SimplexConfig()
    )
    assert base.perceptual is None and "baseline" in base.describe()["map_kind"]
