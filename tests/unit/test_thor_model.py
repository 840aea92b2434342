"""UNet, DDPM schedule, noise and the model directory."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from meddiff.config import load_config
from meddiff.config.thor import ScheduleConfig, SimplexConfig, UNetConfig
from meddiff.errors import ConfigError, ModelError
from meddiff.thor.model import CONFIG_FILE, load_model, save_model
from meddiff.thor.noise import make_noise, simplex_noise
from meddiff.thor.schedule import DDIMScheduler, DDPMSchedule, DDPMScheduler
from meddiff.thor.unet import Attention, DiffusionUNet, count_parameters

SMALL = UNetConfig(
    image_size=16, channels=(8, 16), attention_levels=(False, True), norm_groups=8,
    num_head_channels=8,
)  # fmt: skip


def test_full_size_unet_matches_the_papers_parameter_count():
    # THOR's brain UNet: channels (128, 256, 256), attention (F, T, T), one res block: 18.5 M.
    assert count_parameters(DiffusionUNet(UNetConfig())) == pytest.approx(18.50e6, rel=0.002)


def test_unet_predicts_noise_of_the_input_shape():
    net = DiffusionUNet(SMALL)
    x = torch.randn(3, 1, 16, 16)
    assert net(x, torch.tensor([0, 10, 999])).shape == (3, 1, 16, 16)


def test_attention_equals_the_naive_softmax_form():
    torch.manual_seed(0)
    attn = Attention(16, 8, 8)
    torch.nn.init.normal_(attn.proj.weight, std=0.1)
    x = torch.randn(2, 16, 4, 4)
    got = attn(x)
    b, c, h, w = x.shape
    tokens = attn.norm(x).flatten(2).transpose(1, 2)
    q, k, v = attn.qkv(tokens).chunk(3, dim=-1)
    split = [t.reshape(b, h * w, 2, 8).transpose(1, 2) for t in (q, k, v)]
    weights = F.softmax(split[0] @ split[1].transpose(-1, -2) / math.sqrt(8), dim=-1)
    out = (weights @ split[2]).transpose(1, 2).reshape(b, h * w, c)
    expected = x + attn.proj(out).transpose(1, 2).reshape(b, c, h, w)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_unet_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="attention_levels has 2 entries"):
        load_config(overrides=["thor.model.attention_levels=[true, false]"])
    with pytest.raises(ConfigError, match="divisible by 4"):
        load_config(overrides=["thor.model.image_size=30"])
    with pytest.raises(ConfigError, match="uses simplex noise"):
        load_config(overrides=["thor.infer.method=anoddpm", "thor.infer.noise=gaussian"])


def test_schedule_noising_and_x0_prediction_invert_each_other():
    s = DDPMSchedule(ScheduleConfig())
    assert float(s.betas[0]) == pytest.approx(1e-4) and float(s.betas[-1]) == pytest.approx(0.02)
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    eps = torch.randn(2, 1, 4, 4)
    x_t = s.add_noise(x0, eps, 350)
    ab = float(s.alphas_cumprod[350])
    torch.testing.assert_close(x_t, math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps)
    torch.testing.assert_close(s.predict_x0(eps, 350, x_t), x0, atol=1e-5, rtol=0)
    # The last step and the DDIM step to "clean" both return x̂0 itself.
    mean, pred = DDPMScheduler(s).step(eps, 0, s.add_noise(x0, eps, 0))
    torch.testing.assert_close(mean, pred)
    x_prev, pred = DDIMScheduler(s, [350]).step(eps, 350, x_t)
    torch.testing.assert_close(x_prev, x0, atol=1e-5, rtol=0)
    # A DDIM step with the true noise lands exactly on q(x0, ε, t').
    x_prev, _ = DDIMScheduler(s, [350, 300]).step(eps, 350, x_t)
    torch.testing.assert_close(x_prev, s.add_noise(x0, eps, 300), atol=1e-5, rtol=0)


def test_ddpm_step_posterior_mean_by_formula():
    s = DDPMSchedule(ScheduleConfig())
    x0 = torch.full((1, 1, 2, 2), 0.5)
    eps = torch.full((1, 1, 2, 2), 0.3)
    t = 100
    x_t = s.add_noise(x0, eps, t)
    mean, _ = DDPMScheduler(s).step(eps, t, x_t, noise=torch.zeros_like(x_t))
    ab, ab_prev = float(s.alphas_cumprod[t]), float(s.alphas_cumprod[t - 1])
    beta, alpha = float(s.betas[t]), float(s.alphas[t])
    expected = (
        math.sqrt(ab_prev) * beta / (1 - ab) * x0
        + math.sqrt(alpha) * (1 - ab_prev) / (1 - ab) * x_t
    )
    torch.testing.assert_close(mean, expected, atol=1e-6, rtol=0)


def test_ddim_with_eta_one_over_one_step_is_the_ddpm_posterior_step():
    # Fast mode's stochastic variant: at eta 1 a DDIM step to t-1 draws from the same posterior
    # (mean and variance) as the full schedule's DDPM step.
    s = DDPMSchedule(ScheduleConfig())
    x_t, eps, z = torch.randn(3, 1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    ddpm_sampler = DDPMScheduler(s)
    for t in (5, 120, 349):
        ddpm, _ = ddpm_sampler.step(eps, t, x_t, noise=z)
        ddim, _ = DDIMScheduler(s, [t, t - 1], eta=1.0).step(eps, t, x_t, noise=z)
        torch.testing.assert_close(ddim, ddpm, atol=1e-5, rtol=0)
    # eta 0 ignores the draw; to "clean" there is no variance at any eta.
    det, _ = DDIMScheduler(s, [200, 150]).step(eps, 200, x_t)
    torch.testing.assert_close(
        DDIMScheduler(s, [200, 150], eta=0.0).step(eps, 200, x_t, noise=z)[0], det
    )
    clean, x0 = DDIMScheduler(s, [200], eta=1.0).step(eps, 200, x_t, noise=z)
    torch.testing.assert_close(clean, x0)


def test_schedulers_share_one_step_and_draw_noise_only_for_a_variance_term():
    s = DDPMSchedule(ScheduleConfig())
    x_t, eps, z = torch.randn(3, 1, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    draws = []

    def noise() -> torch.Tensor:
        draws.append(1)
        return z

    samplers = {
        "ddpm": DDPMScheduler(s, range(3, -1, -1)),
        "ddim_eta0": DDIMScheduler(s, [300, 150, 0]),
        "ddim_eta1": DDIMScheduler(s, [300, 150, 0], eta=1.0),
    }
    expected_draws = {"ddpm": 3, "ddim_eta0": 0, "ddim_eta1": 2}  # none into the clean image
    for name, sampler in samplers.items():
        draws.clear()
        x = x_t
        for t in sampler.timesteps:
            out = sampler.step(eps, t, x, noise)
            assert out.prev_sample.shape == x.shape == out.pred_original_sample.shape
            x = out.prev_sample
        assert len(draws) == expected_draws[name], name
        assert sampler.prev_timestep(sampler.timesteps[-1]) == -1
    with pytest.raises(ValueError, match="consecutive"):
        DDPMScheduler(s, [10, 8])


def test_simplex_noise_is_smooth_unit_variance_and_seeded_per_image():
    cfg = SimplexConfig()
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    n = simplex_noise((2, 1, 64, 64), 250, cfg, gens)
    assert n.shape == (2, 1, 64, 64)
    assert n.mean(dim=(1, 2, 3)).abs().max() < 1e-4
    assert n.std(dim=(1, 2, 3)).sub(1).abs().max() < 1e-3
    # Neighbouring pixels are strongly correlated (low-frequency octaves), unlike white noise.
    corr = torch.corrcoef(torch.stack([n[0, 0, :, :-1].flatten(), n[0, 0, :, 1:].flatten()]))[0, 1]
    assert corr > 0.5
    assert not torch.allclose(n[0], n[1])
    again = simplex_noise((1, 1, 64, 64), 250, cfg, [torch.Generator().manual_seed(2)])
    torch.testing.assert_close(again[0], n[1])
    twins = [torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)]
    g = make_noise("gaussian", (2, 1, 8, 8), 0, cfg, twins)
    torch.testing.assert_close(g[0], g[1])


def test_model_directory_round_trip_and_errors(tmp_path):
    net = DiffusionUNet(SMALL)
    torch.nn.init.normal_(net.out[2].weight)
    out = save_model(tmp_path / "m", net, SMALL, ScheduleConfig(), {"steps": 3})
    loaded = load_model(out)
    assert loaded.image_size == 16 and loaded.info == {"steps": 3}
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([5])
    torch.testing.assert_close(loaded.unet(x, t), net(x, t))
    with pytest.raises(ModelError, match="not a THOR model directory"):
        load_model(tmp_path)
    meta = json.loads((out / CONFIG_FILE).read_text())
    meta["unet"]["channels"] = [16, 16]
    (out / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="cannot load weights"):
        load_model(out)


def test_inference_refuses_a_noise_level_the_model_never_trained_on(tmp_path):
    from meddiff.thor.detect import plan_for
    from meddiff.thor.evaluate import method_config

    out = save_model(
        tmp_path / "m", DiffusionUNet(SMALL), SMALL, ScheduleConfig(), {"max_timestep": 300}
    )
    cfg = load_config("tiny", overrides=["thor.infer.lpips=off"])
    with pytest.raises(ConfigError, match="T=350.*trained on timesteps below 300"):
        plan_for(cfg, str(out))
    # AnoDDPM keeps its own T (250) even where THOR's T was set: the baselines do not inherit it.
    anoddpm = method_config(cfg.model_copy(), "anoddpm")
    assert plan_for(anoddpm, str(out))["noise_level"] == 250
    thor_at_350 = load_config("tiny", overrides=["thor.infer.noise_level=350"])
    assert method_config(thor_at_350, "anoddpm").thor.infer.noise_level is None


def test_a_checkpoint_resumes_only_under_the_strategy_that_wrote_it(tmp_path):
    from meddiff.training import check_resume, marker_info
    from meddiff.training.checkpoints import MARKER

    def run(strategy: str):
        return load_config("tiny", overrides=[f"thor.train.strategy={strategy}"])

    def written_by(strategy: str):
        cfg = run(strategy)
        d = tmp_path / strategy / "checkpoint_00000002"
        d.mkdir(parents=True)
        info = marker_info(
            cfg.thor.train, world=1, precision="fp32", model_config=cfg.thor.model.model_dump()
        )
        (d / "meddiff_rank0.json").write_text(json.dumps({"step": 2}))  # rank 0's part is whole
        (d / MARKER).write_text(json.dumps({**info, "step": 2}))
        return d.parent

    def check(run_dir, strategy: str):
        cfg = run(strategy)
        return check_resume(run_dir, cfg.thor.train, section="thor.train",
                            model_section="thor.model", model_config=cfg.thor.model.model_dump(),
                            world=1, precision="fp32", fresh="rerun with --fresh to start over")  # fmt: skip

    ddp, ds = written_by("ddp"), written_by("deepspeed")
    assert check(ddp, "ddp").name == "checkpoint_00000002"
    assert check(ds, "deepspeed").name == "checkpoint_00000002"
    with pytest.raises(ConfigError, match="written with thor.train.strategy=ddp.*--fresh"):
        check(ddp, "deepspeed")
    with pytest.raises(ConfigError, match="strategy=deepspeed, this run uses ddp"):
        check(ds, "ddp")
