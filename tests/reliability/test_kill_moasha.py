"""MO-ASHA across kills (issue 21): a study with ``sweep.scheduler: moasha`` killed mid-search
(Ctrl-C mid-training, then SIGKILL of the driver's process group at a trial's last
checkpoint) and resumed with ``--resume`` ends
where the uninterrupted study ends: the same trials and statuses, and the same MO-ASHA
decisions (rung, configuration, decision, who dominated it). The kill-anywhere machinery is
``tests/reliability/test_kill_anywhere.py``'s (its ``_run`` and ``_runs``)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.reliability import test_kill_anywhere as ka

pytestmark = pytest.mark.slow

MOASHA = [
    "--set=sweep.scheduler=moasha",
    "--set=sweep.objectives=[{metric: val/r5_img2gene, mode: max}, "
    "{metric: val/gene/ilisi, mode: max}]",
    "--set=data.simulate.n_donors=6", "--set=data.split.val_fraction=0.34",
    "--set=data.split.test_fraction=0.17", "--set=sweep.seeds=1",
]
KILLS = ["report:3@search", "report:6@search"]


def _decisions(store: Path) -> list[tuple]:
    """(rung, configuration, seed, decision, dominated_by configurations), in order."""
    from hescape.study.moasha import decisions_path, read_decisions

    runs = {r.data.tags["ray.trial_id"]: (r.data.tags["hescape.config_id"],
                                         r.data.tags["hescape.seed"]) for r in ka._runs(store)[2]}
    log = read_decisions(decisions_path(store / "tiny", "search"))
    assert log is not None
    return [(d["rung"], runs[d["trial_id"]], d["decision"],
             sorted(runs[t] for t in d["dominated_by"])) for d in log["decisions"]]


def test_moasha_study_killed_and_resumed_decides_as_uninterrupted(tmp_path, monkeypatch):
    monkeypatch.setattr(ka, "OVERRIDES", [*ka.OVERRIDES, *MOASHA])
    reference = ka._run(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]

    store = tmp_path / "killed"
    for i, fault in enumerate(KILLS):
        marker = tmp_path / f"killed-{i}"
        out = ka._run(store, *(["--resume"] if i else []), fault=fault, marker=marker)
        expected = 130 if fault in ka.CTRL_C else -signal.SIGKILL  # report:3 is a Ctrl-C
        assert out.returncode == expected, (fault, out.stdout[-2000:], out.stderr[-3000:])
    final = ka._run(store, "--resume")
    assert final.returncode == 0, final.stderr[-3000:]

    got, want = ka._by_config(ka._runs(store)[2]), ka._by_config(ka._runs(tmp_path / "reference")[2])
    assert sorted(got) == sorted(want)
    for key, run in got.items():
        assert run.info.status == want[key].info.status, key
    decisions = _decisions(store)
    assert decisions == _decisions(tmp_path / "reference")
    assert any(d[2] == "stopped" for d in decisions)  # the scheduler did stop something
    report = (store / "tiny" / "report" / "report.md").read_text()
    assert "Early stopping: MO-ASHA" in report
    assert json.loads((store / "tiny" / "scheduler" / "search_moasha_decisions.json")
                      .read_text())["metrics"] == ["val/r5_img2gene", "val/gene/ilisi"]
