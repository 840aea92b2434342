"""THOR against the official code (ci-ber/THOR_DDPM), side by side on the same images and weights.

Arms, run image by image in turn (batch 1, the order rotated per image):

- ``official``: the official inference loop, ``DDPM.get_anomaly`` with ``inference_type='thor'``
  (``sample_from_image_interpol``, its ``DiffusionModelUNet``, its DDPM scheduler and its
  ``lpips`` SqueezeNet maps), imported from a checkout of the official repository;
- ``meddiff full``: meddiff's ``ThorInferer`` on the full DDPM schedule, one draw;
- ``meddiff fast``: the recommended fast setting (DDIM stride 25, the mean of 3 draws), and the
  same with one draw.

Same UNet weights (meddiff's model loaded into the official ``DiffusionModelUNet`` by a key
mapping; their outputs are compared), same T, harmonization and map steps, same LPIPS trunk
weights, and the same noise: the official code draws its noise from torch's global generator
inside ``generate_noise``; this script replaces that function (in ``model_zoo.ddpm`` and
``net_utils.schedulers.ddpm``) by meddiff's per-image seeded draws, so both loops get identical
tensors in the same order (x_T's noise, then one posterior draw per step t > 0).

The official repository has no licence file, so none of its code is copied here: pass a checkout
(``git clone https://github.com/ci-ber/THOR_DDPM && git -C THOR_DDPM checkout bf807c0``); the
files the script uses are checked against their SHA-256 at that commit. Its imports need
``monai`` (its UNet is MONAI generative's) and ``lpips``; ``wandb`` and ``cv2``, imported by
``model_zoo/ddpm.py`` for logging and plots only, are replaced by empty modules when missing.

Diagnostics: ``--align`` changes the official loop in memory at the three places where meddiff
deliberately differs (the clamp of the harmonized blend, the level it is re-noised to, the LPIPS
input scaling; docs/thor.md) so that both should give the same maps; ``--residual-only`` drops
the LPIPS factor from every arm.

    PYTHONPATH=/path/with/monai python benchmarks/thor_official.py --official THOR_DDPM \
        --images runs/brain/test/images --masks runs/brain/test/masks --preset tiny
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

from meddiff.commands import add_config_arguments, config_from_args
from meddiff.data.images import load_folder
from meddiff.thor.detect import image_seed
from meddiff.thor.evaluate import method_config
from meddiff.thor.inferer import ThorInferer
from meddiff.thor.metrics import pixel_metrics
from meddiff.thor.model import resolve_model
from meddiff.thor.noise import make_noise

SHIPPED = Path(__file__).resolve().parents[1] / "platform/meddiff/thor/pretrained/brain-tiny"
OFFICIAL_COMMIT = "bf807c000ae41ee3a91cdb45d2b0264f5b2e213f"
OFFICIAL_SHA256 = {
    "model_zoo/ddpm.py": "ad8719382c1a5ae832ea8d162473373e5bbba6935066ed0145d5a07de1a198c8",
    "net_utils/nets/diffusion_unet.py": (
        "f8e9bfd20a5068065ad97b8f1e2c76df588559e884cfbd920007c61b8b5a7214"
    ),
    "net_utils/scheduler.py": "9327e7b0d01e888c2cff6622a6a80efe588e4b8086aade6dc441ecf8e8a92a68",
    "net_utils/schedulers/ddpm.py": (
        "7cbed7ca7b72e8a4d61407d492db612c49f58db2c329b5083e44086d5c98ba0f"
    ),
}
ARMS = ("official", "meddiff full", "meddiff fast", "meddiff fast 1 draw")


def import_official(root: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """``model_zoo.ddpm`` and ``net_utils.schedulers.ddpm`` from the checkout ``root``.

    Exits with a one-line message when a file differs from the pinned commit or a package the
    official code imports is missing.
    """
    for rel, digest in OFFICIAL_SHA256.items():
        path = root / rel
        if not path.is_file():
            sys.exit(f"{path}: missing; --official must be a checkout of ci-ber/THOR_DDPM")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            sys.exit(f"{path}: differs from ci-ber/THOR_DDPM@{OFFICIAL_COMMIT[:7]}; check it out")
    for name in ("monai", "lpips"):
        if importlib.util.find_spec(name) is None:
            sys.exit(
                f"missing package '{name}': the official code imports it (not a meddiff "
                f"dependency; e.g. pip install --target DIR monai==1.5.1, then PYTHONPATH=DIR)"
            )
    for name in ("wandb", "cv2"):
        if importlib.util.find_spec(name) is None:
            sys.modules[name] = types.ModuleType(name)
            print(f"note: '{name}' not installed; an empty module stands in (logging/plots only)")
    sys.path.insert(0, str(root))
    return importlib.import_module("model_zoo.ddpm"), importlib.import_module(
        "net_utils.schedulers.ddpm"
    )


# --align (a diagnostic, not the official code): the three places where meddiff deliberately
# differs (docs/thor.md), changed in memory so that the loops should agree to rounding.
ALIGN_SOURCE = {
    # the harmonized blend lives on [-1, 1] since the official commit 77fbf77; its clamp to
    # [0, 1] turns every pixel darker than mid-grey (the background too) into mid-grey.
    "image_0 = torch.clamp(image_0, 0, 1)": "image_0 = torch.clamp(image_0, -1, 1)",
    # the blend is denoised next as step t-1, so meddiff noises it to t-1, the official to t.
    "add_noise(original_samples=image_0, noise=noise, timesteps=t)": (
        "add_noise(original_samples=image_0, noise=noise, timesteps=t - 1)"
    ),
}


def aligned_official(root: Path) -> types.ModuleType:
    """``model_zoo/ddpm.py`` with ``ALIGN_SOURCE`` applied, as a fresh module."""
    path = root / "model_zoo/ddpm.py"
    src = path.read_text()
    for old, new in ALIGN_SOURCE.items():
        if src.count(old) != 1:
            sys.exit(f"{path}: cannot align, '{old}' not found exactly once")
        src = src.replace(old, new)
    module = types.ModuleType("model_zoo.ddpm_aligned")
    exec(compile(src, str(path), "exec"), module.__dict__)
    return module


def lpips_scaled_once(official):
    """The official ``lpips_loss`` with its inputs rescaled to [-1, 1] once (it does it twice:
    by hand, then again through ``normalize=True``)."""

    def loss(anomaly_img, ph_img, retPerLayer=False):  # noqa: N803 (official's name)
        a, b = (((t * 2) - 1).repeat(1, 3, 1, 1) for t in (anomaly_img, ph_img))
        return official.l_pips_sq(a, b, normalize=False).cpu().detach().numpy()

    return loss


def _res_keys(ours: str, theirs: str) -> dict[str, str]:
    names = {"norm1": "norm1", "conv1": "conv1.conv", "time": "time_emb_proj", "norm2": "norm2"}
    names |= {"conv2": "conv2.conv", "skip": "skip_connection.conv"}
    return {f"{ours}.{a}": f"{theirs}.{b}" for a, b in names.items()}


def _module_map(cfg) -> dict[str, str]:
    """meddiff ``DiffusionUNet`` module prefix → MONAI ``DiffusionModelUNet`` module prefix."""
    out = {"time_embed": "time_embed", "conv_in": "conv_in.conv", "out.0": "out.0"}
    out["out.2"] = "out.2.conv"
    levels, n = len(cfg.channels), cfg.num_res_blocks
    i = 0
    for level in range(levels):
        for j in range(n):
            out |= _res_keys(f"down.{i}.res", f"down_blocks.{level}.resnets.{j}")
            out[f"down.{i}.attn"] = f"down_blocks.{level}.attentions.{j}"
            i += 1
        if level < levels - 1:
            out[f"down.{i}.conv"] = f"down_blocks.{level}.downsampler.op.conv"
            i += 1
    out |= _res_keys("mid.0.res", "middle_block.resnet_1") | _res_keys(
        "mid.1.res", "middle_block.resnet_2"
    )
    out["mid.0.attn"] = "middle_block.attention"
    i = 0
    for u in range(levels):
        for j in range(n + 1):
            out |= _res_keys(f"up.{i}.res", f"up_blocks.{u}.resnets.{j}")
            out[f"up.{i}.attn"] = f"up_blocks.{u}.attentions.{j}"
            i += 1
        if u < levels - 1:
            out[f"up.{i}.conv"] = f"up_blocks.{u}.upsampler.conv.conv"
            i += 1
    return out


def to_official_state(state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """meddiff UNet weights as the official (MONAI-derived) UNet's state dict, same function.

    The two are the same network under other module names, but for attention: meddiff projects
    q, k and v with one fused linear layer (``qkv``, rows q|k|v) and applies an output projection
    (``proj``); the official ``AttentionBlock`` has three layers (``to_q``, ``to_k``, ``to_v``) and
    creates ``proj_attn`` but never applies it (its ``forward`` returns attention + residual).
    With one head the projection folds into ``to_v`` exactly, since softmax rows sum to 1:
    W_p(A(XW_vᵀ + b_v)) + b_p = A(X(W_pW_v)ᵀ + (W_p b_v + b_p)). ``proj_attn`` keeps the original.

    Raises:
        ValueError: an attention level with more than one head (the fold would mix heads).
    """
    for c, on in zip(cfg.channels, cfg.attention_levels, strict=True):
        if (on or c == cfg.channels[-1]) and c // cfg.num_head_channels > 1:
            raise ValueError(f"{c} channels / {cfg.num_head_channels} per head: several heads")
    prefixes = sorted(_module_map(cfg).items(), key=lambda kv: -len(kv[0]))
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        ours, theirs = next((a, b) for a, b in prefixes if key.startswith(a + "."))
        rest = key[len(ours) + 1 :]
        if rest.startswith("qkv."):
            for name, part in zip(("to_q", "to_k", "to_v"), value.chunk(3), strict=True):
                out[f"{theirs}.{name}.{rest[4:]}"] = part.clone()
        elif rest.startswith("proj."):
            out[f"{theirs}.proj_attn.{rest[5:]}"] = value.clone()
        else:
            out[f"{theirs}.{rest}"] = value.clone()
    for key in [k for k in out if k.endswith(".proj_attn.weight")]:
        att = key[: -len(".proj_attn.weight")]
        w_p, b_p = out[key].double(), out[f"{att}.proj_attn.bias"].double()
        w_v, b_v = out[f"{att}.to_v.weight"].double(), out[f"{att}.to_v.bias"].double()
        out[f"{att}.to_v.weight"] = (w_p @ w_v).float()
        out[f"{att}.to_v.bias"] = (w_p @ b_v + b_p).float()
    return out


def squeezenet_file(path: Path | None, tmp: Path) -> tuple[Path, str]:
    """The SqueezeNet 1.1 trunk both arms' LPIPS use: ``path``, else a seeded random one.

    THOR's LPIPS wants torchvision's ImageNet SqueezeNet, a download; offline a random trunk
    (seed 0) still makes both arms compute the same maps, but it is no perceptual metric.
    """
    if path is not None:
        return path, f"SqueezeNet 1.1 from {path}"
    import torchvision

    torch.manual_seed(0)
    out = tmp / "squeezenet1_1_random_seed0.pt"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), out)
    return out, "SqueezeNet 1.1 with RANDOM weights (seed 0; no ImageNet weights offline)"


def build_official(ddpm_mod, model, infer, squeeze: Path) -> torch.nn.Module:
    """The official ``DDPM`` with meddiff's weights, THOR settings and LPIPS trunk."""
    import lpips.pretrained_networks as lpips_nets
    import torchvision

    def trunk(pretrained: bool = True, **_: object) -> torch.nn.Module:
        net = torchvision.models.squeezenet1_1()
        net.load_state_dict(torch.load(squeeze, map_location="cpu", weights_only=True))
        return net

    cfg = model.unet.cfg
    tv, lpips_nets.tv = lpips_nets.tv, types.SimpleNamespace(squeezenet1_1=trunk)
    try:
        official = ddpm_mod.DDPM(
            in_channels=cfg.in_channels, out_channels=cfg.in_channels,
            num_channels=tuple(cfg.channels), attention_levels=tuple(cfg.attention_levels),
            num_res_blocks=cfg.num_res_blocks, num_head_channels=cfg.num_head_channels,
            noise_level_recon=infer.level, inference_type="thor",
            t_harmonization=list(infer.harmonization), t_visualization=list(infer.map_steps),
        )  # fmt: skip
    finally:
        lpips_nets.tv = tv
    # DDPM() leaves the UNet's GroupNorm groups at MONAI's default (32): rebuild it with the
    # model's, everything else as DDPM() builds it.
    official.unet = ddpm_mod.DiffusionModelUNet(
        spatial_dims=2, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
        num_channels=tuple(cfg.channels), attention_levels=tuple(cfg.attention_levels),
        num_res_blocks=cfg.num_res_blocks, num_head_channels=cfg.num_head_channels,
        norm_num_groups=cfg.norm_groups,
    )  # fmt: skip
    official.unet.load_state_dict(to_official_state(model.unet.state_dict(), cfg))
    return official.eval().requires_grad_(False)


