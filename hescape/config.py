"""Study configuration as validated data.

Every section is a pydantic v2 model with ``extra="forbid"``, so a misspelt key fails at
load time with the key's dotted path. ``load_config(path, overrides)`` reads YAML with
``yaml.safe_load``, follows an optional ``base:`` include (relative to the file), applies
``--set a.b.c=value`` overrides and validates. Configs cross Ray process boundaries as
plain dicts (``cfg.model_dump()``) and are rebuilt with ``StudyConfig.model_validate``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from hescape.losses.spec import LOSSES
from hescape.models.presets import check_image_encoder_name
from hescape.models.spec import GENE_ENCODERS, PROJECTIONS, gene_input_problem
from hescape.preprocess.spec import expression_model


class ConfigError(ValueError):
    """A configuration problem, with the file and key it comes from."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def checked(problem: Callable[[str], str | None]) -> Any:
    """A ``str`` field type: ``problem(value)`` returns None, or the message of the
    validation error (cheap checks only: every validation of a config runs them)."""

    def check(value: str) -> str:
        message = problem(value)
        if message:
            raise ValueError(message)
        return value

    return Annotated[str, AfterValidator(check)]


def selection_metric_problem(metric: str) -> str | None:
    """None when ``metric`` may select models (a ``val/`` or ``train/`` metric), else why not.
    Test donors are read once, by each trial's final evaluation: never to select."""
    if metric.startswith("test/"):
        return (f"{metric!r} selects on the test donors; use the validation metric "
                f"'val/{metric[5:]}' (test metrics are only read by the final evaluation)")
    if not metric.startswith(("val/", "train/")):
        return (f"{metric!r} is not a metric reported during training; use a "
                "validation metric such as 'val/r5_img2gene'")
    return None


LossName = checked(LOSSES.problem)  # a name in hescape.losses.spec
ProjectionName = checked(PROJECTIONS.problem)  # a name in hescape.models.spec
SelectionMetric = checked(selection_metric_problem)  # val/ or train/, never test/


# --------------------------------------------------------------------------- data
class SimulateConfig(Strict):
    """Knobs of the built-in simulator (the embedded default dataset)."""

    n_donors: int = Field(6, ge=2)
    spots_per_donor: int = Field(400, ge=10)
    slides_per_donor: int = Field(1, ge=1)
    n_genes: int = Field(120, ge=10)
    n_states: int = Field(5, ge=2)
    patch_size: int = Field(32, ge=16, le=224)
    donor_effect: float = Field(1.0, ge=0.0, description="expression batch-effect strength")
    stain_effect: float = Field(1.0, ge=0.0, description="image batch-effect strength")
    mutation_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    seed: int = 0


class SplitConfig(Strict):
    """Donor-level split: fractions of donors (never of spots), or a file."""

    val_fraction: float = Field(0.17, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.33, gt=0.0, lt=1.0)
    seed: int = 0
    file: Optional[str] = None
    min_spots_per_donor: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave donors for training (< 1)")
        return self


class DataConfig(Strict):
    path: Optional[str] = Field(None, description="canonical dataset dir; null = simulate")
    simulate: SimulateConfig = SimulateConfig()
    split: SplitConfig = SplitConfig()
    batch_key: Literal["donor", "slide"] = "donor"
    label_key: Optional[str] = Field(
        "state", description="obs column of spot labels (label probes); null = unlabelled "
        "data: label probes are skipped with a note")
    mutation_key: Optional[str] = "mutation"
    fold: Optional[int] = Field(
        None, ge=0, description="donor fold (0..eval.donor_folds-1) replacing the dataset's "
        "split: test = that fold's donors, val = the next fold's, train = the rest; set per "
        "trial by a study with eval.donor_folds")


# --------------------------------------------------------------------- preprocess
# method, n_top_genes and one section per registered method (its own options model, e.g.
# ``scvi:``, ``harmony:``), generated from hescape.preprocess.spec (light: no torch/scanpy)
ExpressionPreprocess = expression_model()


class ImagePreprocess(Strict):
    stain_norm: Literal["none", "macenko"] = "none"
    stain_augment: float = Field(0.0, ge=0.0, le=0.5, description="HED jitter strength")


class PreprocessConfig(Strict):
    expression: ExpressionPreprocess = ExpressionPreprocess()
    image: ImagePreprocess = ImagePreprocess()


# -------------------------------------------------------------------------- model
class ImageEncoderConfig(Strict):
    name: str = "tiny_cnn"
    pretrained: bool = False
    weights: Optional[str] = Field(None, description="local weights file (safetensors/pt)")
    mode: Literal["frozen", "finetune", "last_n"] = "frozen"
    last_n: int = Field(1, ge=1)
    image_size: Optional[int] = Field(None, ge=16, le=1024)


