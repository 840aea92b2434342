"""What the perceptual term buys the synthesis VAE's warm-up: reconstructions of held-out patches
after the same warm-up with pixel MSE only and with the EfficientNet-Lite0 perceptual term.

    OMP_NUM_THREADS=1 python benchmarks/synth_vae_perceptual.py --real runs/ship/pcam \\
        --weight 0 --weight 0.25 --weight 1.0 --steps 200 --out runs/vae-perceptual

Each ``--weight`` is one arm: a fresh VAE (seed 0; 96 px, 4 levels (32, 32, 64, 64 channels,
8× down), 8 latent channels, one layer per block, the architecture of ``runs/ship/train96.sh``'s
model) fitted by :func:`meddiff.synthesis.autoencoder.fit_vae` on the first 1024 ``train``
patches of ``meddiff data sample-pcam`` (random 48-px crops, batch 8, ``--steps`` steps) with loss
pixel MSE + weight × perceptual distance (``efficientnet-lite0``; weight 0 = pixel MSE only), then
judged on the first 64 ``valid`` patches: PSNR and SSIM against the originals, and the Laplacian
variance and high-frequency power of the reconstructions as ratios to the originals'
(``benchmarks/synth_blur_diagnosis.py`` defines them). Quality, not speed, is compared; the
seconds per arm are printed for scale only (the machine is shared). Writes
``OUT/recon-<weight>.png`` (real row above reconstructions) and ``OUT/table.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def arm(weight: float, steps: int, train, held, out: Path) -> dict:
    """One warm-up with perceptual weight ``weight``; returns its row of the table."""
    import torch

    from meddiff.config.synthesis import ArchConfig
    from meddiff.synthesis import components as C
    from meddiff.synthesis.autoencoder import fit_vae
    from meddiff.synthesis.stages import to_uint8
    from synth_blur_diagnosis import high_frequency_share, laplacian_variance, psnr_ssim, save_arms

    arch = ArchConfig(
        vae_channels=[32, 32, 64, 64], vae_layers_per_block=1, norm_num_groups=8, latent_channels=8
    )
    torch.manual_seed(0)
    vae = C.build_vae(arch, 96)
    t0 = time.perf_counter()
    fit_vae(
        vae, train, 96, steps, batch_size=8, crop=48,
        perceptual="efficientnet-lite0" if weight > 0 else None, perceptual_weight=weight,
        log_every=25, on_log=lambda s, m: print(f"  w={weight} step {s}: {m}", flush=True),
        state=out / f"state-{weight}.pt", key={"w": weight, "steps": steps},
    )  # fmt: skip
    secs = time.perf_counter() - t0
    with torch.inference_mode():
        y = vae.decode(vae.encode(C.preprocess_images(held, 96)).latent_dist.mean).sample
    recon = to_uint8((y / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), 96)
    psnr, ssim = psnr_ssim(recon, held)
    save_arms(out / f"recon-{weight}.png", {"real": held, f"recon w={weight}": recon}, k=10)
    return {
        "weight": weight,
        "steps": steps,
        "seconds": secs,
        "psnr": psnr,
        "ssim": ssim,
        "lap_var_ratio": laplacian_variance(recon) / laplacian_variance(held),
        "hf_power_ratio": high_frequency_share(recon) / high_frequency_share(held),
    }


def main() -> None:
    import torch

    from meddiff.data.pcam import open_pcam, read_rows

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", type=Path, required=True, help="meddiff data sample-pcam folder")
    ap.add_argument("--weight", type=float, action="append", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("runs/vae-perceptual"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    train = read_rows(open_pcam(args.real, "train"), 0, 1024)["image"]
    held = read_rows(open_pcam(args.real, "valid"), 0, 64)["image"]
    rows = [arm(w, args.steps, train, held, args.out) for w in args.weight]
    print("| perceptual weight | PSNR dB | SSIM | lap var (÷ real) | HF power (÷ real) | s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['weight']:g} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['lap_var_ratio']:.3f} | "
            f"{r['hf_power_ratio']:.3f} | {r['seconds']:.0f} |"
        )
    (args.out / "table.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