def unet_difference(model, official) -> float:
    """Largest |ε̂_official − ε̂_meddiff| over random inputs at a few timesteps."""
    g = torch.Generator().manual_seed(0)
    size, c = model.unet.cfg.image_size, model.unet.cfg.in_channels
    x = torch.randn(2, c, size, size, generator=g)
    worst = 0.0
    with torch.inference_mode():
        for t in (0, 50, 349, 999):
            tt = torch.full((2,), t, dtype=torch.long)
            a = model.unet(x, tt)
            b = official.unet(x, timesteps=tt.float())
            worst = max(worst, float((a - b).abs().max()))
    return worst


class NoiseFeed:
    """Stands in for the official ``generate_noise``: meddiff's seeded draws, in call order."""

    def __init__(self, kind: str, simplex):
        self.kind, self.simplex, self.gens = kind, simplex, None

    def __call__(self, noise_type, x, timestep=None, generator=None) -> torch.Tensor:
        t = int(timestep) if timestep is not None else 0
        return make_noise(self.kind, tuple(x.shape), t, self.simplex, self.gens).to(x)


def official_detect(official, feed: NoiseFeed, image: torch.Tensor, seed: int):
    """The official THOR map (1, 1, H, W) of one image, and its per-step maps."""
    steps: list[np.ndarray] = []
    inner = type(official).get_anomaly_mask

    def recording(x, x_rec, hist_eq=False, retPerLayer=False):  # noqa: N803 (official's name)
        out = inner(official, x, x_rec, hist_eq=hist_eq, retPerLayer=retPerLayer)
        steps.append(out[0].cpu().numpy())
        return out

    official.get_anomaly_mask = recording
    feed.gens = [torch.Generator().manual_seed(seed)]
    with torch.no_grad():
        amap, _, _ = official.get_anomaly(image)
    return np.asarray(amap), steps


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Pearson correlation and largest absolute difference of two maps."""
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(np.corrcoef(a, b)[0, 1]), float(np.abs(a - b).max())


def lesion_subset(masks: np.ndarray, limit: int) -> np.ndarray:
    """Up to ``limit`` lesion images, spread evenly over the lesion sizes."""
    area = masks.reshape(len(masks), -1).sum(axis=1)
    lesion = np.flatnonzero(area > 0)
    by_size = lesion[np.argsort(area[lesion], kind="stable")]
    if limit >= len(by_size):
        return np.sort(by_size)
    return np.sort(by_size[np.linspace(0, len(by_size) - 1, limit).round().astype(int)])


def run_arms(args, cfg, model, official, feed, inferers, data) -> dict:
    """Every arm on every image, the arms' order rotated per image; maps, seconds, agreement."""
    idx = lesion_subset(data.masks, args.limit)
    res: dict = {arm: {"maps": [], "seconds": []} for arm in ARMS}
    res |= {"agree_final": [], "agree_first": [], "masks": data.masks[idx]}
    for n, i in enumerate(idx):
        image = torch.from_numpy(data.images[i])[None, None]
        seed = image_seed(data.names[i], cfg.runtime.seed)
        out = {}
        for arm in ARMS[n % len(ARMS) :] + ARMS[: n % len(ARMS)]:
            t0 = time.perf_counter()
            if arm == "official":
                out[arm] = official_detect(official, feed, image, seed)
            else:
                det = inferers[arm](model.unet, image, seeds=[seed], keep_step_maps=True)
                out[arm] = (det.anomaly_map.numpy(), det.step_maps)
            res[arm]["seconds"].append(time.perf_counter() - t0)
            res[arm]["maps"].append(out[arm][0][0, 0])
        first_t = max(out["meddiff full"][1])
        res["agree_final"].append(agreement(out["official"][0], out["meddiff full"][0]))
        res["agree_first"].append(
            agreement(out["official"][1][0], out["meddiff full"][1][first_t].numpy())
        )
        print(f"  {n + 1}/{len(idx)} {data.names[i]}: " + ", ".join(
            f"{a} {res[a]['seconds'][-1]:.1f} s" for a in ARMS)
            + f"; final maps r {res['agree_final'][-1][0]:.4f}", flush=True)  # fmt: skip
    return res


