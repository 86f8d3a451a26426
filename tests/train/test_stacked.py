"""Vectorised head-only trials (hescape.train.stacked): each member of a stack trains as an
unbatched ``fit`` of its config would.

Tolerance: metrics rel 1e-5 (abs 1e-6), weights and optimiser moments rtol 1e-5 / atol 1e-6.
On the CPU in float32 the engine reproduces every operation of the unbatched step bit for bit
(batched gemms per member, ATen's LayerNorm backward per member, per-member reductions of the
reported losses, dropout masks from per-member generators); the observed differences are 0.
The tolerance only leaves room for float rounding that another BLAS build or thread count
might introduce: a 1-ulp difference per step stays below ~1e-6 relative over these 20 steps
(measured on an earlier, not yet exact version: 2.4e-7 on the weights); a real divergence
(wrong data order, dropout mask, schedule or optimiser step) is orders of magnitude larger,
and retrieval ranks would flip.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path

import pytest
import torch

from hescape.train import fit
from hescape.train.checkpoint import load_checkpoint, load_model
from hescape.train.loop import TrainingError
from hescape.train.stack_key import (
    key_difference,
    plan_groups,
    stack_key,
    stack_problem,
)
from hescape.train.stacked import (
    STOP,
    Member,
    StackedTrainer,
    StopMember,
    fit_many,
    fit_stacked,
)
from tests.train.conftest import tiny_config

TIMING = {"train/steps_per_s", "sys/peak_rss_mib", "sys/peak_gpu_mib"}
RTOL, ATOL = 1e-5, 1e-6

# members of one stack: adversary on for all (its structure is shared), everything else per
# member: seed, lr, weight decay, clipping, temperature, adversary weight / warm-up, dropout
# rate, max_steps (ragged end) and eval_every
MEMBERS = {
    "a": {"seed": 0},
    "b": {"seed": 1, "lr": 1e-3, "weight_decay": 0.0, "grad_clip": None,
          "extra": {"model": {"adversary": {"weight": 0.5, "warmup_steps": 5}}}},
    "c": {"seed": 2, "max_steps": 15, "eval_every": 5, "warmup_steps": 2,
          "extra": {"loss": {"init_temperature": 0.1},
                    "model": {"adversary": {"weight": 1.0}, "gene": {"dropout": 0.0}}}},
}


def member_cfg(root: Path, data: Path, name: str, **more):
    spec = {**MEMBERS[name], **more}
    extra = spec.pop("extra", {})
    adversary = {"enabled": True, "weight": 0.2, **extra.get("model", {}).get("adversary", {})}
    model = {**extra.get("model", {}), "adversary": adversary}
    return tiny_config(root, data, max_steps=spec.pop("max_steps", 20),
                       eval_every=spec.pop("eval_every", 10),
                       extra={**extra, "model": model}, **spec)


@pytest.fixture(scope="module")
def refs(tmp_path_factory, tiny_data):
    """Each member trained alone by ``fit`` (the unbatched reference), and its config."""
    root = tmp_path_factory.mktemp("stacked")
    out = {}
    for name in MEMBERS:
        cfg = member_cfg(root / "runs", tiny_data, name)
        out[name] = (cfg, fit(cfg, run_dir=root / "ref" / name, verbose=False),
                     root / "ref" / name)
    return out


def same_metrics(got: dict, want: dict, where: str) -> None:
    assert set(got) == set(want), f"{where}: keys {set(got) ^ set(want)}"
    for key, value in want.items():
        if key in TIMING:
            continue
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(got[key]), f"{where} {key}"
            continue
        if key == "train_curve":  # the learning-curve points: same steps, same means
            assert [p[0] for p in got[key]] == [p[0] for p in value], f"{where} {key}"
            for (_, a), (step, b) in zip(got[key], value, strict=True):
                same_metrics(a, b, f"{where} {key}@{step}")
            continue
        assert got[key] == pytest.approx(value, rel=RTOL, abs=ATOL), f"{where} {key}"


def same_history(got: list[dict], want: list[dict], name: str) -> None:
    assert [h["step"] for h in got] == [h["step"] for h in want], name
    for g, w in zip(got, want, strict=True):
        same_metrics(g, w, f"{name} step {w['step']}")


def same_checkpoint(got: Path, want: Path) -> None:
    a = load_checkpoint(want)
    b = load_checkpoint(got)
    assert a.model_state.keys() == b.model_state.keys()
    for key in a.model_state:
        torch.testing.assert_close(b.model_state[key], a.model_state[key], rtol=RTOL,
                                   atol=ATOL, msg=key)
    # optim.pt: the loop's AdamW state dict, counters and RNG states
    oa, ob = a.train_state["optimizer"], b.train_state["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for idx, st in oa["state"].items():
        for name, value in st.items():
            torch.testing.assert_close(ob["state"][idx][name], value, rtol=RTOL, atol=ATOL)
    for key in ("step", "scheduler", "best", "bad_evals"):
        assert b.train_state[key] == pytest.approx(a.train_state[key]), key
    ra, rb = a.train_state["rng"], b.train_state["rng"]
    assert torch.equal(ra["torch"], rb["torch"])  # the dropout generator's state
    assert torch.equal(ra["numpy"]["keys"], rb["numpy"]["keys"])
    # (python's state is not compared: the first import of scikit-learn in a process draws
    # from it, so even two unbatched runs differ there; training never reads it)
    # config.json identical, meta.json identical up to timing figures
    assert a.config == b.config
    ma, mb = dict(a.meta), dict(b.meta)
    same_metrics(mb.pop("metrics"), ma.pop("metrics"), str(got))
    assert ma == mb


def run_members(root: Path, refs, names=tuple(MEMBERS), workers: int = 0, **kwargs):
    members = [Member(refs[n][0], root / n, name=n, **kwargs.get(n, {})) for n in names]
    return {o.name: o for o in fit_stacked(members, validation_workers=workers)}


def test_members_equal_their_unbatched_runs(tmp_path, refs):
    outcomes = run_members(tmp_path, refs)
    for name, (cfg, ref, ref_dir) in refs.items():
        got = outcomes[name]
        assert got.ok and got.status == "finished" and got.error is None
        same_history(got.result.history, ref.history, name)
        assert got.step == cfg.train.max_steps
        assert got.result.best_checkpoint.name == ref.best_checkpoint.name
        for step in [h["step"] for h in ref.history]:
            ckpt = f"checkpoint_{step:07d}"
            if (ref_dir / ckpt).exists():
                same_checkpoint(tmp_path / name / ckpt, ref_dir / ckpt)
        model, loaded_cfg, meta = load_model(got.result.best_checkpoint)  # the evaluation's
        assert loaded_cfg == cfg and meta["step"] == got.result.best_metrics["step"]


@pytest.mark.slow  # spawning a worker imports torch + scikit-learn: ~10-30 s here
def test_validation_in_worker_processes_reports_the_same(tmp_path, refs):
    """The default: validation's numpy / scikit-learn part in spawned worker processes."""
    short = {n: (refs[n][0].model_copy(update={"train": refs[n][0].train.model_copy(
        update={"max_steps": 4, "eval_every": 2})}),) for n in ("a", "b")}
    here = run_members(tmp_path / "here", short, names=("a", "b"), workers=0)
    pool = run_members(tmp_path / "pool", short, names=("a", "b"), workers=1)
    for name in ("a", "b"):
        assert pool[name].status == "finished"
        same_history(pool[name].result.history, here[name].result.history, name)


