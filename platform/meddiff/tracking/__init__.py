"""The one place that talks to MLflow: runs, logged configs and artifacts, the model registry.

No module outside this package imports mlflow (tests/unit/test_tracking_door.py checks it): a job
logs through the run handle :func:`start_run` yields (:class:`RunLogger`), and reads or tags
registry versions through the functions below.
"""

from meddiff.tracking.aliases import set_version_tags, version_tags
from meddiff.tracking.lineage import model_lineage
from meddiff.tracking.registry import fetch_model, register_model
from meddiff.tracking.runs import (
    RunLogger,
    active_run,
    code_version,
    log_config,
    start_run,
    tracking_uri,
)

__all__ = [
    "RunLogger",
    "active_run",
    "code_version",
    "fetch_model",
    "log_config",
    "model_lineage",
    "register_model",
    "set_version_tags",
    "start_run",
    "tracking_uri",
    "version_tags",
]
