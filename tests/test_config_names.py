"""Names in a config are checked against the registries (no Literal repeating them), and
selection metrics are validation metrics, wherever a config is validated."""

from __future__ import annotations

import pytest

from hescape.config import ConfigError, StudyConfig, validate_config
from hescape.losses.spec import LOSSES
from hescape.models.spec import PROJECTIONS


@pytest.mark.parametrize(("key", "registry"), [("loss.name", LOSSES),
                                               ("model.projection", PROJECTIONS)])
def test_registry_names_are_the_valid_values(key, registry):
    section, field = key.split(".")
    for name in registry.names():
        cfg = StudyConfig.model_validate({section: {field: name}})
        assert getattr(getattr(cfg, section), field) == name
    with pytest.raises(ConfigError, match=rf"{key}: .*unknown .* 'nope'.*Known: "):
        validate_config({section: {field: "nope"}})


def test_a_registered_name_becomes_valid_without_touching_config():
    """The config reads the registry at validation time: registering a loss is enough."""
    spec = LOSSES.get("clip")
    with pytest.raises(ValueError, match="unknown loss 'clip2'"):
        StudyConfig.model_validate({"loss": {"name": "clip2"}})
    with LOSSES.temporarily(spec, name="clip2"):
        assert StudyConfig.model_validate({"loss": {"name": "clip2"}}).loss.name == "clip2"
    assert "clip2" not in LOSSES


def test_swept_encoder_names_are_checked_at_load():
    sweep = {"params": {"model.gene.name": {"type": "choice", "values": ["mlp", "mpl"]},
                        "model.image.name": {"type": "choice", "values": ["tiny_cnn", "unii"]}}}
    with pytest.raises(ConfigError) as err:
        validate_config({"sweep": sweep})
    text = str(err.value)
    assert "model.gene.name: unknown gene encoder 'mpl'. Did you mean 'mlp'" in text
    assert "model.image.name: unknown image encoder 'unii'. Did you mean 'uni'" in text


@pytest.mark.parametrize("metric", ["test/r5_img2gene", "r5_img2gene"])
def test_selection_metrics_are_validation_metrics(metric):
    with pytest.raises(ConfigError, match="train.best_metric: .*val/r5_img2gene"):
        validate_config({"train": {"best_metric": metric}})
    with pytest.raises(ConfigError, match="sweep.objectives.0.metric: .*val/r5_img2gene"):
        validate_config({"sweep": {"objectives": [{"metric": metric}]}})
    assert validate_config({"train": {"best_metric": "val/loss"}}).train.best_metric == "val/loss"
