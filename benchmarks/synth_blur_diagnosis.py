"""Where does a synthesis model's blur come from: its pixel grid, its VAE, or its diffusion model?

    python benchmarks/synth_blur_diagnosis.py --real runs/ship/pcam \\
        --model shipped=platform/meddiff/synthesis/pretrained/pcam-tiny --model new=runs/ship/synth/model \\
        --n 512 --out runs/blur

Every arm is a set of ``--n`` 96-px patches judged against the real sample set (the ``train``
split of ``meddiff data sample-pcam``, all of it, as the reference):

- ``real held-out``: real patches the reference does not contain (``valid`` + ``test`` splits),
  the floor any model is compared with (FID of n real patches is not 0 at this n);
- ``grid only``: those held-out patches resized to the model's resolution and back to 96 px
  exactly as the pipeline does it (antialiased bilinear down, bicubic up), no network involved:
  what the pixel grid alone costs;
- ``VAE recon``: the held-out patches encoded (posterior mean) and decoded by the model's VAE,
  then brought back to 96 px: what the autoencoder costs on top of the grid;
- ``generated``: the model's own samples (tiny preset's sampler: DPM-Solver, 10 steps, guidance
  7.5; prompts drawn in proportion to the model's ``prompts.csv``, seeds 0..n-1), i.e. generated
  latents decoded by the same VAE.

Columns: ``FID`` against the reference with the TF-FID Inception-v3
(``meddiff.weights.weight_file("inception-tf-fid")`` with the TF FID graph's preprocessing:
TF-1 bilinear resize to 299 px, (x − 128) / 128; Fréchet distance of the 2048-d pool features,
:func:`meddiff.evaluation.metrics.fd`);
``FID vs recon`` (generated only): the generated set against the VAE reconstructions, i.e. how far
the diffusion model is from what its VAE can show; ``lap var`` and ``HF power``: the mean
variance of the Laplacian of the grey image (``skimage.filters.laplace``) and the mean share of
spectral power above 1/8 cycle per pixel (periods under 8 px: nucleus edges and membranes; a
32-px grid shown at 96 px still holds up to 1/6), each as a ratio to the held-out real patches
(1.0 = as sharp as real; the Laplacian weighs the finest pixel-scale detail most); ``PSNR``/``SSIM`` (``skimage.metrics``, data range 255, colour)
of each reconstruction against its original.

It writes ``OUT/<model>-arms.png`` (rows: real, grid only, VAE recon, generated), ``OUT/table.txt`` (a Markdown table)
and ``OUT/table.json``; Inception features are kept in ``OUT/features/`` by image content, so a
second run with another model only computes that model's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

# Part of the cache key: features made with other preprocessing are never reused.
PREPROCESSING = "tf1-bilinear-299_x-128_div128"


def cached_features(images: np.ndarray, cache: Path) -> np.ndarray:
    """:func:`inception_features`, kept in ``cache`` under the SHA-256 of the images' bytes and
    :data:`PREPROCESSING` (a rerun with another model reuses the real patches' and the first
    model's features)."""
    import hashlib

    h = hashlib.sha256(PREPROCESSING.encode())
    h.update(np.ascontiguousarray(images).tobytes())
    path = cache / f"inception-{h.hexdigest()[:16]}.npy"
    if path.is_file():
        return np.load(path)
    feats = inception_features(images)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, feats)
    return feats


def inception_features(images: np.ndarray, batch: int = 32) -> np.ndarray:
    """uint8 (n, H, W, 3) → TF-FID Inception-v3 pool features float64 (n, 2048).

    The TorchScript file is the network only; the TF FID graph's preprocessing is done here, as
    meddiff's evaluation does it: TensorFlow 1's bilinear resize to 299 px (output pixel j reads
    input coordinate j·H/299, no half-pixel centres) and (x − 128) / 128.
    """
    import warnings

    import torch

    from meddiff.weights import weight_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        net = torch.jit.load(str(weight_file("inception-tf-fid")), map_location="cpu").eval()
    out = []
    with torch.inference_mode():
        for lo in range(0, len(images), batch):
            x = torch.from_numpy(images[lo : lo + batch]).permute(0, 3, 1, 2).float()
            out.append(net((_resize_tf(x, 299) - 128.0) / 128.0).double().numpy())
    return np.concatenate(out)


