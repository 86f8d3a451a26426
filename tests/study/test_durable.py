"""DurableScheduler: ASHA's rungs and stop decisions survive a restored phase; Tune state
files cut short by a kill are put back from the last complete copy (issue 15)."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest

pytest.importorskip("ray.tune")


def _trial(trial_id: str):
    from ray.tune.experiment import Trial

    return Trial("run_trial", config={}, trial_id=trial_id, stub=True)


def _asha(state_dir):
    from ray.tune.schedulers import ASHAScheduler

    from hescape.study.durable import DurableScheduler

    inner = ASHAScheduler(time_attr="step", metric="val/r5_img2gene", mode="max", max_t=7,
                          grace_period=3, reduction_factor=2)
    return DurableScheduler(inner, state_dir)


def _result(step: int, value: float) -> dict:
    return {"step": step, "val/r5_img2gene": value}


def test_asha_decisions_survive_a_restored_phase(tmp_path):
    from ray.tune.schedulers import TrialScheduler

    state = tmp_path / "resume"
    before = _asha(state)
    t1, t2, t3 = _trial("t1"), _trial("t2"), _trial("t3")
    for t in (t1, t2):
        before.on_trial_add(None, t)
    assert before.on_trial_result(None, t1, _result(3, 0.5)) == TrialScheduler.CONTINUE
    assert before.on_trial_result(None, t2, _result(3, 0.1)) == TrialScheduler.STOP

    # the driver is killed; Tune restores the phase with the scheduler it pickled at the
    # start (fresh state) and re-adds the trials it knows
    after = pickle.loads(pickle.dumps(_asha(state)))
    for t in (t1, t2, t3):
        after.on_trial_add(None, t)
    # t2 was stopped: its first report after the restore stops it again
    assert after.on_trial_result(None, t2, _result(3, 0.1)) == TrialScheduler.STOP
    # t1's rung value is remembered: t3 is compared with t1 and t2 (cutoff 0.3), as it
    # would have been without the interruption (a fresh ASHA lets it continue)
    assert after.on_trial_result(None, t3, _result(3, 0.2)) == TrialScheduler.STOP
    fresh = _asha(tmp_path / "other")
    fresh.on_trial_add(None, t3)
    assert fresh.on_trial_result(None, t3, _result(3, 0.2)) == TrialScheduler.CONTINUE
    # a result already recorded (a restored trial re-reporting its checkpoint) changes nothing
    assert after.on_trial_result(None, t1, _result(3, 0.5)) == TrialScheduler.CONTINUE


def _state_files(phase, session: str, value: int) -> None:
    (phase / f"experiment_state-{session}.json").write_text(json.dumps({"trials": value}))
    (phase / f"search_gen_state-{session}.json").write_bytes(pickle.dumps({"counter": value}))
    (phase / f"searcher-state-{session}.pkl").write_bytes(pickle.dumps({"n": value}))


def test_state_cut_short_by_a_kill_is_put_back_from_the_last_copy(tmp_path):
    from hescape.study.durable import backup_state, repair_state

    phase, root = tmp_path / "search", tmp_path / "resume" / "tune_state"
    phase.mkdir()
    _state_files(phase, "2026-01-01_00-00-00", 1)  # an older session: never the one restored
    session = "2026-01-02_00-00-00"
    _state_files(phase, session, 2)
    backup_state(phase, root)
    _state_files(phase, session, 3)
    backup_state(phase, root)  # the newest complete copy replaces the older one
    assert (root / "current").read_text() == "1" and not (root / "0").exists()
    assert repair_state(phase, root) is False  # nothing cut short: nothing touched

    state = phase / f"experiment_state-{session}.json"
    state.write_text(state.read_text()[:7])  # the kill hit Tune's in-place copy
    assert repair_state(phase, root) is True
    assert json.loads(state.read_text()) == {"trials": 3}
    assert pickle.loads((phase / f"searcher-state-{session}.pkl").read_bytes()) == {"n": 3}

    (phase / f"searcher-state-{session}.pkl").write_bytes(b"\x80\x05")
    shutil.rmtree(root)
    with pytest.raises(RuntimeError, match="--overwrite"):
        repair_state(phase, root)
