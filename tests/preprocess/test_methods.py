"""The test matrix every registered preprocessing method passes (parametrized over the registry).

A new method module is covered here without editing this file: declared output kind,
declared protocol (inductive: training rows never depend on held-out rows), declared
batch needs, options nested under its name, the cache key derived from its options.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from hescape.config import ConfigError, ExpressionPreprocess, validate_config
from hescape.preprocess import apply_expression_variant, variant_key
from hescape.preprocess.spec import KINDS, MethodSpec, get_method, method_names

# fast settings for slow methods (options only: the checks are the same)
QUICK = {"scvi": {"max_epochs": 2, "early_stopping": False, "n_hidden": 16},
         "drvi": {"max_epochs": 2, "early_stopping": False, "n_hidden": 16, "n_latent": 8}}


def _cfg(method: str, **options) -> ExpressionPreprocess:
    section = {**QUICK.get(method, {}), **options}
    data = {"method": method}
    if get_method(method).options is not None:
        data[method] = section
    return ExpressionPreprocess.model_validate(data)


def _mask(adata) -> np.ndarray:
    return adata.obs["donor"].to_numpy() != "d2"


@pytest.mark.parametrize("method", method_names())
def test_output_is_what_the_spec_declares(toy, method):
    spec, cfg = get_method(method), _cfg(method)
    out = apply_expression_variant(toy, cfg, batch_key="donor", train_mask=_mask(toy),
                                   progress=False)
    assert out.kind == spec.kind(getattr(cfg, method, None)) and out.kind in KINDS
    assert out.X.shape[0] == toy.n_obs and np.isfinite(out.X).all()
    assert len(out.feature_names) == out.X.shape[1]
    if out.kind == "expression":
        assert (out.X >= 0).all() and set(out.feature_names) <= set(toy.var_names)
    assert out.info["protocol"] in spec.protocols and out.method == method


@pytest.mark.parametrize("method", method_names())
def test_default_protocol_is_inductive(method):
    """Inductive wherever the method allows (issue: one held-out protocol per comparison)."""
    spec = get_method(method)
    assert spec.protocol(spec.default_options()) == "inductive"


@pytest.mark.parametrize("method", method_names())
def test_inductive_training_rows_never_depend_on_heldout_rows(toy, method):
    cfg = _cfg(method)
    mask = _mask(toy)
    a = apply_expression_variant(toy, cfg, batch_key="donor", train_mask=mask, progress=False)
    other = toy.copy()
    other.X[~mask] = np.random.default_rng(1).poisson(9.0, size=(int((~mask).sum()), 12))
    b = apply_expression_variant(other, cfg, batch_key="donor", train_mask=mask, progress=False)
    np.testing.assert_allclose(a.X[mask], b.X[mask], atol=1e-5)
    assert not a.saw_heldout


@pytest.mark.parametrize("method", [m for m in method_names()
                                    if "transductive" in get_method(m).protocols])
def test_transductive_mode_is_flagged(toy, method):
    out = apply_expression_variant(toy, _cfg(method, mode="transductive"), batch_key="donor",
                                   train_mask=_mask(toy), progress=False)
    assert out.saw_heldout and out.info["protocol"] == "transductive"


@pytest.mark.parametrize("method", method_names())
def test_batch_needs_are_checked_before_fitting(toy, method):
    """A batch-correcting method refuses a single training batch; others run with one."""
    mask = toy.obs["donor"].to_numpy() == "d0"
    if get_method(method).needs_batches:
        with pytest.raises(ValueError, match="training rows hold 1 batch"):
            apply_expression_variant(toy, _cfg(method), batch_key="donor", train_mask=mask)
    else:
        out = apply_expression_variant(toy, _cfg(method), batch_key="donor", train_mask=mask,
                                       progress=False)
        assert out.X.shape[0] == toy.n_obs


@pytest.mark.parametrize("method", [m for m in method_names() if get_method(m).options])
def test_options_nested_under_the_method_and_strict(method):
    cfg = validate_config({"preprocess": {"expression": {"method": method, method: {}}}})
    assert cfg.preprocess.expression.method == method
    with pytest.raises(ConfigError, match=f"preprocess.expression.{method}.no_such_option"):
        validate_config({"preprocess": {"expression": {method: {"no_such_option": 1}}}})


@pytest.mark.parametrize("method", [m for m in method_names() if get_method(m).options])
def test_cache_key_follows_every_option_of_the_method(method):
    """Changing any option of the method changes its key; other methods' options do not."""
    split = {"train": ["a"], "val": ["b"], "test": ["c"]}
    base = _cfg(method)
    key = variant_key("fp", base, split, batch_key="donor")
    opts = getattr(base, method)
    for name, value in opts.model_dump().items():
        changed = _other_value(type(opts).model_fields[name], value)
        cfg = base.model_copy(update={method: opts.model_copy(update={name: changed})})
        assert variant_key("fp", cfg, split, batch_key="donor") != key, name
    others = [m for m in method_names() if m != method and get_method(m).options]
    for other in others:
        cfg = ExpressionPreprocess.model_validate({**base.model_dump(), other: {}})
        assert variant_key("fp", cfg, split, batch_key="donor") == key


def _other_value(field, value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1 if isinstance(value, int) else value / 2
    if value is None:
        return 7
    choices = field.annotation.__args__
    return next(c for c in choices if c != value)


@pytest.mark.parametrize("key", ["theta", "sigma", "harmony_mode", "n_pcs"])
def test_old_flat_keys_name_their_new_home(key):
    with pytest.raises(ConfigError) as err:
        validate_config({"preprocess": {"expression": {"method": "harmony", key: 1}}})
    new = "mode" if key == "harmony_mode" else key
    assert f"preprocess.expression.harmony.{new}" in str(err.value)


def test_spec_refuses_a_method_without_inductive_default():
    from typing import Literal

    from hescape.preprocess.spec import MethodOptions

    class Opts(MethodOptions):
        mode: Literal["inductive", "transductive"] = "transductive"

    with pytest.raises(ValueError, match="default to 'inductive'"):
        MethodSpec(name="x", summary="", run=print, heldout="", options=Opts,
                   protocols=("inductive", "transductive"))
    with pytest.raises(TypeError):
        MethodSpec("x", "", print, "")  # keyword-only fields


def test_config_validation_imports_no_heavy_library():
    code = ("import sys; from hescape.preprocess.spec import expression_model; "
            "m = expression_model(); m.model_validate({'method': 'scvi', 'scvi': {}}); "
            "print([k for k in ('torch', 'scanpy', 'scvi', 'sklearn', 'harmonypy', 'anndata') "
            "if k in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
