#!/usr/bin/env python
"""Run a hescape study: ``python study/run.py experiments/<study>.yaml [--set k=v] [--resume]``.

On this machine it starts a local Ray; with --address (or inside ``ray job submit``) it
joins the cluster. Review results with ``make mlflow-ui`` (127.0.0.1:5000; README: Reviewing a
study in MLflow); the run ends by printing the link to the study's experiment.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a bare working dir too
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hescape.cli.study import add_run_arguments, run_from_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="study/run.py",
        description="Run (or resume) a Ray Tune + Optuna study of contrastive H&E <-> expression "
        "training, tracked in MLflow (one parent run per study, one child run per trial).",
    )
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
