"""Stable Diffusion fine-tuning on (image, prompt) pairs and synthesis of new patches (paper A).

- :mod:`~meddiff.synthesis.components`: the SD components (UNet, VAE, CLIP text encoder, tokenizer,
  noise scheduler), loaded from a hub id or directory, or built small from config (tiny preset).
- :mod:`~meddiff.synthesis.stages`: Ray Data stages (encode images/prompts, generate images).
- :mod:`~meddiff.synthesis.cache`: the latent/text-embedding cache training reads.
- :mod:`~meddiff.synthesis.diffusion`: the training objective and batch preparation.
- :mod:`~meddiff.synthesis.train`: Ray Train fine-tuning (DeepSpeed ZeRO or DDP), checkpoints, resume.
- :mod:`~meddiff.synthesis.generate`: the generation plan, run as Ray Data batch inference into
  the PCam layout. The prompt table itself is :mod:`meddiff.prompts`.
"""