class GeneEncoderConfig(Strict):
    name: str = "mlp"
    hidden_dim: int = Field(256, ge=8)
    n_layers: int = Field(2, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    n_heads: int = Field(4, ge=1)
    n_bins: int = Field(16, ge=2)
    max_genes: int = Field(2048, ge=1)
    checkpoint: Optional[str] = None
    frozen: bool = False


class AdversaryConfig(Strict):
    enabled: bool = False
    weight: float = Field(0.0, ge=0.0, description="lambda of the gradient-reversal loss")
    towers: list[Literal["image", "gene"]] = ["gene"]
    warmup_steps: int = Field(0, ge=0)
    hidden_dim: int = Field(64, ge=4)


class ModelConfig(Strict):
    image: ImageEncoderConfig = ImageEncoderConfig()
    gene: GeneEncoderConfig = GeneEncoderConfig()
    embed_dim: int = Field(128, ge=2)
    projection: ProjectionName = "mlp"
    adversary: AdversaryConfig = AdversaryConfig()


class LossConfig(Strict):
    name: LossName = "clip"
    init_temperature: float = Field(0.07, gt=0.01, le=1.0)
    learn_temperature: bool = True
    siglip_init_bias: float = -10.0


# -------------------------------------------------------------------------- train
class TrainConfig(Strict):
    batch_size: int = Field(64, ge=2)
    max_steps: int = Field(300, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    warmup_steps: int = Field(20, ge=0)
    grad_clip: Optional[float] = Field(1.0, gt=0.0)
    eval_every: int = Field(50, ge=1)
    log_every: Optional[int] = Field(
        None, ge=1, description="training steps per learning-curve point in MLflow (means of "
        "the training losses over the window; sent with the next evaluation's report); null "
        "= eval_every // 10, at least 1")
    early_stop_patience: Optional[int] = Field(None, ge=1, description="evaluations")
    best_metric: SelectionMetric = "val/r5_img2gene"
    best_mode: Literal["max", "min"] = "max"
    seed: int = 0
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    gpus_per_trial: Optional[float] = Field(
        None, gt=0.0, le=1.0, description="pack head-only trials on a GPU: the share of one "
        "GPU each trial reserves (0.25: four at once); needs use_gpu, one worker, a frozen "
        "image encoder and the feature cache; null = one whole GPU per worker")
    cpus_per_worker: float = Field(1.0, gt=0.0)
    in_process: bool = Field(
        True, description="1 worker, no GPU: run the loop in the trial process (no worker group)"
    )
    feature_cache: bool = True
    feature_dtype: Literal["float32", "float16"] = Field(
        "float32", description="dtype of the frozen-encoder feature cache; float16 halves its "
        "disk and page-cache size (measured: docs/benchmarks.md, panel scaling)")
    loader_workers: int = Field(0, ge=0)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on GPU, fp32 on CPU; bf16: autocast anywhere")
    channels_last: bool = True
    compile: bool = False
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(1, ge=0, description="worker-failure restarts (Ray FailureConfig)")
    stack_size: int = Field(
        1, ge=1, le=1024, description="head-only trials sharing a stack key train as one "
        "stacked model, up to this many per stack (each trial reserves 1/stack_size of a "
        "worker's resources); 1 = every trial trains alone")
    stack_wait_s: float = Field(3.0, ge=0.0, description="how long a stack waits for more "
                                "members after the first joins")

    @model_validator(mode="after")
    def _packing(self) -> TrainConfig:
        if self.gpus_per_trial is not None and not (self.use_gpu and self.num_workers == 1):
            raise ValueError(
                f"gpus_per_trial={self.gpus_per_trial:g} packs one-worker trials on a GPU: "
                f"set use_gpu: true and num_workers: 1 (have use_gpu={self.use_gpu}, "
                f"num_workers={self.num_workers}), or drop gpus_per_trial")
        return self


# --------------------------------------------------------------------------- eval
class EvalConfig(Strict):
    ks: list[int] = [1, 5, 10]
    block_size: int = Field(1024, ge=1)
    inbatch_size: int = Field(64, ge=2)
    inbatch_repeats: int = Field(20, ge=1)
    probe_top_genes: int = Field(50, ge=1)
    probe_pca: int = Field(256, ge=1)
    probe_alpha: float = Field(1.0, gt=0.0)
    probe_protocol: Literal["both", "hest", "per_donor"] = Field(
        "both", description="expression probe: HEST-Benchmark's recipe, the per-donor ridge, or both"
    )
    bleep_k: int = Field(10, ge=1)
    mixing_subsample: int = Field(5000, ge=100)
    mutation_min_donors_per_class: int = Field(10, ge=2)
    mutation_cv_folds: int = Field(5, ge=2)
    mutation_permutations: int = Field(200, ge=1, description="exact when fewer labelings; "
                                       ">= 39 for a finite 95% interval")
    mutation_bootstrap: Optional[int] = Field(
        None, description="obsolete (the interval now inverts the permutation test, no "
        "bootstrap): accepted so older configs load, ignored, warned and dropped")
    fixed_gallery: int = Field(1000, ge=2, description="held-out spots per retrieval gallery")
    fixed_gallery_draws: int = Field(5, ge=1)
    baselines: bool = True
    plots: bool = True
    umap_top_trials: int = Field(3, ge=0, description="a study draws the embedding UMAPs of "
                                 "its best trials (by the first objective) at report time")
    donor_folds: Optional[int] = Field(
        None, ge=3, description="donor cross-validation: the controlled comparisons (the "
        "confirm phase, or a grid) run every configuration on k donor folds, so every donor "
        "is a test donor once; null = the dataset's own split")
    seed: int = 0

    @field_validator("mutation_bootstrap")
    @classmethod
    def _obsolete_bootstrap(cls, value: Optional[int]) -> None:
        if value is not None:
            warnings.warn("eval.mutation_bootstrap is obsolete and ignored: the mutation "
                          "probe's interval inverts its permutation test (no bootstrap); "
                          "delete the key", UserWarning, stacklevel=2)  # fmt: skip
        return None


# -------------------------------------------------------------------------- sweep
class SweepParam(Strict):
    """One search dimension. ``when`` makes it conditional: ``{other.path: [values]}``."""

    type: Literal["choice", "uniform", "loguniform", "int"]
    values: Optional[list[Any]] = None
    low: Optional[float] = None
    high: Optional[float] = None
    when: Optional[dict[str, list[Any]]] = None

    @model_validator(mode="after")
    def _shape(self) -> SweepParam:
        if self.type == "choice":
            if not self.values:
                raise ValueError("a 'choice' parameter needs a non-empty 'values' list")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"a {self.type!r} parameter needs 'low' and 'high'")
            if self.low > self.high:
                raise ValueError(f"low ({self.low}) > high ({self.high}): empty range")
            if self.type == "loguniform" and self.low <= 0:
                raise ValueError("a 'loguniform' parameter needs low > 0")
        return self


class Objective(Strict):
    metric: SelectionMetric
    mode: Literal["max", "min"] = "max"


class ConfirmConfig(Strict):
    """The confirm phase: after the search, the best configuration re-run with each swept
    factor set to each level (the others held at the best), ``seeds`` seeds each."""

    enabled: Optional[bool] = Field(
        None, description="null = on for tpe/random (their comparisons are marginal), off for "
        "grid (a grid over seeds is already a controlled, replicated design)")
    seeds: int = Field(3, ge=2, description="seeds per confirmed configuration (>= 2: seed "
                       "variation must be measured before an effect gets a verdict)")
    levels: int = Field(3, ge=2, description="levels of a continuous factor: its range's ends "
                        "and the searched best value (more: evenly spaced, log for loguniform)")


class SweepConfig(Strict):
    searcher: Literal["tpe", "random", "grid"] = "tpe"
    scheduler: Literal["asha", "moasha", "none"] = Field(
        "asha", description="early stopping: asha (the first objective), moasha (Pareto "
        "ranking of every objective at each rung), none")
    num_samples: int = Field(8, ge=1, description="trials (tpe/random); ignored by grid")
    objectives: list[Objective] = [Objective(metric="val/r5_img2gene", mode="max")]
    params: dict[str, SweepParam] = {}
    seeds: int = Field(1, ge=1, description="repeat each configuration over n seeds")
    seed_top_k: int = Field(3, ge=1, description="tpe/random: re-run the top-k configs over seeds")
    max_concurrent: Optional[int] = Field(
        None, ge=1, description="trials at once (null: as many as fit on the cluster at the "
        "start); set above that, the extra trials wait for nodes that join mid-study")
    grace_period: int = Field(1, ge=1, description="ASHA/MO-ASHA: evaluations before a trial "
                              "may stop")
    confirm: ConfirmConfig = ConfirmConfig()

    @property
    def confirm_enabled(self) -> bool:
        """Whether the study runs a confirm phase (``confirm.enabled``, null = not grid)."""
        on = self.confirm.enabled
        return self.searcher != "grid" if on is None else bool(on)

    @model_validator(mode="after")
    def _space(self) -> SweepConfig:
        if not self.objectives:
            raise ValueError("sweep.objectives is empty: name at least one metric")
        if self.searcher == "grid":
            bad = [k for k, p in self.params.items() if p.type != "choice"]
            if bad:
                raise ValueError(f"grid searcher needs 'choice' parameters only; not: {bad}")
        if len(self.objectives) > 1 and self.scheduler == "asha":
            raise ValueError("ASHA needs a single objective; set sweep.scheduler: moasha "
                             "(stops on the Pareto ranking of all objectives) or none")
        return self


class MlflowConfig(Strict):
    tracking_uri: Optional[str] = Field(
        None, description="null = $MLFLOW_TRACKING_URI, else sqlite under storage_dir"
    )
    experiment: Optional[str] = Field(None, description="null = the study name")
    artifact_location: Optional[str] = Field(
        None, description="artifact root of new experiments (s3://..., a path): null = "
        "$HESCAPE_ARTIFACT_LOCATION, else <storage_dir>/mlartifacts (a server decides for http)"
    )


class StudyConfig(Strict):
    name: str = Field("study", pattern=r"^[A-Za-z0-9_.\-]+$")
    storage_dir: str = "runs"
    data: DataConfig = DataConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    mlflow: MlflowConfig = MlflowConfig()
    sweep: Optional[SweepConfig] = None

    @model_validator(mode="after")
    def _fold(self) -> StudyConfig:
        fold, k = self.data.fold, self.eval.donor_folds
        if fold is not None and (k is None or fold >= k):
            raise ValueError(f"data.fold={fold} needs eval.donor_folds > {fold} (k donor folds "
                             f"numbered 0..k-1); got eval.donor_folds={k}")
        return self


# ------------------------------------------------------------------------ loading
def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base:' include loop ({' -> '.join(map(str, seen))})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    parent = _read_yaml((path.parent / str(base)), seen + (path.resolve(),))
    return _deep_merge(parent, raw)


def apply_override(data: dict[str, Any], override: str) -> dict[str, Any]:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a nested dict."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value, e.g. train.lr=3e-4")
    key, _, text = override.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {override!r}: empty key")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {override!r}: value is not valid YAML: {exc}") from exc
    out = copy.deepcopy(data)
    node = out
    if len(parts) > 2 and parts[:2] == ["sweep", "params"]:
        # sweep.params keys are dotted config paths ("train.lr"): keep them whole.
        params = (out.get("sweep") or {}).get("params") or {}
        rest = ".".join(parts[2:])
        name = next((k for k in sorted(params, key=len, reverse=True)
                     if rest == k or rest.startswith(k + ".")), None)
        if name is None:
            spec_fields = set(SweepParam.model_fields)
            name = rest if parts[-1] not in spec_fields or len(parts) == 3 else \
                ".".join(parts[2:-1])
        parts = ["sweep", "params", name, *rest[len(name):].split(".")[1:]]
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node = nxt
    node[parts[-1]] = value
    return out


