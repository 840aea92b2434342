"""Ray job: paper A's comparison of label-only (baseline) and morphology prompts, end to end
(prompts → fine-tune → generate → evaluate), one metric × strategy table and an HTML report.

    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/compare_prompting.py \
        --preset full --data /shared/pcam --out /shared/experiments/prompting

Takes the arguments of ``meddiff eval compare-prompting``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from meddiff.cli import main as cli_main


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(["eval", "compare-prompting", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
