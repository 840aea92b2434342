"""Ray job: stream a PCam directory (or shards) into Parquet shards.

    ray job submit --working-dir . -- python jobs/ingest.py \
        --input /shared/pcam --split train --out /shared/shards/pcam-train --preset full

Takes the arguments of ``meddiff data ingest``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from meddiff.cli import main as cli_main


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(["data", "ingest", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
