"""Study configurations used by the benchmarks (validated like any study YAML)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hescape.config import StudyConfig, load_config, set_path

BASE_YAML = Path(__file__).resolve().parents[1] / "experiments" / "base.yaml"


def bench_config(workdir: Path, updates: dict[str, Any] | None = None) -> StudyConfig:
    """``experiments/base.yaml`` with ``storage_dir`` under ``workdir`` plus dotted ``updates``."""
    cfg = load_config(BASE_YAML)
    data = cfg.model_dump(mode="json")
    data = set_path(data, "storage_dir", str(Path(workdir) / "runs"))
    data = set_path(data, "name", "bench")
    for key, value in (updates or {}).items():
        data = set_path(data, key, value)
    return StudyConfig.model_validate(data)


def small_data(smoke: bool) -> dict[str, Any]:
    """Simulated data: 4 donors (2 train / 1 val / 1 test); smoke: 60 spots each, 16 px."""
    spots, patch = (60, 16) if smoke else (300, 32)
    return {"data.simulate.n_donors": 4, "data.simulate.spots_per_donor": spots,
            "data.simulate.patch_size": patch, "data.simulate.n_genes": 60 if smoke else 200,
            "data.split.val_fraction": 0.25, "data.split.test_fraction": 0.25}


def quiet_eval() -> dict[str, Any]:
    """Cheap in-training validation (the benchmarks time training, not the probes)."""
    return {"eval.inbatch_repeats": 1, "eval.mixing_subsample": 200, "eval.plots": False,
            "eval.baselines": False}
