"""Morphology-enriched prompts (paper A): quality filter, frozen DINO embedding, K-means, prompts.

Components: :mod:`.quality` and :mod:`.embed` are plain callables that Ray Data runs;
:mod:`.cluster` fits and applies the morphology model; :mod:`meddiff.prompts` turns labels and
clusters into text; :mod:`.gallery` draws what each type looks like.

The job (``build_prompts``) is :mod:`.pipeline`; its parts: :mod:`.layout` (what a build writes
and where), :mod:`.stages` (the Ray Data passes: check + embed, assign prompts), :mod:`.resume`
(pass 1 as a checkpoint), :mod:`.fit` (the model: fitted or reused), :mod:`.columns` (shard
columns read on the driver).
"""
