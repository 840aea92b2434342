"""The one place that talks to MLflow: runs, logged configs and artifacts, the model registry."""

from meddiff.tracking.lineage import log_input, model_lineage
from meddiff.tracking.registry import fetch_model, register_model
from meddiff.tracking.runs import RunLogger, code_version, log_config, start_run, tracking_uri

__all__ = [
    "RunLogger",
    "code_version",
    "fetch_model",
    "log_config",
    "log_input",
    "model_lineage",
    "register_model",
    "start_run",
    "tracking_uri",
]