def test_siglip_stack_equals_unbatched(tmp_path, tiny_data):
    cfgs = [tiny_config(tmp_path / "runs", tiny_data, max_steps=8, eval_every=4, seed=s,
                        extra={"loss": {"name": "siglip", "siglip_init_bias": b}})
            for s, b in ((3, -10.0), (4, -5.0))]
    outs = fit_stacked([Member(c, tmp_path / f"s{i}") for i, c in enumerate(cfgs)],
                       validation_workers=0)
    for i, cfg in enumerate(cfgs):
        ref = fit(cfg, run_dir=tmp_path / f"ref{i}", verbose=False)
        same_history(outs[i].result.history, ref.history, f"siglip {i}")
        same_checkpoint(tmp_path / f"s{i}" / "checkpoint_0000008",
                        tmp_path / f"ref{i}" / "checkpoint_0000008")


def test_bf16_autocast_path_trains_like_fit(tmp_path, tiny_data):
    """The GPU arithmetic (bf16 autocast; LayerNorm backward by batched formulas, not
    ATen's per-member kernel) exercised on the CPU: close to fit's bf16 run, not exact."""
    cfgs = [tiny_config(tmp_path / "runs", tiny_data, max_steps=6, eval_every=3, seed=s,
                        precision="bf16", extra={"model": {"adversary": {"enabled": True}}})
            for s in (0, 1)]
    out = fit_stacked([Member(c, tmp_path / f"b{i}") for i, c in enumerate(cfgs)],
                      validation_workers=0)
    ref = fit(cfgs[1], run_dir=tmp_path / "ref", verbose=False)
    assert [o.status for o in out] == ["finished", "finished"]
    for got, want in zip(out[1].result.history, ref.history, strict=True):
        for key in ("train/loss", "train/contrastive", "train/adv_loss", "val/loss"):
            assert got[key] == pytest.approx(want[key], rel=1e-2), key


