"""MO-ASHA (issue 21): every promotion decision on recorded learning curves checked against an
independently written non-dominated sort; one objective makes Ray's ASHA's decisions; the
scheduler's state survives a restored phase; the study wiring (rungs, objectives, config)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.tune")

CURVES = Path(__file__).resolve().parents[1] / "data" / "moasha_curves.json"
EVERY = 20


def _curves() -> dict:
    """Validation curves recorded by real training runs (``benchmarks/moasha.py`` pool):
    per configuration, the objectives at every evaluation step."""
    return json.loads(CURVES.read_text())


def _trial(trial_id: str):
    from ray.tune.experiment import Trial

    return Trial("run_trial", config={}, trial_id=trial_id, stub=True)


def _events(n_trials: int, n_evals: int, seed: int) -> list[tuple[float, int, int]]:
    """An asynchronous arrival order: trial i starts at a random time and reports its k-th
    evaluation after k random-length segments; (time, trial, evaluation index), sorted."""
    rng = np.random.default_rng(seed)
    start = np.sort(rng.uniform(0, n_trials / 2, n_trials))
    seg = rng.uniform(0.5, 2.0, n_trials)
    return sorted((start[i] + (k + 1) * seg[i], i, k) for i in range(n_trials)
                  for k in range(n_evals))


def _replay(scheduler, values: np.ndarray, metrics: list[str], seed: int, *, other=None):
    """Feed values[trial, eval, objective] in async order; returns the decisions (and checks
    ``other`` decides the same at every report). Stopped trials send nothing more."""
    from ray.tune.schedulers import TrialScheduler

    n_trials, n_evals, _ = values.shape
    trials = [_trial(f"t{i:02d}") for i in range(n_trials)]
    for t in trials:
        scheduler.on_trial_add(None, t)
        if other is not None:
            other.on_trial_add(None, t)
    stopped, out = set(), []
    for _, i, k in _events(n_trials, n_evals, seed):
        if i in stopped:
            continue
        result = {"step": (k + 1) * EVERY, **dict(zip(metrics, map(float, values[i, k])))}
        action = scheduler.on_trial_result(None, trials[i], result)
        if other is not None:
            assert other.on_trial_result(None, trials[i], result) == action, (seed, i, k)
        out.append((trials[i].trial_id, k, action))
        if action == TrialScheduler.STOP:
            stopped.add(i)
        elif k == n_evals - 1:
            scheduler.on_trial_complete(None, trials[i], result)
            if other is not None:
                other.on_trial_complete(None, trials[i], result)
    return out


def _moasha(metrics, modes, n_evals, **kw):
    from hescape.study.moasha import MOASHA

    return MOASHA(metrics=metrics, modes=modes, time_attr="step", max_t=n_evals * EVERY + 1,
                  grace_period=EVERY, reduction_factor=2, **kw)


# ------------------------------------------------- the reference, written independently
def _better_or_equal(a, b, modes):
    return all((x >= y) if m == "max" else (x <= y) for x, y, m in zip(a, b, modes))


def _ref_dominates(a, b, modes):
    return _better_or_equal(a, b, modes) and tuple(a) != tuple(b)


def _ref_fronts(points, modes):
    """Front = length of the longest chain of dominating points above it (0: none)."""
    n = len(points)
    memo: dict[int, int] = {}

    def depth(i):
        if i not in memo:
            above = [j for j in range(n) if _ref_dominates(points[j], points[i], modes)]
            memo[i] = 0 if not above else 1 + max(depth(j) for j in above)
        return memo[i]

    return [depth(i) for i in range(n)]


def _ref_crowding(points, modes):
    """NSGA-II crowding distance of one front, by sorting each objective (larger = sparser)."""
    n, k = len(points), len(modes)
    if n <= 2:
        return [float("inf")] * n
    dist = [0.0] * n
    for j in range(k):
        sign = 1.0 if modes[j] == "max" else -1.0
        col = [sign * p[j] for p in points]
        idx = sorted(range(n), key=lambda i: col[i])
        dist[idx[0]] = dist[idx[-1]] = float("inf")
        span = col[idx[-1]] - col[idx[0]]
        for pos in range(1, n - 1):
            if span > 0:
                dist[idx[pos]] += (col[idx[pos + 1]] - col[idx[pos - 1]]) / span
    return dist


def _ref_decision(rung: list[tuple[str, list[float]]], new: tuple[str, list[float]], modes,
                  eta=2.0):
    """The documented rule: rank the rung's trials and the new one (front, crowding
    distance, objectives, arrival), score by place, continue at >= ASHA's quantile."""
    members = [*rung, new]
    pts = [v for _, v in members]
    fronts = _ref_fronts(pts, modes)
    crowd = [0.0] * len(pts)
    for f in set(fronts):
        idx = [i for i in range(len(pts)) if fronts[i] == f]
        for i, c in zip(idx, _ref_crowding([pts[i] for i in idx], modes)):
            crowd[i] = c
    sign = [1.0 if m == "max" else -1.0 for m in modes]
    order = sorted(range(len(pts)), key=lambda i: (fronts[i], -crowd[i],
                                                   *[-s * x for s, x in zip(sign, pts[i])], i))
    place = order.index(len(pts) - 1)
    score = len(pts) - 1 - place
    others = [len(pts) - 1 - order.index(i) for i in range(len(pts) - 1)]
    stop = bool(others) and score < np.percentile(others, (1 - 1 / eta) * 100)
    dominated_by = [members[i][0] for i in range(len(pts) - 1)
                    if _ref_dominates(pts[i], pts[-1], modes)]
    return {"decision": "stopped" if stop else "promoted", "front": fronts[-1],
            "place": place + 1, "dominated_by": dominated_by}


