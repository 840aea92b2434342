"""Ray job: the main job end to end (sample data through every stage).

    ray job submit --working-dir . -- python jobs/demo.py --preset tiny --out /shared/demo

Takes the arguments of ``meddiff demo``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from meddiff.cli import main as cli_main


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
