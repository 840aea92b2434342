"""fp32 against bf16 autocast on the CPU, side by side in one run: speed and accuracy.

The evidence behind ``precision: auto`` on CPUs with native bf16 (``meddiff.precision``). Every
section runs its arms interleaved (arm order alternating round by round) in one process, so load
from other work on a shared machine hits them alike; each figure is the median over rounds.

- ``unet_forward``: the shipped THOR model's UNet (64×64, channels 32/64/64), one forward at batch
  1, 4 and 16; arms fp32 and bf16, each in contiguous (NCHW) and channels-last layout.
- ``thor_inference``: THOR at the recommended fast setting (DDIM stride 25, mean of 3 draws, LPIPS
  over HED's VGG16, the tiny preset) with the shipped model on a subset of the lesion benchmark
  (``--limit`` images, lesion/lesion-free mix and lesion sizes kept), batch by batch, the same
  seeds per image in both arms; images/s per batch and pixel AUPRC over the subset.
- ``thor_training``: the tiny preset's THOR UNet from one initialisation, Adam, batch 8 of the
  training slices, the same batches, timesteps and noise in both arms, ``--steps`` steps; steps/s
  and the mean loss of the last ``--steps // 3`` steps.
- ``embedding``: the tiny preset's embedder (EfficientNet-Lite0, ImageNet weights, 224 px) on a
  batch of 16 crops of scikit-image's immunohistochemistry image; patches/s and the cosine
  similarity of the bf16 embeddings to the fp32 ones.
- ``synthesis_training``: the tiny preset's Stable Diffusion UNet (random initialisation, 8×8
  latents, 16-token text embeddings), AdamW, batch 8 of fixed random latents; steps/s and the mean
  loss of the last ``--steps // 3`` steps.

Channels-last is the layout meddiff's THOR paths use on a CPU (``thor.detect``, ``thor.train``), so
the THOR inference and training arms run channels-last; the forward section shows both layouts.

    meddiff data sample-brain runs/brain --preset tiny --lesion 24 --normal 8
    python benchmarks/cpu_bf16.py --brain runs/brain --json runs/cpu_bf16.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddiff import precision as amp
from meddiff.config import load_config
from meddiff.data.images import load_folder
from meddiff.thor.detect import image_seed
from meddiff.thor.evaluate import method_config
from meddiff.thor.inferer import ThorInferer
from meddiff.thor.metrics import evaluate_maps, summary_row
from meddiff.thor.model import load_model
from meddiff.thor.shipped import SHIPPED_DIR

CL = torch.channels_last


def rounds(arms: dict[str, Callable[[], Any]], n: int) -> dict[str, list[float]]:
    """Seconds of each arm per round; one warm-up call each, then arms interleaved with the order
    reversed every other round."""
    for fn in arms.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in arms}
    keys = list(arms)
    for r in range(n):
        for k in keys if r % 2 == 0 else keys[::-1]:
            t0 = time.perf_counter()
            arms[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def unet_forward(batches: tuple[int, ...], n: int) -> list[dict[str, Any]]:
    """Median ms per forward of the shipped UNet, per batch size and arm."""
    unet = load_model(SHIPPED_DIR).unet.eval()
    nchw, chlast = unet, copy.deepcopy(unet).to(memory_format=CL)
    rows = []
    for b in batches:
        x = torch.rand(b, 1, 64, 64) * 2 - 1
        t = torch.full((b,), 200, dtype=torch.long)

        def arm(net, inp, precision, t=t):
            def run():
                with torch.inference_mode(), amp.autocast(precision, "cpu"):
                    net(inp, t)

            return run

        xc = x.contiguous(memory_format=CL)
        arms = {
            "fp32": arm(nchw, x, "fp32"),
            "bf16": arm(nchw, x, "bf16"),
            "fp32_cl": arm(chlast, xc, "fp32"),
            "bf16_cl": arm(chlast, xc, "bf16"),
        }
        ms = {k: 1e3 * med(v) for k, v in rounds(arms, n).items()}
        rows.append({"batch": b, "ms": ms})
        print(f"  unet_forward b{b}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()))
    return rows


def thor_inference(brain: Path, limit: int, batch: int) -> dict[str, Any]:
    """Fast-setting THOR on the lesion subset, fp32 vs bf16, batch by batch in turn."""
    # thor_speed's picker (benchmarks/ is the script's directory, so first on sys.path).
    from thor_speed import subset

    cfg = load_config("tiny")
    model = load_model(SHIPPED_DIR)
    model.unet.to(memory_format=CL)
    data = load_folder(brain / "test/images", brain / "test/masks", size=model.image_size)
    idx = subset(data.masks, limit)
    images = torch.from_numpy(data.images[idx])[:, None]
    masks = data.masks[idx]
    seeds = [image_seed(data.names[i], cfg.runtime.seed) for i in idx]
    arms = {}
    for p in ("fp32", "bf16"):
        c = method_config(cfg, "thor", stride=25, eta=0.0, draws=3, precision=p)
        arms[p] = ThorInferer.from_config(model.schedule, c.thor.infer, c.thor.simplex)
    maps = {p: [] for p in arms}
    scores = {p: [] for p in arms}
    secs: dict[str, list[float]] = {p: [] for p in arms}
    for i, start in enumerate(range(0, len(idx), batch)):
        sl = slice(start, start + batch)
        for p in list(arms) if i % 2 == 0 else list(arms)[::-1]:
            t0 = time.perf_counter()
            det = arms[p](model.unet, images[sl], seeds=seeds[sl])
            secs[p].append((time.perf_counter() - t0) / len(images[sl]))
            assert det.precision == p, det.precision
            maps[p].append(det.anomaly_map[:, 0].numpy())
            scores[p].append(det.score.numpy())
        print(f"  thor_inference {min(start + batch, len(idx))}/{len(idx)} images", flush=True)
    out: dict[str, Any] = {"images": len(idx), "lesion_images": int(masks.any((1, 2)).sum())}
    for p in arms:
        m = evaluate_maps(np.concatenate(maps[p]), masks, np.concatenate(scores[p]), cfg.thor.eval)
        out[p] = {"images_per_s": 1 / med(secs[p]), **summary_row(m)}
    diff = np.abs(np.concatenate(maps["fp32"]) - np.concatenate(maps["bf16"]))
    out["map_max_abs_diff"] = float(diff.max())
    out["map_mean_abs_diff"] = float(diff.mean())
    return out


def train_pair(make, batches, step_fn, steps: int) -> dict[str, Any]:
    """``steps`` optimisation steps of two copies of one model (fp32, bf16), step by step in
    turn on the same batches; median steps/s and the mean loss of the last third."""
    models = {p: make() for p in ("fp32", "bf16")}
    secs: dict[str, list[float]] = {p: [] for p in models}
    losses: dict[str, list[float]] = {p: [] for p in models}
    for s in range(steps):
        for p in list(models) if s % 2 == 0 else list(models)[::-1]:
            t0 = time.perf_counter()
            loss = step_fn(models[p], batches(s), p)
            secs[p].append(time.perf_counter() - t0)
            losses[p].append(loss)
    tail = max(1, steps // 3)
    # The first step of each arm carries one-off set-up (oneDNN primitive creation).
    return {
        p: {
            "steps_per_s": 1 / med(secs[p][1:] or secs[p]),
            "loss_last": float(np.mean(losses[p][-tail:])),
            "loss_first": losses[p][0],
        }
        for p in models
    }


def thor_training(brain: Path, steps: int) -> dict[str, Any]:
    from meddiff.thor.schedule import DDPMSchedule
    from meddiff.thor.unet import DiffusionUNet

    cfg = load_config("tiny")
    tc = cfg.thor.train
    slices = torch.from_numpy(load_folder(brain / "train", size=64).images)[:, None]
    schedule = DDPMSchedule(cfg.thor.schedule)
    torch.manual_seed(0)
    base = DiffusionUNet(cfg.thor.model).to(memory_format=CL)

    def make():
        net = copy.deepcopy(base)
        return net, torch.optim.Adam(net.parameters(), lr=tc.learning_rate)

    def batches(s):
        g = torch.Generator().manual_seed(s)
        x0 = slices[torch.randint(0, len(slices), (tc.batch_size,), generator=g)] * 2 - 1
        t = torch.randint(0, tc.max_timestep, (tc.batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        return schedule.add_noise(x0, eps, t).contiguous(memory_format=CL), t, eps

    def step(m, b, p):
        net, opt = m
        x_t, t, eps = b
        with amp.autocast(p, "cpu"):
            pred = net(x_t, t)
        loss = torch.nn.functional.mse_loss(pred.float(), eps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), tc.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return train_pair(make, batches, step, steps)


def embedding(n: int, threads: int, batch: int = 16) -> dict[str, Any]:
    import skimage.data

    from meddiff.morphology.embed import PatchEmbedder

    img = skimage.data.immunohistochemistry()  # 512×512 RGB uint8
    rng = np.random.default_rng(0)
    corners = rng.integers(0, img.shape[0] - 96, size=(batch, 2))
    crops = np.stack([img[r : r + 96, c : c + 96] for r, c in corners])
    cfg = load_config("tiny").prompts.embed
    emb = {p: PatchEmbedder(cfg.model_copy(update={"precision": p})) for p in ("fp32", "bf16")}
    torch.set_num_threads(threads)  # the embedder sets the tiny preset's count; keep the run's
    assert [e.precision for e in emb.values()] == list(emb)
    out = {p: e.embed(crops) for p, e in emb.items()}
    cos = (out["fp32"] * out["bf16"]).sum(1) / (
        np.linalg.norm(out["fp32"], axis=1) * np.linalg.norm(out["bf16"], axis=1)
    )
    times = rounds({p: (lambda e=e: e.embed(crops)) for p, e in emb.items()}, n)
    res: dict[str, Any] = {p: {"patches_per_s": batch / med(v)} for p, v in times.items()}
    res["cosine_min"], res["cosine_median"] = float(cos.min()), float(np.median(cos))
    res["batch"] = batch
    return res


def synthesis_training(steps: int) -> dict[str, Any]:
    from diffusers import DDPMScheduler

    from meddiff.synthesis.components import build_unet
    from meddiff.synthesis.diffusion import diffusion_loss

    cfg = load_config("tiny").synthesis
    arch, t = cfg.model.arch, cfg.train
    factor = 2 ** (len(arch.vae_channels) - 1)
    torch.manual_seed(0)
    base = build_unet(arch, cfg.model.resolution, factor)
    scheduler = DDPMScheduler()
    g = torch.Generator().manual_seed(0)
    side = cfg.model.resolution // factor
    pool = torch.randn(64, arch.latent_channels, side, side, generator=g)
    text = torch.randn(64, arch.max_length, arch.text_hidden_size, generator=g)

    def make():
        net = copy.deepcopy(base).train()
        return net, torch.optim.AdamW(net.parameters(), lr=t.learning_rate)

    def batches(s):
        idx = torch.arange(s * t.batch_size, (s + 1) * t.batch_size) % len(pool)
        return pool[idx], text[idx], torch.Generator().manual_seed(s)

    def step(m, b, p):
        net, opt = m
        latents, emb, gen = b
        with amp.autocast(p, "cpu"):
            loss = diffusion_loss(net, scheduler, latents, emb, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), t.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return train_pair(make, batches, step, steps)


def _forward_rows(rows: list[dict[str, Any]], args) -> list[str]:
    out = []
    for row in rows:
        ms = row["ms"]
        out.append(
            f"| THOR UNet forward (NCHW / channels-last) | batch {row['batch']} | "
            f"{ms['fp32']:.1f} / {ms['fp32_cl']:.1f} ms | {ms['bf16']:.1f} / {ms['bf16_cl']:.1f} ms"
            f" | {ms['fp32'] / ms['bf16']:.2f}× / {ms['fp32_cl'] / ms['bf16_cl']:.2f}× | |"
        )
    return out


def _inference_rows(ti: dict[str, Any], args) -> list[str]:
    f, b = ti["fp32"], ti["bf16"]
    return [
        f"| THOR inference, fast (stride 25, 3 draws, LPIPS vgg16-hed) | {ti['images']} images "
        f"({ti['lesion_images']} with a lesion), batch {args.batch} | "
        f"{f['images_per_s']:.3f} img/s | {b['images_per_s']:.3f} img/s | "
        f"{b['images_per_s'] / f['images_per_s']:.2f}× | pixel AUPRC {f['pixel_auprc']:.4f} → "
        f"{b['pixel_auprc']:.4f} (Δ {b['pixel_auprc'] - f['pixel_auprc']:+.4f}); map max |Δ| "
        f"{ti['map_max_abs_diff']:.3g}, mean |Δ| {ti['map_mean_abs_diff']:.2g} |"
    ]


def _training_rows(label: str):
    def rows(r: dict[str, Any], args) -> list[str]:
        f, b = r["fp32"], r["bf16"]
        return [
            f"| {label} | batch 8, {args.steps} steps | {f['steps_per_s']:.2f} steps/s "
            f"| {b['steps_per_s']:.2f} steps/s | {b['steps_per_s'] / f['steps_per_s']:.2f}× | "
            f"loss (last third) {f['loss_last']:.4f} → {b['loss_last']:.4f} |"
        ]

    return rows


def _embedding_rows(e: dict[str, Any], args) -> list[str]:
    f, b = e["fp32"], e["bf16"]
    return [
        f"| embedding (EfficientNet-Lite0, 224 px) | batch {e['batch']} | "
        f"{f['patches_per_s']:.1f} patches/s | {b['patches_per_s']:.1f} patches/s | "
        f"{b['patches_per_s'] / f['patches_per_s']:.2f}× | cosine to fp32: min "
        f"{e['cosine_min']:.4f}, median {e['cosine_median']:.4f} |"
    ]


# section → (run it from the parsed arguments, its table rows)
SECTIONS: dict[str, tuple[Callable, Callable]] = {
    "unet_forward": (
        lambda a: unet_forward(tuple(int(b) for b in a.batches.split(",")), a.rounds),
        _forward_rows,
    ),
    "thor_inference": (lambda a: thor_inference(a.brain, a.limit, a.batch), _inference_rows),
    "thor_training": (
        lambda a: thor_training(a.brain, a.steps),
        _training_rows("THOR training (tiny)"),
    ),
    "embedding": (lambda a: embedding(a.rounds, a.threads), _embedding_rows),
    "synthesis_training": (
        lambda a: synthesis_training(a.steps),
        _training_rows("synthesis UNet training (tiny SD)"),
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brain", required=True, type=Path, help="a sample-brain folder")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the timed sections")
    parser.add_argument("--limit", type=int, default=16, help="lesion-benchmark images")
    parser.add_argument("--batch", type=int, default=4, help="THOR inference batch")
    parser.add_argument("--steps", type=int, default=18, help="training steps per arm")
    parser.add_argument("--batches", default="1,4,16", help="UNet forward batch sizes")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma-separated subset of the sections"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; known: {', '.join(SECTIONS)}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    res: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "cpu": amp.cpu_capability(),
        "torch": torch.__version__,
        "load_average_start": os.getloadavg(),
    }
    print(f"CPU: {res['cpu']}, {os.cpu_count()} cores, load {res['load_average_start']}")
    for name in sections:
        res[name] = SECTIONS[name][0](args)
    res["load_average_end"] = os.getloadavg()
    res["seconds"] = round(time.perf_counter() - started, 1)
    print(f"\nload average start {res['load_average_start']}, end {res['load_average_end']}, "
          f"{res['seconds']} s, {args.threads} thread(s)\n")  # fmt: skip
    lines = ["| path | setting | fp32 | bf16 | bf16 speed-up | accuracy fp32 → bf16 |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name in sections:
        lines += SECTIONS[name][1](res[name], args)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
