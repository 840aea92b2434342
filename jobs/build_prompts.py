"""Ray job: morphology-enriched prompts (filter, DINO embedding, K-means, prompt text).

    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/build_prompts.py \
        --input /shared/shards/pcam-train --out /shared/prompts/morphology \
        --config configs/prompts_full.yaml

Takes the arguments of ``meddiff prompts build``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from meddiff.cli import main as cli_main


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(["prompts", "build", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
