"""The report's MO-ASHA section (issue 21.5): each rung's promotions and stops with the reason
(dominated by whom), and the validation front with the trials stopped early marked."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.tune")


def _log(tmp_path):
    from ray.tune.experiment import Trial

    from hescape.study.moasha import MOASHA

    sched = MOASHA(metrics=["val/r5_img2gene", "val/gene/ilisi"], modes=["max", "max"],
                   time_attr="step", max_t=41, grace_period=10, reduction_factor=2,
                   log_path=tmp_path / "scheduler" / "search_moasha_decisions.json")
    values = {"a": (0.5, 0.5), "b": (0.4, 0.4), "c": (0.9, 0.1), "d": (0.6, 0.45)}
    for tid, (r, m) in values.items():
        sched.on_trial_result(None, Trial("x", config={}, trial_id=tid, stub=True),
                              {"step": 10, "val/r5_img2gene": r, "val/gene/ilisi": m})
    return sched.log()


def _row(tid, status, r, m):
    return {"trial_id": tid, "config_id": f"cfg-{tid}", "status": status, "phase": "search",
            "metrics": {"val/r5_img2gene": r, "val/gene/ilisi": m}}


def test_section_says_who_dominated_each_stopped_trial_and_marks_the_front(tmp_path):
    from hescape.config import StudyConfig
    from hescape.study.report.document import Document
    from hescape.study.report.moasha import moasha_section, study_decisions

    log = _log(tmp_path)
    assert [d["decision"] for d in log["decisions"]] == ["promoted", "stopped", "promoted",
                                                         "stopped"]
    rows = [_row("a", "FINISHED", 0.55, 0.5), _row("b", "KILLED", 0.4, 0.4),
            _row("c", "FINISHED", 0.95, 0.1), _row("d", "KILLED", 0.6, 0.45)]
    cfg = StudyConfig.model_validate({"sweep": {"scheduler": "moasha", "objectives": [
        {"metric": "val/r5_img2gene"}, {"metric": "val/gene/ilisi"}]}})
    doc = Document("t")
    moasha_section(doc, rows, study_decisions(tmp_path), cfg, out=tmp_path)
    md = doc.markdown()
    assert "Early stopping: MO-ASHA" in md
    assert "dominated by `a`" in md  # b's reason
    assert "on the rung's first front" in md and "crowding" in md  # d: a tie-break stop
    assert "stopped early at step 10" in md
    # d (0.6, 0.45) stopped early, yet no trial dominates it at its last report: marked
    assert "Stopped early yet on the front: `d`" in md
    assert (tmp_path / "moasha_front.png").is_file() and "moasha_front.png" in md
    # another scheduler: no section
    other = Document("t")
    moasha_section(other, rows, study_decisions(tmp_path),
                   StudyConfig.model_validate({"sweep": {"scheduler": "asha"}}))
    assert other.blocks == []
