"""Study-constant evaluation: the baseline feature sets, evaluated once per study.

``baseline_frozen`` (the image encoder before contrastive training) and ``baseline_pca`` (PCA
of expression) give the same figures in every trial of a study: same dataset, same held-out
donors, same features. They are evaluated here once (``baseline_pca`` once per split;
``baseline_frozen`` once per image-encoder setting the sweep can produce), with exactly the
probes and rows a trial's evaluation uses (``evaluate.checkpoint_eval.evaluate_baselines``),
instead of in every trial. Results live in ``<study>/baselines/<key>/`` (metrics.json,
per_donor.csv, probe notes, plots; a directory appears only once complete, so a killed
study resumes and computes only what is missing) and on the parent MLflow run (metrics
``test/baseline_frozen/...`` for the base config's image encoder, ``test/baseline_pca/...``;
other image settings of a sweep ``test/baseline_<key>/...``; artifacts under ``baselines/``). Trials carry the key
of their frozen baseline in the tag ``hescape.baseline_key``; the report puts the baseline
figures beside every trial (``attach``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hescape import atomic
from hescape.config import StudyConfig

BASELINE_DIR = "baselines"
TAG = "hescape.baseline_key"
PCA_TAG = "hescape.baseline_pca_key"


def _digest(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _common(cfg: StudyConfig, split: dict[str, list[str]]) -> dict[str, Any]:
    return {"eval": cfg.eval.model_dump(mode="json"),
            "keys": [cfg.data.batch_key, cfg.data.label_key, cfg.data.mutation_key],
            "split": {k: sorted(map(str, v)) for k, v in sorted(split.items())}}


def frozen_key(cfg: StudyConfig, split: dict[str, list[str]]) -> str:
    """Key of ``cfg``'s frozen-encoder baseline: the image section, stain normalisation,
    evaluation settings, obs keys and split (not the trial's seed, loss, gene tower, ...)."""
    spec = {"image": cfg.model.image.model_dump(mode="json"),
            "stain_norm": cfg.preprocess.image.stain_norm, **_common(cfg, split)}
    return f"frozen-{cfg.model.image.name}-{_digest(spec)}"


def pca_key(cfg: StudyConfig, split: dict[str, list[str]]) -> str:
    """Key of the expression-PCA baseline (independent of the image side)."""
    return f"pca-{_digest(_common(cfg, split))}"


def read(study_dir: Path) -> dict[str, dict[str, Any]]:
    """``{key: {"metrics": ..., "kind": "frozen"|"pca", "label": ...}}`` of every completed
    baseline evaluation of a study."""
    out: dict[str, dict[str, Any]] = {}
    root = Path(study_dir) / BASELINE_DIR
    for info in sorted(root.glob("*/baseline.json")):
        try:
            out[info.parent.name] = json.loads(info.read_text())
        except (OSError, ValueError):
            continue
    return out


def evaluate_study_baselines(
    configs: Sequence[StudyConfig], paired: Any, study_dir: Path, *,
    features: dict[str, str] | None = None, progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Evaluate the baselines of ``configs`` (one per distinct image setting; the first
    decides evaluation and PCA) on ``paired`` once; completed keys are skipped. ``features``:
    ``feature_lookup_key`` -> the study's precomputed cache path. Returns ``read(study_dir)``."""
    configs = [c for c in configs if c.eval.baselines]
    if not configs:
        return read(study_dir)
    from hescape.evaluate.checkpoint_eval import expression_views
    from hescape.train.features import feature_lookup_key

    done = read(study_dir)
    todo: list[tuple[str, StudyConfig, str]] = []
    if pca_key(configs[0], paired.split) not in done:
        todo.append((pca_key(configs[0], paired.split), configs[0], "pca"))
    for cfg in configs:
        key = frozen_key(cfg, paired.split)
        if key not in done and all(k != key for k, _, _ in todo):
            todo.append((key, cfg, "frozen"))
    if not todo:
        return done
    expression = expression_views(paired)  # once for every evaluation below
    for key, cfg, kind in todo:
        print(f"[study] baseline {kind} ({cfg.model.image.name if kind == 'frozen' else 'PCA'}):"
              " evaluating once for every trial", flush=True)
        target = Path(study_dir) / BASELINE_DIR / key
        with atomic.atomic_dir(target) as tmp:
            path = (features or {}).get(feature_lookup_key(cfg)) if kind == "frozen" else None
            metrics, _ = _evaluate(cfg, paired, tmp, kind=kind, features=path,
                                   expression=expression, progress=progress)
            atomic.write_json(tmp / "baseline.json", {
                "kind": kind, "label": cfg.model.image.name if kind == "frozen" else "pca",
                "image": cfg.model.image.model_dump(mode="json") if kind == "frozen" else None,
                "metrics": metrics}, indent=1, default=str)
    return read(study_dir)


def _evaluate(cfg: StudyConfig, paired: Any, out_dir: Path, *, kind: str, features: str | None,
              expression: Any, progress: bool) -> tuple[dict[str, float], dict[str, Path]]:
    """On this process, or as a 1-GPU Ray task when trials train on GPUs and the frozen
    features are not cached (encoding is the GPU's work; the driver may sit on a CPU node)."""
    from hescape.evaluate.checkpoint_eval import evaluate_baselines

    kw = dict(frozen=kind == "frozen", pca=kind == "pca", features=features)
    if kind == "frozen" and features is None and cfg.train.use_gpu:
        import ray

        task = ray.remote(num_gpus=1, num_cpus=1)(_evaluate_on_gpu)
        return ray.get(task.remote(cfg.model_dump(), str(paired.path), str(out_dir), kw))
    return evaluate_baselines(cfg, paired, out_dir=out_dir, expression=expression,
                              progress=progress, **kw)


def _evaluate_on_gpu(cfg_dict: dict[str, Any], data_path: str, out_dir: str,
                     kw: dict[str, Any]) -> tuple[dict[str, float], dict[str, Path]]:
    from hescape.data import load_paired
    from hescape.evaluate.checkpoint_eval import evaluate_baselines

    return evaluate_baselines(StudyConfig.model_validate(cfg_dict), load_paired(data_path),
                              out_dir=out_dir, device="cuda", progress=False, **kw)


def parent_metrics(key: str, info: dict[str, Any], primary: str | None) -> dict[str, float]:
    """One baseline's metrics as the parent run shows them: ``test/baseline_pca/...``,
    ``test/baseline_frozen/...`` for the base config's image encoder (``primary``) and
    ``test/baseline_frozen_<key>/...`` for other image settings a sweep produces."""
    out: dict[str, float] = {}
    for name, value in info.get("metrics", {}).items():
        if not math.isfinite(float(value)):
            continue  # MLflow shows no NaN; the reason is in the baseline's probe_notes.json
        if info.get("kind") == "frozen" and key != primary:
            name = name.replace("/baseline_frozen/", f"/baseline_{key}/")
        out[name] = float(value)
    return out


LOGGED = "logged.json"


def log_to_parent(ref: Any, study_dir: Path, baselines: dict[str, dict[str, Any]], *,
                  primary: str | None) -> None:
    """Metrics and artifacts of each baseline not yet on the parent run (a marker file lists
    those logged, so a resumed study logs each once)."""
    from hescape.study import lineage
    from hescape.tracking import log_metrics_retry, sanitize_key

    root = Path(study_dir) / BASELINE_DIR
    marker = root / LOGGED
    try:
        logged = set(json.loads(marker.read_text()))
    except (OSError, ValueError):
        logged = set()
    client = lineage.MlflowClient(ref.tracking_uri)
    for key, info in baselines.items():
        if key in logged:
            continue
        metrics = {sanitize_key(k): v for k, v in parent_metrics(key, info, primary).items()}
        log_metrics_retry(client, ref.parent_run_id, metrics, step=0)
        files = {p.stem: p for p in sorted((root / key).iterdir()) if p.is_file()}
        lineage.log_artifacts(ref, ref.parent_run_id, files, subdir=f"{BASELINE_DIR}/{key}")
        logged.add(key)
        atomic.write_json(marker, sorted(logged))


def attach(rows: list[dict[str, Any]], baselines: dict[str, dict[str, Any]]) -> None:
    """Put the study's baseline figures into each trial row's metrics (in place): the ones
    its tags name (``hescape.baseline_pca_key``: PCA on the trial's split;
    ``hescape.baseline_key``: its frozen encoder on that split), else the study's only one. A trial that
    evaluated its own baselines (older studies) keeps them."""
    pca = {k: v for k, v in baselines.items() if v.get("kind") == "pca"}
    frozen = {k: v for k, v in baselines.items() if v.get("kind") == "frozen"}
    only_pca = next(iter(pca.values())) if len(pca) == 1 else None
    only = next(iter(frozen.values())) if len(frozen) == 1 else None
    for row in rows:
        extra: dict[str, float] = {}
        for info in (pca.get(row.get("baseline_pca_key") or "") or only_pca,
                     frozen.get(row.get("baseline_key") or "") or only):
            if info is not None:
                extra.update(info["metrics"])
        for name, value in extra.items():  # finite only, as trials log theirs to MLflow
            if math.isfinite(float(value)):
                row["metrics"].setdefault(name, float(value))
