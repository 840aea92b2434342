"""Small brain volumes for the volume and DICOM tests (meddiff.data.volume_samples: the bundled
MNI152 template, coarse for speed, under any affine, with a drawn lesion), and the patient
identifiers the privacy checks plant and then search for."""

from __future__ import annotations

from meddiff.data.volume_samples import brain_volume as brain
from meddiff.data.volume_samples import draw_lesion

__all__ = ["PLANTED_ID", "PLANTED_NAME", "brain", "draw_lesion"]

PLANTED_NAME = "Planted^Patient^Zq7"  # searched for in logs, MLflow and file names
PLANTED_ID = "PID-ZQ7-0042"