def test_stack_key_groups_what_can_train_together(tmp_path, tiny_data):
    def cfg(**extra):
        return tiny_config(tmp_path, tiny_data, extra=extra)

    base = cfg()
    per_member = [cfg(train={"seed": 5, "lr": 1e-4, "max_steps": 7, "eval_every": 3,
                             "grad_clip": None, "weight_decay": 0.0}),
                  cfg(loss={"init_temperature": 0.2}),
                  cfg(model={"gene": {"dropout": 0.3}}), cfg(eval={"ks": [1, 5]}),
                  cfg(name="other")]
    assert {stack_key(c) for c in [base, *per_member]} == {stack_key(base)}
    apart = {"model.embed_dim": cfg(model={"embed_dim": 16}),
             "loss.name": cfg(loss={"name": "siglip"}),
             "train.batch_size": cfg(train={"batch_size": 16}),
             "preprocess.expression.method": cfg(preprocess={"expression": {"method": "pca"}}),
             "model.adversary.enabled": cfg(model={"adversary": {"enabled": True}}),
             "loss.learn_temperature": cfg(loss={"learn_temperature": False}),
             "train.precision": cfg(train={"precision": "bf16"})}
    for field, other in apart.items():
        assert stack_key(other) is not None and stack_key(other) != stack_key(base), field
        assert field in key_difference(base, other), field
    alone = {"image tower trains": cfg(model={"image": {"mode": "finetune"}}),
             "feature_cache": cfg(train={"feature_cache": False}),
             "stain_augment": cfg(preprocess={"image": {"stain_augment": 0.1}}),
             "num_workers": cfg(train={"num_workers": 2}),
             "transformer": cfg(model={"gene": {"name": "transformer"}}),
             "compile": cfg(train={"compile": True})}
    for why, other in alone.items():
        assert stack_key(other) is None
        assert why in stack_problem(other)
    cfgs = [base, apart["loss.name"], per_member[0], alone["compile"], apart["loss.name"]]
    assert plan_groups(cfgs) == [[0, 2], [1, 4], [3]]
    assert plan_groups(cfgs, max_size=1) == [[0], [2], [1], [4], [3]]
    with pytest.raises(ValueError, match="loss.name"):
        StackedTrainer([Member(base, tmp_path / "x"), Member(apart["loss.name"], tmp_path / "y")])
    with pytest.raises(ValueError, match="cannot be stacked"):
        StackedTrainer([Member(alone["compile"], tmp_path / "z")])


