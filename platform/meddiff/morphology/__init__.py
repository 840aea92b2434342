"""Morphology-enriched prompts (paper A): quality filter, frozen DINO embedding, K-means, prompts.

Stages (:mod:`.quality`, :mod:`.embed`) are plain callables that Ray Data runs; :mod:`.cluster`
fits and applies the morphology model; :mod:`.prompts` turns labels and clusters into text;
:mod:`.pipeline` runs the whole stage (``build_prompts``) with Ray and MLflow.
"""
