"""``hescape study run|plan|report CONFIG`` and the argument set shared with ``study/run.py``.

``hescape study run x.yaml`` runs (or resumes) a study, ``hescape study plan x.yaml`` is
``--dry-run`` (plans and checks, writes nothing), ``hescape study report x.yaml`` rewrites
the report of an existing study; ``hescape study x.yaml`` (no action) still runs it.
"""

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
                   help="retire an existing study of the same name (its directory removed, its "
                   "MLflow runs tagged hescape.superseded and deleted) and start again")
    p.add_argument("--accept-config-change", action="store_true",
                   help="with --resume: continue although the config differs from the one the "
                   "study started with (without it such a resume is refused, with the "
                   "difference printed)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, the endpoints and the data, print the plan (with "
                   "--resume: what the resume would do); writes nothing")
    p.add_argument("--report", action="store_true",
                   help="only rewrite the report of an existing study")
    p.add_argument("--verbose", action="store_true",
                   help="Tune's status tables and each trial's per-step lines (default: one "
                   "line per trial event)")


def run_from_args(args: argparse.Namespace) -> int:
    from hescape.config import ConfigError, load_config
    from hescape.study import describe_plan, report_study, run_study_file
    from hescape.study.driver import StudyFailed

    action = getattr(args, "action", None) or "run"
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run or action == "plan":
            print(describe_plan(cfg, args.config, resume=args.resume, overwrite=args.overwrite,
                                address=args.address,
                                accept_config_change=args.accept_config_change))
            return 0
        if args.report or action == "report":
            print(f"report: {report_study(cfg.storage_dir, cfg.name)}")
            return 0
        result = run_study_file(args.config, args.overrides, resume=args.resume,
                                overwrite=args.overwrite, address=args.address,
                                verbose=args.verbose,
                                accept_config_change=args.accept_config_change)
    except (ConfigError, ValueError, FileNotFoundError, PermissionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StudyFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run again with --resume to finish the study", file=sys.stderr)
        return 130
    except Exception as exc:
        from hescape.diskfull import disk_full_message, full_path, is_disk_full
        from hescape.study.resources import MIN_FREE_BYTES

        if not is_disk_full(exc):
            raise
        print(f"error: {disk_full_message(cfg.storage_dir, full_path(exc), MIN_FREE_BYTES)}",
              file=sys.stderr)
        return 1
    print(f"study {result.name}: {len(result.trials)} trial run(s) in MLflow "
          f"(parent run {result.parent_run_id})")
    print(f"report: {result.report_dir}/report.md")
    from hescape.study.lineage import dashboard_hint

    order_by = cfg.sweep.objectives[0].metric if cfg.sweep and cfg.sweep.objectives else None
    print(f"dashboard: {dashboard_hint(result.tracking_uri, result.parent_run_id, order_by=order_by)}"
          "  (docs/dashboard.md: the three clicks to the study's answer)")
    return 0


ACTIONS = {"run": "run (or resume) a study", "plan": "check and print the plan (= --dry-run); "
           "writes nothing", "report": "rewrite the report of an existing study (= --report)"}


def add_parser(sub) -> None:
    p = sub.add_parser("study", help="run, plan or report a Ray Tune study",
                       description="hescape study {run,plan,report} CONFIG [options]: run (or "
                       "resume) a study, print its plan, or rewrite its report; `hescape study "
                       "run` is the same as study/run.py.")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    for name, text in ACTIONS.items():
        a = actions.add_parser(name, help=text, description=text)
        add_run_arguments(a)
        a.set_defaults(func=run_from_args, action=name)
    p.set_defaults(func=_bare)


def with_action(argv: list[str]) -> list[str]:
    """``hescape study x.yaml ...`` (the form before actions existed) -> ``study run x.yaml``."""
    if len(argv) >= 2 and argv[0] == "study" and argv[1] not in ACTIONS \
            and not argv[1].startswith("-"):
        return ["study", "run", *argv[1:]]
    return argv


def _bare(args: argparse.Namespace) -> int:
    print("usage: hescape study {run,plan,report} CONFIG [options] (see hescape study -h)",
          file=sys.stderr)
    return 2
