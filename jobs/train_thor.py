"""Ray job: train THOR's DDPM on healthy slices (Ray Train), register the model in MLflow.

    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/train_thor.py \
        --data /shared/brain/train --out /shared/runs/thor --preset full

Takes the arguments of ``meddiff thor train``. Running it again with the same ``--out`` resumes
from the latest checkpoint.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from meddiff.cli import main as cli_main


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(["thor", "train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
