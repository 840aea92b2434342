"""What a prompts build writes (the names under ``OUT``) and where it is built.

A build is made in ``<staging>.partial`` beside the output location's staging folder and put in
place at the end (:meth:`~meddiff.storage.OutputLocation.install`), so a folder named ``OUT`` is
always complete. Ray workers write their two shard stages (pass 1's ``_work/checked`` and the
``pairs``) where every node reaches: the partial folder itself (local, or on a shared
filesystem), or the object-store prefix of the output (:meth:`OutputLocation.shared`); the
driver then reads local copies of them in the partial folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from meddiff import storage

WORK = "_work"
CHECKED = "checked"
PAIRS = "pairs"
MODEL_DIR = "morphology_model"
PROMPTS_CSV = "prompts.csv"
SUMMARY = "summary.json"
EMBEDDER_WEIGHTS = "embedder.safetensors"


@dataclass(frozen=True)
class Workspace:
    """The places of one build: :attr:`partial` (the driver's local build folder) and the two
    shard stages the Ray workers write (:attr:`worker_checked`, :attr:`worker_pairs`: paths or
    object-store URIs) with their local copies (:attr:`checked`, :attr:`pairs`)."""

    partial: Path
    worker_checked: str | Path
    worker_pairs: str | Path

    @classmethod
    def of(cls, loc: storage.OutputLocation) -> Workspace:
        """The workspace of a build whose output is ``loc``."""
        out = loc.staging
        partial = out.with_name(out.name + ".partial")
        workers = loc.shared(partial)
        return cls(partial, storage.join(workers, WORK, CHECKED), storage.join(workers, PAIRS))

    @property
    def checked(self) -> Path:
        """Pass 1's rows (every patch, with its ``reject`` reason and embedding): the
        checkpoint a rerun resumes from."""
        return self.partial / WORK / CHECKED

    @property
    def pairs(self) -> Path:
        return self.partial / PAIRS

    @property
    def model_dir(self) -> Path:
        return self.partial / MODEL_DIR