def _check_against_reference(sched, modes):
    """Every logged decision equals the reference recomputed from the rung's members."""
    seen: dict[float, list[tuple[str, list[float]]]] = {}
    for d in sched.decisions:
        rung = seen.setdefault(d["rung"], [])
        assert [t for t, _ in rung] == d["rung_trials"]
        want = _ref_decision(rung, (d["trial_id"], list(d["values"].values())), modes)
        got = {k: d[k] for k in want}
        assert got == want, (d["rung"], d["trial_id"])
        rung.append((d["trial_id"], list(d["values"].values())))
    return sched.decisions


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("objectives", [
    (("val/r5_img2gene", "max"), ("val/gene/ilisi", "max")),
    (("val/r5_img2gene", "max"), ("val/gene/ilisi", "max"), ("val/img/ridge_donor_cv_pearson", "max")),
    (("val/r5_img2gene", "max"), ("val/loss", "min")),
])
def test_every_promotion_matches_an_independent_nondominated_sort(objectives):
    data = _curves()
    metrics, modes = [m for m, _ in objectives], [m for _, m in objectives]
    values = np.array([[[c[m][k] for m in metrics] for k in range(len(c["step"]))]
                       for c in data["curves"]])
    n_decisions = stopped = 0
    for seed in range(6):
        order = np.random.default_rng(seed).permutation(len(values))[:24]
        sched = _moasha(metrics, modes, values.shape[1])
        _replay(sched, values[order], metrics, seed)
        decisions = _check_against_reference(sched, modes)
        n_decisions += len(decisions)
        stopped += sum(d["decision"] == "stopped" for d in decisions)
        for d in decisions:  # a dominated trial is never on the first front, and vice versa
            assert (d["front"] == 0) == (not d["dominated_by"])
    assert n_decisions > 100 and 0.2 < stopped / n_decisions < 0.8


def test_rule_on_a_hand_worked_rung():
    from ray.tune.schedulers import TrialScheduler

    sched = _moasha(["a", "b"], ["max", "max"], 4)
    go, stop = TrialScheduler.CONTINUE, TrialScheduler.STOP
    trials = {n: _trial(n) for n in "ABCDE"}
    steps = [("A", (0.5, 0.5), go),   # empty rung: promoted
             ("B", (0.4, 0.4), stop),  # dominated by A: 2nd of 2, below the median of {1}
             ("C", (0.9, 0.1), go),   # front 0 with A (both extremes), B behind: 2nd of 3
             ("D", (0.6, 0.45), stop),  # front 0, but the middle of 4 non-extreme points
             ("E", (0.3, 0.3), stop)]  # dominated by A, B, D
    for name, (a, b), want in steps:
        assert sched.on_trial_result(None, trials[name], {"step": EVERY, "a": a, "b": b}) == want, name
    log = {d["trial_id"]: d for d in sched.decisions}
    assert log["B"]["dominated_by"] == ["A"] and log["E"]["dominated_by"] == ["A", "B", "D"]
    assert log["D"]["front"] == 0 and log["D"]["dominated_by"] == [] and log["D"]["place"] == 3
    assert log["C"]["place"] == 1  # an extreme (infinite crowding), better on the first objective


@pytest.mark.parametrize("mode", ["max", "min"])
def test_one_objective_makes_ashas_decisions(mode):
    from ray.tune.schedulers import ASHAScheduler

    data = _curves()
    values = np.array([[[v] for v in c["val/r5_img2gene"]] for c in data["curves"]])
    rng = np.random.default_rng(7)
    for seed in range(8):
        order = rng.permutation(len(values))[: int(rng.integers(8, len(values) + 1))]
        curves = values[order]
        if seed % 2:  # coarser values: ties at the cutoff
            curves = np.round(curves, 2)
        n_evals = curves.shape[1]
        ours = _moasha(["val/r5_img2gene"], [mode], n_evals)
        ray = ASHAScheduler(time_attr="step", metric="val/r5_img2gene", mode=mode,
                            max_t=n_evals * EVERY + 1, grace_period=EVERY, reduction_factor=2)
        out = _replay(ours, curves, ["val/r5_img2gene"], seed, other=ray)
        assert any(a == "STOP" for *_, a in out) and any(a == "CONTINUE" for *_, a in out)


