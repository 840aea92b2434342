"""One typed configuration for every meddiff job.

A run's config is built in layers, each overriding the one before:

1. the field defaults, which are the full-size (paper) settings;
2. a named preset (``tiny`` is sized for a 2-core CPU);
3. a YAML file (it may name its own base preset with a top-level ``preset:`` key);
4. ``--set a.b=v`` overrides, whose values are parsed as YAML (``3``, ``[64, 128]``, ``null``).

The result is frozen and validated; an unknown key anywhere is an error that names the key and
suggests the nearest valid one. Workers receive ``cfg.model_dump()`` and call
``Config.model_validate`` on it, so nothing depends on driver globals.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from meddiff.config import data as _data
from meddiff.config import evaluation as _evaluation
from meddiff.config import prompts as _prompts
from meddiff.config import synthesis as _synthesis
from meddiff.config import thor as _thor
from meddiff.config.base import Section
from meddiff.config.core import RuntimeConfig, StorageConfig, TrackingConfig
from meddiff.config.data import DataConfig
from meddiff.config.evaluation import EvaluationConfig
from meddiff.config.prompts import PromptsConfig
from meddiff.config.synthesis import SynthesisConfig
from meddiff.config.thor import ThorConfig
from meddiff.errors import ConfigError

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EvaluationConfig",
    "PRESETS",
    "PromptsConfig",
    "RuntimeConfig",
    "Section",
    "StorageConfig",
    "SynthesisConfig",
    "ThorConfig",
    "TrackingConfig",
    "load_config",
]


class Config(Section):
    """The root configuration: one section per area of the platform."""

    runtime: RuntimeConfig = RuntimeConfig()
    tracking: TrackingConfig = TrackingConfig()
    storage: StorageConfig = StorageConfig()
    data: DataConfig = DataConfig()
    prompts: PromptsConfig = PromptsConfig()
    synthesis: SynthesisConfig = SynthesisConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    thor: ThorConfig = ThorConfig()


# Presets are partial configs (nested dicts) laid over the field defaults. Each area keeps its own
# tiny overrides beside its section so the sizes live next to the fields they size.
PRESETS: dict[str, dict[str, Any]] = {
    "full": {},
    "tiny": {
        # The store's pages stay resident once touched, so its size, not the input's length,
        # sets the streaming footprint: 256 MiB measured ~200 MiB less than 1 GiB at the same
        # throughput (benchmarks/data_ingest.py).
        "runtime": {"num_cpus": 2, "object_store_memory_mb": 256, "data_memory_mb": 128},
        "data": _data.TINY,
        "prompts": _prompts.TINY,
        "synthesis": _synthesis.TINY,
        "evaluation": _evaluation.TINY,
        "thor": _thor.TINY,
    },
}


def load_config(
    preset: str | None = None,
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> Config:
    """Build a validated config from a preset, a YAML file and ``a.b=v`` overrides.

    Raises:
        ConfigError: unknown preset, unreadable YAML, malformed override, unknown key or bad value;
            the message names the key and where it came from.
    """
    sources: list[str] = []
    layers: list[Mapping[str, Any]] = []
    file_layer: dict[str, Any] = {}
    if path is not None:
        file_layer = _read_yaml(Path(path))
        file_preset = file_layer.pop("preset", None)
        if preset is None:
            preset = file_preset
    if preset is not None:
        layers.append(_preset(preset))
        sources.append(f"preset '{preset}'")
    if path is not None:
        layers.append(file_layer)
        sources.append(f"file {path}")
    for item in overrides:
        layers.append(_parse_override(item))
        sources.append(f"--set {item}")

    merged: dict[str, Any] = {}
    for layer in layers:
        merged = _deep_merge(merged, layer)
    try:
        return Config.model_validate(merged)
    except ValidationError as err:
        origin = ", ".join(sources) if sources else "defaults"
        raise ConfigError(f"invalid configuration ({origin}):\n{_explain(err)}") from None


def config_to_yaml(cfg: BaseModel) -> str:
    """The resolved config as YAML, in field order (what every run logs)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; known presets: {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections, got {type(data).__name__}"
        )
    return data


def _parse_override(item: str) -> dict[str, Any]:
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"override '{item}' must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{item}': value is not valid YAML: {err}") from None
    layer: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        layer = {part: layer}
    return layer


def _deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _explain(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            hint = _suggest(item["loc"])
            lines.append(f"  {loc}: unknown key{hint}")
        else:
            lines.append(f"  {loc}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


# Keys renamed since they were released: the old name gets its new one as the suggestion. The
# training loops' shared settings took one name each (config/training.py).
RENAMED = {
    "data.wsi.backend": "reader",
    "thor.train.steps": "max_steps",
    "thor.train.lr": "learning_rate",
    "thor.train.grad_clip": "max_grad_norm",
    "thor.train.register_as": "registered_name",
    "evaluation.classifier.steps": "max_steps",
    "evaluation.classifier.lr": "learning_rate",
}


def _suggest(loc: tuple[Any, ...]) -> str:
    """' (did you mean x?)' for a misspelt or renamed key, from the fields of the model that
    holds it (:data:`RENAMED` first)."""
    renamed = RENAMED.get(".".join(str(p) for p in loc))
    if renamed is not None:
        return f" (renamed: did you mean '{renamed}'?)"
    model: type[BaseModel] | None = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if model else None
        annotation = field.annotation if field else None
        model = (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else None
        )
    if model is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    valid = ", ".join(model.model_fields)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {valid})"


# `meddiff eval compare-prompting --preset prompting-cpu`: paper A's comparison (baseline vs
# morphology prompts) at a scale a 2-core CPU runs in about 40 minutes for three seeds
# (docs/evaluation.md gives the measured times): the tiny networks, the synthesis model trained
# 240 steps instead of 60, the same number of synthetic patches for both arms (384, split over the
# prompts by their share of the real data, so the arms differ only in their prompts) sampled with
# 20 steps, the classifier trained 400 steps, the metrics with 100 bootstrap resamples.
PRESETS["prompting-cpu"] = _deep_merge(
    PRESETS["tiny"],
    {
        "synthesis": {
            "train": {
                "max_steps": 240,
                "warmup_steps": 24,
                "learning_rate": 5e-4,
                "ema_decay": 0.99,
                "checkpoint_every": 80,
                "log_every": 20,
            },
            "generate": {"plan": "proportional", "total_images": 384, "steps": 20},
        },
        "evaluation": {
            "metrics": {"bootstrap": 100, "kid_subsets": 50, "min_stratum": 16},
            "classifier": {"max_steps": 400},
        },
    },
)
