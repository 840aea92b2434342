"""Ray job: evaluate THOR (and baselines) on a folder of images with masks.

    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/evaluate_thor.py \
        --model models:/thor-ddpm/1 --images /shared/brain/test/images \
        --masks /shared/brain/test/masks --method thor --method ddpm --out /shared/eval/thor

Takes the arguments of ``meddiff thor evaluate`` (prints JSON metrics; with --out also writes
metrics.json and report.html).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from meddiff.cli import main as cli_main


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(["thor", "evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