def report(res: dict, inferers: dict, lpips_note: str, unet_diff: float) -> dict:
    """Print the side-by-side table; return its figures."""
    masks = res["masks"]
    rows = {}
    for arm in ARMS:
        forwards = 1 + inferers["meddiff full"].level if arm == "official" else None
        if arm != "official":
            forwards = inferers[arm].describe()["forwards_per_image"]
        m = pixel_metrics(np.stack(res[arm]["maps"]), masks)
        rows[arm] = {
            "forwards_per_image": forwards,
            "median_s_per_image": statistics.median(res[arm]["seconds"]),
            "pixel_auprc": m["auprc"],
            "pixel_auroc": m["auroc"],
        }
    base = rows["official"]["median_s_per_image"]
    print(f"\n{'arm':<20} {'forwards':>9} {'s/image (median)':>17} {'speed-up':>9} "
          f"{'pixel AUPRC':>12} {'pixel AUROC':>12}")  # fmt: skip
    for arm, r in rows.items():
        r["speedup_vs_official"] = base / r["median_s_per_image"]
        print(f"{arm:<20} {r['forwards_per_image']:>9} {r['median_s_per_image']:>17.2f} "
              f"{r['speedup_vs_official']:>8.1f}x {r['pixel_auprc']:>12.4f} "
              f"{r['pixel_auroc']:>12.4f}")  # fmt: skip
    agree = {}
    for key, label in (("agree_first", "first map step (t = T)"), ("agree_final", "final map")):
        r = [a[0] for a in res[key]]
        d = [a[1] for a in res[key]]
        agree[key] = {"pearson_median": statistics.median(r), "pearson_min": min(r),
                      "max_abs_diff_median": statistics.median(d), "max_abs_diff_max": max(d)}  # fmt: skip
        print(f"official vs meddiff full, {label}: Pearson r median {statistics.median(r):.4f} "
              f"(min {min(r):.4f}), max |diff| median {statistics.median(d):.4f} "
              f"(max {max(d):.4f})")  # fmt: skip
    print(f"UNets: largest |eps_official - eps_meddiff| {unet_diff:.2e}; LPIPS trunk: {lpips_note}")
    print(f"chance AUPRC (lesion pixel share) {float(masks.mean()):.4f}; images {len(masks)}")
    return {"rows": rows, "agreement": agree, "unet_max_abs_diff": unet_diff}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, type=Path, help="ci-ber/THOR_DDPM checkout")
    parser.add_argument("--model", default=str(SHIPPED), help="meddiff model (default: shipped)")
    parser.add_argument("--images", required=True, type=Path)
    parser.add_argument("--masks", required=True, type=Path)
    parser.add_argument("--limit", type=int, default=6, help="lesion images (spread over sizes)")
    parser.add_argument("--stride", type=int, default=25, help="fast arm's DDIM stride")
    parser.add_argument("--draws", type=int, default=3, help="fast arm's noise draws")
    parser.add_argument("--squeezenet", type=Path, help="squeezenet1_1 state dict for LPIPS")
    parser.add_argument(
        "--residual-only",
        action="store_true",
        help="diagnostic: no LPIPS factor in any arm (the official DDPM's get_saliency returns 1)",
    )
    parser.add_argument(
        "--align",
        action="store_true",
        help="diagnostic: the official loop with meddiff's three deliberate differences applied",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    torch.set_num_threads(args.threads)
    ddpm_mod, sched_mod = import_official(args.official.resolve())
    if args.align:
        ddpm_mod = aligned_official(args.official.resolve())
        print("--align: official loop changed in memory (blend clamp, re-noise level, LPIPS scale)")
    model = resolve_model(args.model, cfg.tracking)
    data = load_folder(args.images, args.masks, size=model.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        squeeze, lpips_note = squeezenet_file(args.squeezenet, Path(tmp))
        lpips = "off" if args.residual_only else str(squeeze)
        settings = {
            "meddiff full": method_config(cfg, "thor", stride=1, draws=1, lpips=lpips),
            "meddiff fast": method_config(
                cfg, "thor", stride=args.stride, eta=0.0, draws=args.draws, lpips=lpips
            ),
            "meddiff fast 1 draw": method_config(
                cfg, "thor", stride=args.stride, eta=0.0, draws=1, lpips=lpips
            ),
        }
        inferers = {
            k: ThorInferer.from_config(model.schedule, c.thor.infer, c.thor.simplex)
            for k, c in settings.items()
        }
        full = inferers["meddiff full"]
        official = build_official(ddpm_mod, model, full, squeeze)
    if args.residual_only:
        # The official map is residual x clip(blur(LPIPS)); a saliency of 1 leaves the residual.
        official.get_saliency = lambda x, x_rec, retPerLayer=False: np.ones(tuple(x.shape))
        lpips_note = "off in every arm (--residual-only)"
    if args.align:
        official.lpips_loss = lpips_scaled_once(official)
    feed = NoiseFeed(full.noise, settings["meddiff full"].thor.simplex)
    ddpm_mod.generate_noise = sched_mod.generate_noise = feed
    unet_diff = unet_difference(model, official)
    print(f"UNets, official vs meddiff: largest |eps difference| {unet_diff:.2e}", flush=True)
    load = os.getloadavg()
    print(f"{model.image_size}x{model.image_size}, T={full.level}, harmonization "
          f"{list(full.harmonization)}, map steps {list(full.map_steps)}; {args.threads} thread(s); "
          f"load average {load[0]:.1f} at start; official code {OFFICIAL_COMMIT[:7]}", flush=True)  # fmt: skip
    res = run_arms(args, cfg, model, official, feed, inferers, data)
    out = report(res, inferers, lpips_note, unet_diff)
    out["load_average"] = {"start": load[0], "end": os.getloadavg()[0]}
    print(f"load average {load[0]:.1f} at start, {out['load_average']['end']:.1f} at end")
    if args.json:
        import json

        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
