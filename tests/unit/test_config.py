from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from meddiff.config import PRESETS, Config, config_to_yaml, load_config
from meddiff.errors import ConfigError


def test_defaults_are_full_size_and_frozen():
    cfg = load_config()
    assert cfg == Config()
    with pytest.raises(ValidationError):
        cfg.runtime.seed = 3  # type: ignore[misc]


def test_every_preset_validates():
    for name in PRESETS:
        assert isinstance(load_config(name), Config)


def test_tiny_preset_differs_from_full():
    tiny, full = load_config("tiny"), load_config("full")
    assert tiny.runtime.num_cpus == 2
    assert tiny.data.pcam.rows_per_block < full.data.pcam.rows_per_block


def test_override_parses_yaml_values():
    cfg = load_config(
        "tiny", overrides=["runtime.seed=7", "tracking.uri=null", "runtime.progress=false"]
    )
    assert cfg.runtime.seed == 7 and cfg.tracking.uri is None and cfg.runtime.progress is False


def test_misspelt_override_names_key_and_suggests():
    with pytest.raises(
        ConfigError,
        match=r"data\.pcam\.rows_per_blok: unknown key \(did you mean 'rows_per_block'\?\)",
    ):
        load_config(overrides=["data.pcam.rows_per_blok=3"])


def test_a_renamed_key_names_its_new_name():
    with pytest.raises(
        ConfigError,
        match=r"data\.wsi\.backend: unknown key \(renamed: did you mean 'reader'\?\)",
    ):
        load_config(overrides=["data.wsi.backend=auto"])


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("thor.train.steps", "max_steps"),
        ("thor.train.lr", "learning_rate"),
        ("thor.train.grad_clip", "max_grad_norm"),
        ("thor.train.register_as", "registered_name"),
        ("evaluation.classifier.steps", "max_steps"),
        ("evaluation.classifier.lr", "learning_rate"),
    ],
)
def test_the_training_loops_old_names_are_refused_with_the_shared_one(old, new):
    with pytest.raises(ConfigError, match=rf"{old}: unknown key \(renamed: did you mean '{new}'"):
        load_config(overrides=[f"{old}=1"])


def test_every_training_loop_has_one_name_per_shared_setting():
    """The shared settings exist under the same name in all three loops' sections, with each
    loop's own defaults (docs/training.md)."""
    cfg = load_config("tiny")
    loops = [cfg.thor.train, cfg.synthesis.train, cfg.evaluation.classifier]
    shared = ("num_workers", "use_gpu", "cpus_per_worker", "max_steps", "learning_rate",
              "max_grad_norm", "checkpoint_every", "strategy", "precision")  # fmt: skip
    for name in shared:
        assert all(name in type(t).model_fields for t in loops), name
    assert cfg.thor.train.max_steps == 2400 and cfg.thor.train.max_grad_norm == 1.0
    assert cfg.evaluation.classifier.max_steps == 60 and cfg.synthesis.train.max_steps == 60
    assert cfg.thor.train.registered_name and cfg.synthesis.train.registered_name
    assert "registered_name" not in type(cfg.evaluation.classifier).model_fields


def test_misspelt_yaml_key_names_file(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text("runtime:\n  sead: 3\n")
    with pytest.raises(
        ConfigError,
        match=r"file .*run\.yaml.*\n  runtime\.sead: unknown key \(did you mean 'seed'\?\)",
    ):
        load_config(path=path)


def test_bad_value_names_key_and_value():
    with pytest.raises(ConfigError, match=r"data\.pcam\.rows_per_block: .*integer.*'many'"):
        load_config(overrides=["data.pcam.rows_per_block=many"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("thor.schedule.beta_start=0.05", r"thor\.schedule: .*beta_start 0\.05 must be below"),
        ("thor.augment.scale=[1.1,0.9]", r"thor\.augment\.scale: .*0 < low <= high"),
        ("thor.eval.size_strata=[3,570,71]", r"thor\.eval\.size_strata: .*must be increasing"),
        ("thor.train.min_workers=3", r"thor\.train: .*min_workers=3 is more than num_workers=1"),
        ("thor.train.num_workers=3", r"thor\.train: .*batch_size=16 must be divisible"),
    ],
)
def test_inconsistent_values_are_refused(override: str, message: str):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_bad_override_syntax_and_unknown_preset():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(overrides=["runtime.seed"])
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load_config("huge")


def test_yaml_file_can_name_preset_and_layers_apply_in_order(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\nruntime:\n  seed: 11\n")
    cfg = load_config(path=path, overrides=["runtime.seed=12"])
    assert cfg.runtime.num_cpus == 2  # from the tiny preset named in the file
    assert cfg.runtime.seed == 12  # --set beats the file


def test_yaml_file_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(path=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("runtime: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path=bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(path=scalar)


def test_round_trip_through_dump_as_workers_do():
    cfg = load_config("tiny", overrides=["runtime.seed=5"])
    assert Config.model_validate(cfg.model_dump()) == cfg
    assert "seed: 5" in config_to_yaml(cfg)