def _format_validation(source: str, exc: ValidationError) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "<top>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = ("unknown key (check the spelling; every valid key, with its default and "
                   "meaning: experiments/schema.yaml)")
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


def validate_config(data: dict[str, Any], source: str = "<config>") -> StudyConfig:
    """Validate a plain dict into a StudyConfig, with errors naming the dotted key."""
    try:
        cfg = StudyConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(source, exc)) from None
    check_names(cfg, source)
    return cfg


NAME_CHECKS = {"model.image.name": check_image_encoder_name,
               "model.gene.name": GENE_ENCODERS.problem}  # fmt: skip


def check_names(cfg: StudyConfig, source: str = "<config>") -> None:
    """Encoder names (and swept values) against the registries, then the gene encoder /
    preprocessing pair. Light registries: no torch, except an image name that is not a
    preset, which only timm's own list can check (``check_image_encoder_name``)."""
    problems: list[str] = []
    swept, data = (cfg.sweep.params if cfg.sweep is not None else {}), cfg.model_dump()
    for key, check in NAME_CHECKS.items():
        values = [get_path(data, key)]
        if key in swept and swept[key].values:
            values += [str(v) for v in swept[key].values]
        problems += [f"  - {key}: {msg}" for msg in map(check, values) if msg]
    if problems:
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(problems))
    if not any(k.startswith(("preprocess.expression.", "model.gene.")) for k in swept):
        # (swept pairs are checked per point by hescape.study.space: skipped in a grid)
        msg = gene_input_problem(cfg.model.gene, cfg.preprocess.expression.model_dump())
        if msg:
            raise ConfigError(f"{source}: invalid configuration\n  - model.gene.name: {msg}")


def load_config(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    """Read a study YAML (with ``base:`` include), apply overrides, validate."""
    path = Path(path)
    data = _read_yaml(path)
    for override in overrides or []:
        data = apply_override(data, override)
    return validate_config(data, source=str(path))


def get_path(data: dict[str, Any], dotted: str) -> Any:
    """Read ``a.b.c`` from a nested dict (KeyError names the missing part)."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"{dotted!r}: no key {part!r}")
        node = node[part]
    return node


def set_path(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """Return a copy of ``data`` with ``a.b.c`` set to ``value``."""
    out = copy.deepcopy(data)
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out
