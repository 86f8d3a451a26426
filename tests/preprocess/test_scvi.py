"""scVI trains to scvi-tools' own epoch rule with early stopping, and says what happened."""

from __future__ import annotations

import numpy as np
import pytest

from hescape.config import ExpressionPreprocess
from hescape.preprocess import apply_expression_variant

pytest.importorskip("scvi")


def _rule(n_cells: int) -> int:
    """scvi-tools' get_max_epochs_heuristic, written out."""
    return max(min(round(20000 / n_cells * 400), 400), 1)


def test_default_is_scvi_tools_rule_with_early_stopping():
    cfg = ExpressionPreprocess(method="scvi")
    assert cfg.scvi.max_epochs is None and cfg.scvi.early_stopping
    assert cfg.scvi.mode == "inductive"


def test_early_stopping_records_epochs_and_convergence(toy):
    """Patience 1 on a tiny set: the held-out ELBO stops training long before the cap."""
    mask = toy.obs["donor"].to_numpy() != "d2"
    cfg = ExpressionPreprocess(method="scvi", scvi={"early_stopping_patience": 1, "n_hidden": 16})
    out = apply_expression_variant(toy, cfg, batch_key="donor", train_mask=mask, progress=False)
    info = out.info
    assert info["max_epochs"] == _rule(int(mask.sum()))  # the rule on the reference cells
    assert info["query_max_epochs"] == _rule(int((~mask).sum()))
    assert info["early_stopped"] and not info["stopped_on_cap"]
    assert 1 <= info["epochs_run"] < info["max_epochs"]
    assert info["converged"] is (not info["query_stopped_on_cap"])
    assert np.isfinite(info["elbo_validation"])


def test_a_run_that_hits_its_cap_is_flagged(toy):
    mask = toy.obs["donor"].to_numpy() != "d2"
    cfg = ExpressionPreprocess(method="scvi", scvi={"max_epochs": 3, "n_hidden": 16})
    out = apply_expression_variant(toy, cfg, batch_key="donor", train_mask=mask, progress=False)
    assert out.info["epochs_run"] == 3 and out.info["max_epochs"] == 3
    assert out.info["stopped_on_cap"] and not out.info["early_stopped"]
    assert out.info["converged"] is False
