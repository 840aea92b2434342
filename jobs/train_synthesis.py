"""Ray job: fine-tune Stable Diffusion on (image, prompt) pairs (Ray Train, DeepSpeed ZeRO or DDP).

    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/train_synthesis.py \
        --pairs /shared/prompts/pairs --out /shared/synth/morphology --preset full

Takes the arguments of ``meddiff synth train``; running it again with the same --out resumes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from meddiff.cli import main as cli_main


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(["synth", "train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
