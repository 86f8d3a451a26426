"""``hescape study run|report|plan`` and the argument set shared with ``study/run.py``."""

from __future__ import annotations

import argparse
import sys


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="study YAML, e.g. experiments/demo.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=100 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted study: finished trials are kept, unfinished "
                   "ones resume from their last checkpoint, failed ones stay failed; a finished "
                   "study only prints where its report is")
    p.add_argument("--overwrite", action="store_true",
                   help="discard an existing study of the same name and start again")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config and print the plan without running anything")
    p.add_argument("--report", action="store_true",
                   help="only rewrite the report of an existing study")
    p.add_argument("--verbose", action="store_true",
                   help="Tune's status tables and each trial's per-step lines (default: one "
                   "line per trial event)")


def run_from_args(args: argparse.Namespace) -> int:
    from hescape.config import ConfigError, load_config
    from hescape.study import describe_plan, report_study, run_study_file

    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            print(describe_plan(cfg, args.config))
            return 0
        if args.report:
            print(f"report: {report_study(cfg.storage_dir, cfg.name)}")
            return 0
        result = run_study_file(args.config, args.overrides, resume=args.resume,
                                overwrite=args.overwrite, address=args.address,
                                verbose=args.verbose)
    except (ConfigError, ValueError, FileNotFoundError, PermissionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run again with --resume to finish the study", file=sys.stderr)
        return 130
    print(f"study {result.name}: {len(result.trials)} trial run(s) in MLflow "
          f"(parent run {result.parent_run_id})")
    print(f"report: {result.report_dir}/report.md")
    from hescape.study.lineage import dashboard_hint

    print(f"dashboard: {dashboard_hint(result.tracking_uri, result.parent_run_id)}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("study", help="run, plan or report a Ray Tune study",
                       description="Run (or resume) a study; same as study/run.py.")
    add_run_arguments(p)
    p.set_defaults(func=run_from_args)
