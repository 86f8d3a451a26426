"""Study driver: search space, Tune construction, MLflow lineage, report.

``run_study`` runs (or resumes) a study; ``report_study`` rewrites the report of an
existing one. The CLI over these is ``study/run.py`` (and ``hescape study``).
"""

from __future__ import annotations

from hescape.study.api import describe_plan, report_study, run_study_file

__all__ = ["describe_plan", "report_study", "run_study_file"]