def test_decisions_survive_a_restored_phase(tmp_path):
    from ray.tune.schedulers import TrialScheduler

    from hescape.study.durable import DurableScheduler
    from hescape.study.moasha import read_decisions

    log = tmp_path / "scheduler" / "search_moasha_decisions.json"

    def make():
        return DurableScheduler(_moasha(["a", "b"], ["max", "min"], 4, log_path=log),
                                tmp_path / "resume")

    before = make()
    t1, t2, t3 = _trial("t1"), _trial("t2"), _trial("t3")
    for t in (t1, t2):
        before.on_trial_add(None, t)
    assert before.on_trial_result(None, t1, {"step": EVERY, "a": 0.5, "b": 1.0}) == "CONTINUE"
    assert before.on_trial_result(None, t2, {"step": EVERY, "a": 0.4, "b": 2.0}) == "STOP"
    # the driver dies; Tune restores the phase with the scheduler it pickled at the start
    after = pickle.loads(pickle.dumps(make()))
    for t in (t1, t2, t3):
        after.on_trial_add(None, t)
    assert after.on_trial_result(None, t2, {"step": EVERY, "a": 0.4, "b": 2.0}) == TrialScheduler.STOP
    # t3 is ranked against t1 and t2 as it would have been without the interruption (a
    # fresh scheduler, an empty rung, would promote it)
    t3_result = {"step": EVERY, "a": 0.35, "b": 2.5}
    assert after.on_trial_result(None, t3, t3_result) == "STOP"
    fresh = _moasha(["a", "b"], ["max", "min"], 4)
    assert fresh.on_trial_result(None, t3, t3_result) == "CONTINUE"
    saved = read_decisions(log)
    assert [(d["trial_id"], d["decision"]) for d in saved["decisions"]] == [
        ("t1", "promoted"), ("t2", "stopped"), ("t3", "stopped")]
    assert saved["decisions"][-1]["dominated_by"] == ["t1", "t2"]
    assert saved["decisions"][-1]["rung_trials"] == ["t1", "t2"]


def test_study_wiring_uses_ashas_rungs_and_every_objective(tmp_path):
    from ray.tune.schedulers import ASHAScheduler

    from hescape.config import StudyConfig
    from hescape.study.moasha import MOASHA, decisions_path
    from hescape.study.tuner import _scheduler

    objectives = [{"metric": "val/r5_img2gene", "mode": "max"},
                  {"metric": "val/gene/ilisi", "mode": "max"}]
    cfg = StudyConfig.model_validate({
        "train": {"max_steps": 100, "eval_every": 10},
        "sweep": {"scheduler": "moasha", "grace_period": 2, "objectives": objectives}})
    durable = _scheduler(cfg, tmp_path / "state", "search", tmp_path)
    inner = durable.inner
    assert isinstance(inner, MOASHA)
    assert inner.metrics == ["val/r5_img2gene", "val/gene/ilisi"] and inner.modes == ["max", "max"]
    assert inner.log_path == str(decisions_path(tmp_path, "search"))
    one = StudyConfig.model_validate({"train": {"max_steps": 100, "eval_every": 10},
                                      "sweep": {"scheduler": "asha", "grace_period": 2}})
    asha = _scheduler(one, tmp_path / "state2", "search").inner
    assert isinstance(asha, ASHAScheduler)
    assert inner.milestones == sorted(m for m, _ in asha._brackets[0]._rungs) == [20, 40, 80]
    assert _scheduler(cfg, tmp_path / "s3", "seeds").inner.__class__.__name__ == "FIFOScheduler"


def test_config_accepts_moasha_with_several_objectives_and_points_asha_to_it():
    from pydantic import ValidationError

    from hescape.config import SweepConfig

    two = [{"metric": "val/r5_img2gene"}, {"metric": "val/gene/ilisi"}]
    assert SweepConfig.model_validate({"scheduler": "moasha", "objectives": two}).scheduler == "moasha"
    with pytest.raises(ValidationError, match="sweep.scheduler: moasha"):
        SweepConfig.model_validate({"scheduler": "asha", "objectives": two})
    with pytest.raises(ValidationError, match="test donors|selects on the test"):
        SweepConfig.model_validate({"scheduler": "moasha",
                                    "objectives": [{"metric": "test/gene/ilisi"}]})
