"""Training throughput: cached latents and text embeddings vs encoding every batch on the fly.

    python benchmarks/synth_cached_vs_online.py            # tiny preset on this CPU
    python benchmarks/synth_cached_vs_online.py --steps 20 --rounds 5 --threads 1

Both loops run meddiff's own training step (``diffusion_loss`` + AdamW + clipping) on the same UNet
(same initial weights), the same batch size and the same number of steps, on the same real sample
patches; they differ only in where the latents and text embeddings come from:

- cached: ``CachedBatches`` (the VAE posterior and prompt embeddings, computed once by the Ray Data
  encoder stages, are read and sampled);
- on the fly: ``OnlineBatches`` (every batch goes through the VAE encoder and the text encoder, as
  the usual example training scripts do).

The two are interleaved in rounds and the median of each is reported, so load from other processes
on the machine hits both alike. The one-time cost of building the cache is printed too.

With a CUDA GPU it also measures an SD-1.5-sized UNet (random weights) at 512 px (latents
4×64×64, prompts 77×768) trained with DeepSpeed ZeRO-2 in bf16 on one GPU, from cached inputs
and with an SD-sized VAE and text encoder (random weights) encoding on the fly. There is no GPU
on the development machines, so that part prints "skipped" there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def cpu_benchmark(args: argparse.Namespace) -> None:
    import json

    import torch

    from meddiff.config import load_config
    from meddiff.data.pcam import open_pcam, read_rows
    from meddiff.data.samples import SampleSizes, sample_pcam
    from meddiff.synthesis import cache as cache_mod
    from meddiff.synthesis import components as C
    from meddiff.synthesis.diffusion import CachedBatches, OnlineBatches, step_generator
    from meddiff.synthesis.stages import ImageEncoder, PromptEncoder

    torch.set_num_threads(args.threads)
    cfg = load_config("tiny", overrides=["synthesis.model.arch.vae_warmup_steps=0"])
    mcfg, tcfg = cfg.synthesis.model, cfg.synthesis.train
    tmp = Path(tempfile.mkdtemp(prefix="meddiff-bench-"))
    sample_pcam(tmp / "pcam", SampleSizes(train=args.images, valid=0, test=0), seed=0)
    split = open_pcam(tmp / "pcam", "train")
    images = read_rows(split, 0, split.num_rows)["image"]
    labels = read_rows(split, 0, split.num_rows)["label"]
    prompts = [
        f"Histology image of {lab} tissue, morphology type {w}"
        for lab in ("healthy", "cancer")
        for w in ("one", "two", "three")
    ]
    ids = 1 + labels * 3 + np.arange(len(labels)) % 3  # a prompt per image (table row 0 is "")
    table = ["", *prompts]
    comp = C.build_components(mcfg, prompts, seed=0)
    model_dir = C.save_pipeline(comp, tmp / "model")

    # The cache, built by the same stage classes the Ray Data pipeline runs.
    t0 = time.perf_counter()
    enc = ImageEncoder(str(model_dir), mcfg.resolution)
    lat = [enc({"image": images[i : i + 64]}) for i in range(0, len(images), 64)]
    emb = PromptEncoder(str(model_dir))({"prompt": np.array(table, dtype=object)})["embedding"]
    cache_s = time.perf_counter() - t0
    common = {"prompt_ids": ids.astype(np.int64), "labels": labels.astype(np.int64)}
    roots = {}
    for kind, arrays in (
        (
            "latents",
            {
                "latent_mean": np.concatenate([b["latent_mean"] for b in lat]),
                "latent_std": np.concatenate([b["latent_std"] for b in lat]),
                "text_embeddings": emb,
            },
        ),
        ("images", {"images": images}),
    ):
        root = tmp / kind
        root.mkdir()
        for name, arr in {**common, **arrays}.items():
            np.save(root / f"{name}.npy", arr)
        info = {"format": cache_mod.FORMAT, "kind": kind, "prompts": table, "rows": len(ids)}
        (root / cache_mod.INFO).write_text(json.dumps(info))
        roots[kind] = cache_mod.TrainingSet(root)

    c = C.load_components(model_dir)  # frozen VAE / text encoder as a worker loads them
    sources = {
        "cached": CachedBatches(
            roots["latents"], float(c.vae.config.scaling_factor), 0.0, "cpu", torch.float32
        ),
        "on the fly": OnlineBatches(
            roots["images"],
            c.vae,
            c.text_encoder,
            c.tokenizer,
            resolution=mcfg.resolution,
            prompt_dropout=0.0,
            augment=False,
            device="cpu",
            dtype=torch.float32,
        ),
    }
    init = {k: v.clone() for k, v in c.unet.state_dict().items()}
    rates: dict[str, list[float]] = {k: [] for k in sources}
    cpu_rates: dict[str, list[float]] = {k: [] for k in sources}
    batch = args.batch or tcfg.batch_size
    for r in range(args.rounds + 1):  # round 0 warms up both paths and is not counted
        for name, make in sources.items():
            unet = c.unet
            unet.load_state_dict(init)
            opt = torch.optim.AdamW(unet.parameters(), lr=tcfg.learning_rate)
            start, cpu_start = time.perf_counter(), time.process_time()
            for step in range(args.steps):
                gen = step_generator(0, 0, step)
                idx = cache_mod.batch_indices(len(ids), step, world=1, rank=0, batch=batch, seed=0)
                latents, text = make(idx, gen)
                _train_step(unet, c.noise_scheduler, opt, latents, text, gen, tcfg.max_grad_norm)
            if r:
                rates[name].append(args.steps * batch / (time.perf_counter() - start))
                cpu_rates[name].append(args.steps * batch / (time.process_time() - cpu_start))
    cached = statistics.median(rates["cached"])
    online = statistics.median(rates["on the fly"])
    print(
        f"tiny preset, CPU, {args.threads} thread(s), batch {batch}, {args.steps} steps x "
        f"{args.rounds} rounds (median), {mcfg.resolution} px model, 96 px patches"
    )
    print(
        f"  UNet {sum(p.numel() for p in c.unet.parameters()) / 1e6:.2f} M params, VAE "
        f"{sum(p.numel() for p in c.vae.parameters()) / 1e6:.2f} M, text encoder "
        f"{sum(p.numel() for p in c.text_encoder.parameters()) / 1e6:.3f} M"
    )
    print(
        f"  cached latents + text embeddings : {cached:8.1f} samples/s  {_spread(rates['cached'])}"
    )
    print(
        f"  encode every batch (on the fly)  : {online:8.1f} samples/s  {_spread(rates['on the fly'])}"
    )
    print(f"  speed-up (wall clock)            : {cached / online:8.2f}x")
    cpu_c = statistics.median(cpu_rates["cached"])
    cpu_o = statistics.median(cpu_rates["on the fly"])
    print(
        f"  per CPU-second (robust to load)  : {cpu_c:8.1f} vs {cpu_o:.1f} samples, "
        f"speed-up {cpu_c / cpu_o:.2f}x"
    )
    print(
        f"  cache build (once, {len(ids)} images + {len(table)} prompts): {cache_s:.1f} s, "
        f"i.e. {len(ids) / cache_s:.0f} images/s"
    )


def _train_step(unet, noise_scheduler, opt, latents, text, gen, max_norm: float) -> None:
    import torch

    from meddiff.synthesis.diffusion import diffusion_loss

    loss = diffusion_loss(unet, noise_scheduler, latents, text, gen)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), max_norm)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _spread(values: list[float]) -> str:
    return f"(min {min(values):.1f}, max {max(values):.1f})"


def flop_split() -> None:
    """Work per training image, counted (not timed) with torch's FLOP counter on the meta device:
    what caching removes (VAE encoder + text encoder) against what remains (UNet forward and
    backward), for the tiny preset and for SD-1.5 sizes at 512 px."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from meddiff.config import load_config
    from meddiff.synthesis import components as C

    def count(fn) -> float:
        with FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops() / 1e9

    print("\nFLOPs per training image (counted on the meta device, not timed):")
    for name, preset in (("tiny preset", "tiny"), ("SD-1.5 sizes, 512 px", None)):
        cfg = load_config(preset, overrides=["synthesis.model.source=null"])
        m, a = cfg.synthesis.model, cfg.synthesis.model.arch
        f = 2 ** (len(a.vae_channels) - 1)
        tok = C.build_tokenizer(["histology image of cancer tissue"], a.max_length)
        ids = C.tokenize(tok, ["histology image of cancer tissue"])
        with torch.device("meta"):
            vae, unet = C.build_vae(a, m.resolution), C.build_unet(a, m.resolution, f)
            text_encoder = C.build_text_encoder(a, tok)
            x = torch.empty(1, 3, m.resolution, m.resolution)
            lat = torch.empty(1, a.latent_channels, m.resolution // f, m.resolution // f)
            emb = torch.empty(1, a.max_length, a.text_hidden_size)
            t = torch.zeros(1, dtype=torch.long)
        enc = count(lambda: vae.encode(x).latent_dist.mean)  # noqa: B023
        txt = count(lambda: text_encoder(ids.to("meta"))[0])  # noqa: B023
        fwd = count(lambda: unet(lat, t, emb).sample)  # noqa: B023
        train = count(lambda: unet(lat, t, emb).sample.sum().backward())  # noqa: B023
        print(
            f"  {name:22s}: VAE encoder {enc:9.3f} GF, text encoder {txt:7.4f} GF, UNet fwd+bwd "
            f"{train:9.3f} GF -> caching bound {1 + (enc + txt) / train:.2f}x "
            f"({1 + (enc + txt) / (train + fwd):.2f}x with gradient checkpointing)"
        )


def gpu_benchmark(args: argparse.Namespace) -> None:
    """SD-1.5-sized UNet at 512 px, DeepSpeed ZeRO-2 bf16 on one GPU (needs CUDA)."""
    import torch

    if not torch.cuda.is_available():
        print(
            "\nGPU: skipped (no CUDA device here); run this script on a GPU machine for the "
            "SD-1.5-sized ZeRO-2 bf16 figures"
        )
        return
    import deepspeed
    import torch.distributed as dist
    from diffusers import DDPMScheduler

    from meddiff.config import load_config
    from meddiff.synthesis import components as C
    from meddiff.training import deepspeed_config

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT="29541", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1)
    cfg = load_config(
        overrides=["synthesis.model.source=null", f"synthesis.train.batch_size={args.gpu_batch}"]
    )
    mcfg, tcfg = cfg.synthesis.model, cfg.synthesis.train
    arch = mcfg.arch
    dev = torch.device("cuda")
    torch.manual_seed(0)
    unet = C.build_unet(arch, mcfg.resolution, 8).to(dev)
    if args.gpu_checkpointing:
        unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(unet.parameters(), lr=tcfg.learning_rate, fused=True)
    engine, *_ = deepspeed.initialize(
        model=unet,
        optimizer=opt,
        config=deepspeed_config(
            micro_batch=tcfg.batch_size,
            zero_stage=tcfg.zero_stage,
            precision="bf16",
            grad_clip=tcfg.max_grad_norm,
            cuda=True,
        ),
        dist_init_required=False,
    )
    sched = DDPMScheduler.from_config(C.SD_SCHEDULE)
    b = args.gpu_batch
    latent = torch.randn(b, 4, 64, 64, device=dev, dtype=torch.bfloat16)
    text = torch.randn(b, arch.max_length, arch.text_hidden_size, device=dev, dtype=torch.bfloat16)

    def step(latents, emb, s):
        from meddiff.synthesis.diffusion import diffusion_loss

        loss = diffusion_loss(engine, sched, latents, emb, torch.Generator().manual_seed(s))
        engine.backward(loss)
        engine.step()

    # On-the-fly inputs: SD-sized VAE encoder and CLIP text encoder (random weights) per batch.
    vae = C.build_vae(arch, mcfg.resolution).to(dev, torch.bfloat16).eval()
    tok = C.build_tokenizer(
        ["histology image of cancer tissue morphology type one"], arch.max_length
    )
    text_encoder = C.build_text_encoder(arch, tok).to(dev, torch.bfloat16).eval()
    pixels = (
        torch.rand(b, 3, mcfg.resolution, mcfg.resolution, device=dev, dtype=torch.bfloat16) * 2 - 1
    )
    ids = C.tokenize(tok, ["histology image of cancer tissue morphology type one"] * b).to(dev)

    def online_inputs():
        with torch.no_grad():
            lat = vae.encode(pixels).latent_dist.sample() * 0.18215
            return lat, text_encoder(ids)[0]

    results = {}
    for name, inputs in (("cached", lambda: (latent, text)), ("on the fly", online_inputs)):
        for s in range(3):  # warm-up (cuDNN autotuning, allocator)
            step(*inputs(), s)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for s in range(args.gpu_steps):
            step(*inputs(), s)
        torch.cuda.synchronize()
        results[name] = args.gpu_steps * b / (time.perf_counter() - start)
    print(
        f"\nGPU {torch.cuda.get_device_name()}: SD-1.5-sized UNet "
        f"({sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M params, random weights), "
        f"512 px, DeepSpeed ZeRO-2 bf16, batch {b}, gradient checkpointing "
        f"{'on' if args.gpu_checkpointing else 'off'}"
    )
    print(f"  cached latents + text embeddings : {results['cached']:8.2f} samples/s")
    print(f"  encode every batch (on the fly)  : {results['on the fly']:8.2f} samples/s")
    print(f"  speed-up                         : {results['cached'] / results['on the fly']:8.2f}x")
    print(
        f"  peak GPU memory                  : {torch.cuda.max_memory_allocated() / 2**30:8.1f} GiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256, help="sample patches to train on")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--batch", type=int, default=None, help="default: the tiny preset's")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (a tiny-preset Ray worker has 1 CPU)"
    )
    parser.add_argument("--gpu-batch", type=int, default=8)
    parser.add_argument("--gpu-steps", type=int, default=20)
    parser.add_argument("--gpu-checkpointing", action="store_true")
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args()
    if not args.skip_cpu:
        cpu_benchmark(args)
        flop_split()
    gpu_benchmark(args)


if __name__ == "__main__":
    main()