def _resize_tf(x, size: int):
    """TF 1's ``resize_bilinear`` (align_corners=False) of float (n, C, H, W) to ``size``."""
    import torch
    import torch.nn.functional as F

    n, c, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    # affine_grid puts output pixel j at (2j + 1)/size − 1; shifted to input pixel j·w/size.
    theta[:, 0, 2], theta[:, 1, 2] = 1 / w - 1 / size, 1 / h - 1 / size
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grey(images: np.ndarray) -> np.ndarray:
    """uint8 (n, H, W, 3) → float (n, H, W) luminance in [0, 1] (ITU-R BT.601 weights)."""
    return images.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0


def laplacian_variance(images: np.ndarray) -> float:
    """Mean over images of the variance of the grey image's Laplacian (a focus measure)."""
    from skimage.filters import laplace

    return float(np.mean([laplace(g).var() for g in grey(images)]))


def high_frequency_share(images: np.ndarray, cutoff: float = 0.125) -> float:
    """Mean over images of the share of spectral power (DC excluded) above ``cutoff``
    cycles/pixel (0.5 is Nyquist)."""
    g = grey(images)
    g = g - g.mean(axis=(1, 2), keepdims=True)
    power = np.abs(np.fft.fft2(g)) ** 2
    fy = np.fft.fftfreq(g.shape[1])[:, None]
    fx = np.fft.fftfreq(g.shape[2])[None, :]
    high = np.hypot(fy, fx) > cutoff
    total = power.sum(axis=(1, 2))
    return float(np.mean(power[:, high].sum(axis=1) / np.maximum(total, 1e-12)))


