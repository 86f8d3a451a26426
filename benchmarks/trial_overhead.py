"""3. Trial overhead: one 1-worker trial through Ray Tune vs the same loop in this process.

In-process: ``hescape.train.fit`` with ``train.in_process`` (``LocalSession``). Through
Tune: a one-trial ``Tuner`` whose function trainable calls the same ``fit`` and forwards
reports to ``tune.report`` (the study driver's shape, minus MLflow), timed from
``Tuner.fit()`` to its return; ``ray.init`` is paid once per study and reported apart.
Also measured: a Tune trial that runs a 1-worker Ray Train ``TorchTrainer``
(``train.in_process: false``). Per-step time comes from two in-process runs of different
lengths; the 60 s figure is EXTRAPOLATED: (60 s + measured fixed overhead) / 60 s.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.common import Row, command, main_for
from benchmarks.raytools import ensure_ray
from benchmarks.studycfg import bench_config, quiet_eval, small_data

KEY = "overhead"
TRIAL_S = 60.0


def trial_config(workdir: Path, steps: int, smoke: bool, *, in_process: bool = True) -> Any:
    """A short trial: tiny CNN fine-tuned + MLP gene tower on small simulated data."""
    return bench_config(workdir, {
        **small_data(smoke), **quiet_eval(), "model.image.name": "tiny_cnn",
        "model.image.mode": "finetune", "train.max_steps": steps, "train.eval_every": steps,
        "train.warmup_steps": 1, "train.batch_size": 32, "train.in_process": in_process})


def in_process_s(workdir: Path, steps: int, smoke: bool, tag: str) -> float:
    """Wall seconds of ``fit`` in this process."""
    from hescape.train import fit

    cfg = trial_config(workdir, steps, smoke)
    t0 = time.perf_counter()
    fit(cfg, run_dir=workdir / "inproc" / tag, verbose=False)
    return time.perf_counter() - t0


def _trainable(config: dict[str, Any]) -> None:
    """Tune function trainable: the same ``fit``, reports forwarded to Tune."""
    from ray import tune

    from hescape.config import StudyConfig
    from hescape.train import fit

    cfg = StudyConfig.model_validate(config["cfg"])
    fit(cfg, run_dir=Path(config["run_dir"]), verbose=False,
        report_callback=lambda metrics, ckpt: tune.report(
            {k: v for k, v in metrics.items() if isinstance(v, float | int)}))


def tune_s(workdir: Path, steps: int, smoke: bool, *, in_process: bool, tag: str) -> float:
    """Wall seconds of a one-trial ``Tuner.fit()`` (Ray already running)."""
    from ray import tune

    cfg = trial_config(workdir, steps, smoke, in_process=in_process)
    tuner = tune.Tuner(
        tune.with_resources(_trainable, {"cpu": 1}),
        param_space={"cfg": cfg.model_dump(mode="json"), "run_dir": str(workdir / "tune" / tag)},
        tune_config=tune.TuneConfig(num_samples=1),
        run_config=tune.RunConfig(name=tag, storage_path=str(workdir / "ray"), verbose=0))
    t0 = time.perf_counter()
    grid = tuner.fit()
    seconds = time.perf_counter() - t0
    if grid.errors:
        raise RuntimeError(f"Tune trial failed: {grid.errors[0]}")
    return seconds


def run(smoke: bool, workdir: Path) -> list[Row]:
    """Fixed start-up seconds of a Tune trial and the extrapolated ratio for a 60 s trial."""
    from hescape.train.inputs import prepare_inputs

    short, long = (2, 6) if smoke else (20, 80)
    prepare_inputs(trial_config(workdir, short, smoke), progress=False)  # shared, untimed
    in_process_s(workdir, short, smoke, "warmup")  # first-call costs (imports) untimed
    t_short = in_process_s(workdir, short, smoke, "short")
    t_long = in_process_s(workdir, long, smoke, "long")
    per_step = max(t_long - t_short, 1e-9) / (long - short)
    ray_init_s = ensure_ray()
    t_tune = tune_s(workdir, long, smoke, in_process=True, tag="tune_inproc")
    # smoke: skip the TorchTrainer variant (the scaling benchmark runs TorchTrainer anyway)
    t_train = None if smoke else tune_s(workdir, long, smoke, in_process=False,
                                        tag="tune_torchtrainer")
    fixed = max(t_tune - t_long, 0.0)
    fixed_train = None if t_train is None else max(t_train - t_long, 0.0)
    ratio60 = (TRIAL_S + fixed) / TRIAL_S
    train_note = ("Tune + 1-worker TorchTrainer not run (smoke)" if fixed_train is None else
                  f"Tune + 1-worker TorchTrainer fixed {fixed_train:.1f} s "
                  f"({(TRIAL_S + fixed_train) / TRIAL_S:.2f}x)")
    return [Row(
        key=KEY, title="Trial overhead, 60 s trial (extrapolated)", unit="s",
        baseline="in-process loop", baseline_value=TRIAL_S,
        ours="same loop as a Tune trial", ours_value=TRIAL_S + fixed, ratio=ratio60,
        target="<= 1.2x slower", command=command(KEY, smoke),
        notes=(f"ratio = Tune/in-process time (lower is better); fixed Tune start-up "
               f"{fixed:.1f} s measured ({long}-step trial {t_tune:.1f} s vs {t_long:.1f} s); "
               f"{train_note}; ray.init {ray_init_s:.1f} s once per study; per step "
               f"{1000 * per_step:.0f} ms"),
        details={"steps_short": short, "steps_long": long, "in_process_short_s": t_short,
                 "in_process_long_s": t_long, "per_step_s": per_step, "tune_s": t_tune,
                 "tune_torchtrainer_s": t_train, "fixed_s": fixed,
                 "fixed_torchtrainer_s": fixed_train, "ray_init_s": ray_init_s},
    )]


if __name__ == "__main__":
    main_for(run)