def test_dropped_members_leave_the_others_unchanged(tmp_path, refs):
    """ASHA stops: ``a`` by its callback raising StopMember at step 10, ``c`` by returning
    STOP at step 5, ``b`` from another thread (``drop``) right after its step-10 report."""
    seen: dict[str, list[int]] = {n: [] for n in MEMBERS}
    trainer: StackedTrainer | None = None

    def callback(name):
        def cb(metrics, ckpt):
            seen[name].append(metrics["step"])
            assert ckpt is not None and (ckpt / "model.pt").is_file()
            if name == "a" and metrics["step"] == 10:
                raise StopMember
            if name == "c" and metrics["step"] == 5:
                return STOP
            if name == "b" and metrics["step"] == 10:
                t = threading.Thread(target=trainer.drop, args=("b",))
                t.start()
                t.join()
            return None
        return cb

    members = [Member(refs[n][0], tmp_path / n, callback=callback(n), name=n) for n in MEMBERS]
    trainer = StackedTrainer(members, validation_workers=0)
    outcomes = {o.name: o for o in trainer.run()}
    assert seen == {"a": [10], "b": [10], "c": [5]}
    assert {n: o.status for n, o in outcomes.items()} == dict.fromkeys(MEMBERS, "stopped")
    for name, (_, ref, _) in refs.items():
        got = outcomes[name].result.history
        same_history(got, ref.history[:len(got)], name)

    # a survivor keeps its trajectory when another member leaves mid-run
    outcomes = run_members(tmp_path / "two", refs, names=("a", "b"),
                           b={"callback": lambda m, c: STOP if m["step"] == 10 else None})
    assert outcomes["b"].status == "stopped" and outcomes["a"].status == "finished"
    same_history(outcomes["a"].result.history, refs["a"][1].history, "a")
    same_checkpoint(tmp_path / "two" / "a" / "checkpoint_0000020",
                    refs["a"][2] / "checkpoint_0000020")


def test_a_failing_member_fails_alone(tmp_path, refs, tiny_data):
    """A NaN loss (SigLIP bias NaN: non-finite from step 0) and a callback that raises fail
    their member only; the NaN member fails with the loop's own message."""
    nan_cfgs = [tiny_config(tmp_path / "runs", tiny_data, max_steps=6, eval_every=3, seed=s,
                            extra={"loss": {"name": "siglip", "siglip_init_bias": b}})
                for s, b in ((0, -10.0), (1, float("nan")))]
    with pytest.raises(TrainingError) as unbatched:
        fit(nan_cfgs[1], run_dir=tmp_path / "nan-ref", verbose=False)
    out = fit_stacked([Member(c, tmp_path / f"n{i}") for i, c in enumerate(nan_cfgs)],
                      validation_workers=0)
    assert out[0].status == "finished" and out[1].status == "failed"
    assert isinstance(out[1].error, TrainingError)
    assert str(out[1].error) == str(unbatched.value)
    assert out[1].result.history == [] and out[1].result.best_checkpoint is None
    same_history(out[0].result.history,
                 fit(nan_cfgs[0], run_dir=tmp_path / "ok-ref", verbose=False).history, "ok")

    def boom(metrics, ckpt):
        raise RuntimeError("MLflow is down")

    outcomes = run_members(tmp_path / "cb", refs, names=("a", "c"), c={"callback": boom})
    assert outcomes["c"].status == "failed" and "MLflow is down" in str(outcomes["c"].error)
    assert [h["step"] for h in outcomes["c"].result.history] == [5]
    assert outcomes["a"].status == "finished"
    same_history(outcomes["a"].result.history, refs["a"][1].history, "a")


