"""Ray job: generate synthetic patches for a prompt table (Ray Data batch inference).

    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/generate.py \
        --model models:/meddiff-sd-histology@champion --prompts /shared/prompts/prompts.csv \
        --out /shared/synthetic/morphology --preset full

Takes the arguments of ``meddiff synth generate``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from meddiff.cli import main as cli_main


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(["synth", "generate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
