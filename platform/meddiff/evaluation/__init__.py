"""Judging synthetic data (paper A's evaluation): feature extractors, fidelity and diversity
metrics, the coverage picture, the downstream classifier, the reader-study kit, the HTML report
and the baseline-vs-morphology prompting experiment. See docs/evaluation.md."""