def test_a_member_out_of_memory_or_raising_fails_alone(tmp_path, refs, monkeypatch):
    """A member whose training step raises ``torch.OutOfMemoryError`` (injected for that
    member only: ``faults.maybe_fail_stack_member``; a real one needs a GPU), or whose
    step or validation raises, fails alone with that error and no checkpoint past it; the
    others' reports and final checkpoints equal their unbatched runs."""
    from hescape.train.faults import STACK_MEMBER_FAIL

    cases = {"oom": ("oom@3:train.seed=2", "c", torch.OutOfMemoryError, []),
             "step": ("step@12:train.seed=1", "b", RuntimeError, [10]),
             "validation": ("validation@10:train.seed=1", "b", RuntimeError, [])}
    for case, (spec, victim, error, steps) in cases.items():
        monkeypatch.setenv(STACK_MEMBER_FAIL, spec)
        outcomes = run_members(tmp_path / case, refs)
        bad = outcomes[victim]
        assert bad.status == "failed" and type(bad.error) is error, (case, bad.error)
        assert "injected fault" in str(bad.error), case
        assert [h["step"] for h in bad.result.history] == steps, case
        assert sorted(p.name for p in (tmp_path / case / victim).glob("checkpoint_*")) == \
            [f"checkpoint_{s:07d}" for s in steps], case
        for name in set(MEMBERS) - {victim}:
            assert outcomes[name].status == "finished", (case, name, outcomes[name].error)
            same_history(outcomes[name].result.history, refs[name][1].history, name)
            last = f"checkpoint_{refs[name][0].train.max_steps:07d}"
            same_checkpoint(tmp_path / case / name / last, refs[name][2] / last)


def test_resume_continues_each_member_where_it_stood(tmp_path, refs):
    """Interrupted at different steps (``a`` at 10, ``c`` at 5; ``b`` resumes from a
    checkpoint written by the unbatched ``fit``), the restarted stack runs ragged and every
    member ends where an uninterrupted run ends."""
    first = run_members(tmp_path, refs, names=("a", "c"),
                        a={"callback": lambda m, c: STOP if m["step"] == 10 else None},
                        c={"callback": lambda m, c: STOP if m["step"] == 5 else None})
    assert first["a"].step == 10 and first["c"].step == 5
    (tmp_path / "b").mkdir()
    shutil.copytree(refs["b"][2] / "checkpoint_0000010", tmp_path / "b" / "checkpoint_0000010")
    log: list[tuple[str, int]] = []
    members = [Member(refs[n][0], tmp_path / n, name=n,
                      callback=lambda m, c, n=n: log.append((n, m["step"])))
               for n in MEMBERS]
    outcomes = {o.name: o for o in fit_stacked(members, validation_workers=0)}
    # the stack starts at c's step 5; a and b join at step 10
    assert log == [("c", 10), ("c", 15), ("a", 20), ("b", 20)]
    for name, (_, ref, ref_dir) in refs.items():
        assert outcomes[name].status == "finished"
        resumed = outcomes[name].result.history
        same_history(resumed, ref.history[-len(resumed):], name)
        last = f"checkpoint_{refs[name][0].train.max_steps:07d}"
        same_checkpoint(tmp_path / name / last, ref_dir / last)
    # a finished member resumes to nothing (as fit does)
    again = fit_stacked([Member(refs["a"][0], tmp_path / "a", name="a")], validation_workers=0)
    assert again[0].status == "finished" and again[0].result.history == []
    assert again[0].result.best_checkpoint is not None


def test_fit_many_stacks_what_it_can_and_runs_the_rest_alone(tmp_path, tiny_data):
    stackable = [tiny_config(tmp_path / "runs", tiny_data, max_steps=4, eval_every=2, seed=s)
                 for s in (0, 1)]
    alone = tiny_config(tmp_path / "runs", tiny_data, max_steps=4, eval_every=2,
                        feature_cache=False)
    members = [Member(stackable[0], tmp_path / "m0"), Member(alone, tmp_path / "m1"),
               Member(stackable[1], tmp_path / "m2")]
    outcomes = fit_many(members, validation_workers=0)
    assert [o.name for o in outcomes] == ["m0", "m1", "m2"]
    assert all(o.status == "finished" for o in outcomes)
    ref = fit(stackable[1], run_dir=tmp_path / "ref", verbose=False)
    same_history(outcomes[2].result.history, ref.history, "m2")
    assert [h["step"] for h in outcomes[1].result.history] == [2, 4]
    meta = json.loads((outcomes[1].result.best_checkpoint / "meta.json").read_text())
    assert meta["features_path"] is None  # trained alone, re-encoding images
