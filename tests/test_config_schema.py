"""experiments/schema.yaml is the full schema, generated from the config models: in sync,
complete (every model field), loadable, and where the unknown-key error sends users."""

from __future__ import annotations

from pathlib import Path

import yaml

from hescape.config import StudyConfig, validate_config
from hescape.config_schema import SCHEMA_PATH, schema_yaml
from hescape.tracking import flatten

ROOT = Path(__file__).resolve().parents[1]


def test_schema_file_is_in_sync_with_the_models():
    on_disk = (ROOT / SCHEMA_PATH).read_text()
    assert on_disk == schema_yaml(), (
        f"{SCHEMA_PATH} is out of date: run `python -m hescape.config_schema > {SCHEMA_PATH}`")


def test_schema_lists_every_key_and_loads_as_the_defaults():
    data = yaml.safe_load(schema_yaml())
    cfg = StudyConfig.model_validate(data)
    listed = set(flatten(data))
    every = set(flatten(StudyConfig(sweep=cfg.sweep).model_dump()))
    # keys the old base.yaml lacked are there (issue 24.7)
    assert {"train.feature_dtype", "train.gpus_per_trial"} <= listed
    assert every <= listed, sorted(every - listed)
    assert StudyConfig(sweep=cfg.sweep).model_dump() == cfg.model_dump()


def test_unknown_key_error_points_at_the_schema():
    import pytest

    from hescape.config import ConfigError

    with pytest.raises(ConfigError, match=r"train\.learnig_rate: unknown key.*experiments/schema\.yaml"):
        validate_config({"train": {"learnig_rate": 1}}, "x.yaml")