def psnr_ssim(recon: np.ndarray, real: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    psnr = [peak_signal_noise_ratio(a, b, data_range=255) for a, b in zip(real, recon, strict=True)]
    ssim = [
        structural_similarity(a, b, data_range=255, channel_axis=-1)
        for a, b in zip(real, recon, strict=True)
    ]
    return float(np.mean(psnr)), float(np.mean(ssim))


def load_real(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """The reference (train split) and the held-out patches (valid + test), uint8 (n, 96, 96, 3)."""
    from meddiff.data.pcam import open_pcam, read_rows

    def rows(split: str) -> np.ndarray:
        s = open_pcam(root, split)
        return read_rows(s, 0, s.num_rows)["image"]

    return rows("train"), np.concatenate([rows("valid"), rows("test")])


def model_resolution(pipe) -> int:
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def grid_only(images: np.ndarray, resolution: int) -> np.ndarray:
    """The pipeline's resize to ``resolution`` and back to the patch size, nothing else."""
    from meddiff.synthesis import components as C
    from meddiff.synthesis.stages import to_uint8

    x = C.preprocess_images(images, resolution)
    return to_uint8(((x + 1) / 2).permute(0, 2, 3, 1).numpy(), images.shape[1])


def reconstruct(pipe, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """Encode (posterior mean) and decode ``images`` with the pipeline's VAE, at the model's
    resolution, back to the patch size as generation does."""
    import torch

    from meddiff.synthesis import components as C
    from meddiff.synthesis.stages import to_uint8

    res, out = model_resolution(pipe), []
    with torch.inference_mode():
        for lo in range(0, len(images), batch):
            x = C.preprocess_images(images[lo : lo + batch], res)
            y = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
            y = (y / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
            out.append(to_uint8(y, images.shape[1]))
    return np.concatenate(out)


def generate(model: Path, n: int, steps: int, guidance: float) -> np.ndarray:
    """``n`` patches from the model (no Ray): prompts in proportion to its prompts.csv."""
    from meddiff.config import load_config
    from meddiff.prompts import read_prompt_table
    from meddiff.synthesis.generate import generation_plan
    from meddiff.synthesis.stages import ImageGenerator

    cfg = load_config(
        "tiny",
        overrides=[
            "synthesis.generate.plan=proportional",
            f"synthesis.generate.total_images={n}",
            f"synthesis.generate.steps={steps}",
            f"synthesis.generate.guidance_scale={guidance}",
        ],
    )
    g = cfg.synthesis.generate
    plan = generation_plan(read_prompt_table(model / "prompts.csv", cfg.prompts), g, cfg.prompts)
    gen = ImageGenerator(model, g.model_dump(mode="json"))
    out = []
    for lo in range(0, n, g.batch_size):
        batch = {k: v[lo : lo + g.batch_size] for k, v in plan.items()}
        out.append(gen(batch)["image"])
    return np.concatenate(out)


def save_arms(path: Path, arms: dict[str, np.ndarray], k: int = 12) -> None:
    from PIL import Image

    from meddiff.grids import grid

    rows = [np.asarray(grid(imgs[:k], caption=name, cols=k)) for name, imgs in arms.items()]
    Image.fromarray(np.concatenate(rows)).save(path)


def main() -> None:
    import torch

    from meddiff.evaluation.metrics import fd
    from meddiff.synthesis import components as C

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", type=Path, required=True, help="meddiff data sample-pcam folder")
    ap.add_argument("--model", action="append", required=True, help="NAME=pipeline directory")
    ap.add_argument("--n", type=int, default=512, help="patches per arm")
    ap.add_argument("--steps", type=int, default=10, help="sampler steps (tiny preset: 10)")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/blur"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    reference, held_out = load_real(args.real)
    held_out = held_out[: args.n]
    cache = args.out / "features"
    ref_feats = cached_features(reference, cache)
    real_lap, real_hf = laplacian_variance(held_out), high_frequency_share(held_out)
    rows = [_row("real held-out", held_out, ref_feats, real_lap, real_hf, cache)]
    for spec in args.model:
        name, _, path = spec.partition("=")
        pipe = C.load_pipeline(path)
        res = model_resolution(pipe)
        arms = {
            "real": held_out,
            f"grid only ({res} px)": grid_only(held_out, res),
            "VAE recon": reconstruct(pipe, held_out),
            "generated": generate(Path(path), args.n, args.steps, args.guidance),
        }
        save_arms(args.out / f"{name}-arms.png", arms)
        feats = {}
        for arm, imgs in list(arms.items())[1:]:
            row = _row(f"{name}: {arm}", imgs, ref_feats, real_lap, real_hf, cache)
            feats[arm] = row.pop("_feats")
            if arm != "generated":
                row["psnr"], row["ssim"] = psnr_ssim(imgs, held_out)
            rows.append(row)
        rows[-1]["fid_vs_recon"] = fd(feats["VAE recon"], feats["generated"])
        print(f"[{time.perf_counter() - t0:.0f} s] {name} done", flush=True)
    for r in rows:
        r.pop("_feats", None)
    table = _table(rows, len(reference), args.n)
    print(table)
    (args.out / "table.txt").write_text(table + "\n")
    (args.out / "table.json").write_text(json.dumps(rows, indent=2))


def _row(name: str, images, ref_feats, real_lap: float, real_hf: float, cache: Path) -> dict:
    from meddiff.evaluation.metrics import fd

    feats = cached_features(images, cache)
    return {
        "arm": name,
        "fid": fd(ref_feats, feats),
        "lap_var_ratio": laplacian_variance(images) / real_lap,
        "hf_power_ratio": high_frequency_share(images) / real_hf,
        "_feats": feats,
    }


def _table(rows: list[dict], n_ref: int, n: int) -> str:
    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    lines = [
        f"reference: {n_ref} real train patches; {n} patches per arm; FID = TF-FID Inception-v3",
        "",
        "| arm | FID | FID vs recon | lap var (÷ real) | HF power (÷ real) | PSNR dB | SSIM |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['fid']:.1f} | {f(r.get('fid_vs_recon'), '.1f')} | "
            f"{r['lap_var_ratio']:.3f} | {r['hf_power_ratio']:.3f} | "
            f"{f(r.get('psnr'), '.2f')} | {f(r.get('ssim'), '.3f')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
