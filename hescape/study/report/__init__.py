"""The study report: reads a study's results (MLflow via ``hescape.study.results``, the
study directory) and writes ``report.md`` / ``report.html``. The driver only calls it
(``build.write_report``); nothing in the driving modules imports it at module level.

- ``build``: ``write_report`` / ``build_report``, the sections in their order
- ``answer``: the first section, per swept factor the answer the study gives
- ``tables``: leaderboard, ablation, baselines comparison, Pareto front, effects table
- ``notes``: reading guide, protocol strata, preprocessing warnings, mutation-probe power
- ``plots``: effect / ablation / learning-curve / Pareto figures
- ``trial_plots``: the best trials' embedding UMAPs
- ``moasha``: the MO-ASHA section (decisions per rung, the validation front)
- ``effects``: factor effects with calibrated confidence intervals
- ``document``: the Markdown / self-contained HTML document
"""
