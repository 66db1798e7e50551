"""The ``varcon`` command line: ``varcon <command> [--config FILE] [section.key=value ...]``."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import traceback

from pipeline.config import DEFAULT_CONFIG, REPO_ROOT, ConfigError, ExperimentConfig, load_config
from pipeline.data.sources import DataError
from pipeline.tracking import TrackingError

DESCRIPTION = """\
VarCon training and tuning pipeline (Ray Train + Ray Tune + FFCV + MLflow).

Every command takes an optional --config YAML file (default: the bundled digits demo, configs/digits.yaml;
for `tune` a sweep file, configs/tune/digits_asha.yaml; for `study` a study file, configs/study/digits.yaml)
followed by dotted overrides, e.g.:
  varcon train loss.tau1=0.07 optim.epochs=30 ray.num_workers=4
  varcon tune --config configs/tune/digits_pbt.yaml tune.num_samples=8 optim.epochs=12
Relative paths in a config resolve against $VARCON_HOME, else the current directory.
Every key, with its type, default and meaning: `varcon config --keys`; the resolved config of a file and
overrides: `varcon config --config FILE [overrides]` (a sweep file too).
"""

COMMANDS = {
    "prepare": "write the dataset's FFCV .beton files and manifests (cached; rewritten when settings change)",
    "train": "train one model under Ray Train (DDP) and record it in MLflow",
    "tune": "search tau1, eps, optimisation settings and temperature schedules with Ray Tune",
    "study": "does tuning the temperature pay? the paper's constant against a tuned constant, a tuned schedule and "
             "a PBT-discovered one, retrained with paired seeds, with verdicts",
    "eval": "evaluate a saved checkpoint: kNN, linear probe, few-shot, dispersion",
    "ui": "serve the MLflow UI for the configured tracking store on 127.0.0.1:5000",
    "config": "print the resolved config as YAML; --keys lists every key with its type, default and meaning",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="varcon", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        default, kind = {"tune": ("configs/tune/digits_asha.yaml", "sweep"),
                         "study": ("configs/study/digits.yaml", "study")}.get(
            name, (DEFAULT_CONFIG.relative_to(REPO_ROOT), "experiment"))
        sub.add_argument("--config", default=None, metavar="FILE", help=f"{kind} YAML (default: {default})")
        sub.add_argument("overrides", nargs="*", metavar="section.key=value", help="override one config value")
        sub.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
        if name in ("train", "tune", "study"):
            sub.add_argument("--verbose", action="store_true", help="also stream Ray's own worker, controller and "
                                                                    "autoscaler output (else: its log folder)")
        if name == "config":
            sub.add_argument("--keys", action="store_true", help="list every config key (and, for a sweep file, "
                                                                 "every tune.* key) with type, default, description")
        if name == "eval":
            sub.add_argument("--checkpoint", required=True, metavar="DIR",
                             help="checkpoint folder (printed by `varcon train`); its stored config is used")
    return parser


def _cmd_prepare(config: ExperimentConfig) -> int:
    from pipeline.data.preflight import prepare

    files = prepare(config, repair=True)
    print(f"train: {files.train} ({files.num_train} samples)\ntest:  {files.test} ({files.num_test} samples)")
    return 0


def _cmd_train(config: ExperimentConfig, verbose: bool = False) -> int:
    from pipeline.names import monitor_source
    from pipeline.tracking import ui_command
    from pipeline.train_job import train

    outcome = train(config, verbose=verbose)
    print(f"\n== {config.name}: {config.loss.name} on {config.data.dataset}, {config.optim.epochs} epochs, "
          f"{config.ray.num_workers} Ray Train workers ==")
    final = outcome.final_metrics

    def by_split(key: str) -> tuple:  # validation (what selects) first, then test
        return not key.startswith("val_"), key

    for key in sorted((k for k in final if "_knn_top1_k" in k), key=by_split):
        before = outcome.initial_metrics.get(key)
        init = f" (random init: {before:.2%})" if before is not None else ""
        print(f"{key}: {final[key]:.2%}{init}")
    for key in sorted((k for k in final if "probe_top" in k or "fewshot" in k), key=by_split):
        print(f"{key}: {final[key]:.2%}")
    print(f"MLflow run id: {outcome.run_id}")
    if outcome.model_path:
        print(f"final checkpoint: {outcome.model_path}   (varcon eval --checkpoint {outcome.final.folder})")
        if config.data.val_fraction > 0:
            print(f"best checkpoint:  {outcome.best_model_path}   (by {monitor_source(config.eval)}, the "
                  f"validation split)")
        else:
            print("best checkpoint:  the final one (data.val_fraction=0: no validation split, nothing selected)")
    if outcome.tracking_problem:
        print(f"varcon: warning: {outcome.tracking_problem}", file=sys.stderr)
    print(f"open the UI:   {shlex.join(ui_command(outcome.tracking_uri))}   (then http://127.0.0.1:5000)")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from pipeline.run_status import Ending
    from tune.spec import load_sweep
    from tune.sweep import run_sweep

    spec = load_sweep(args.config, args.overrides)
    outcome = run_sweep(spec, verbose=args.verbose)
    print(f"\nMLflow parent run: {outcome.parent_run_id} (one child run per trial)")
    errored = [row for row in outcome.rows if row.status.ending is Ending.FAILED]
    if errored:
        print(f"{len(errored)} of {len(outcome.rows)} trials ended with an error (status column above; the "
              f"MLflow run's varcon.error tag has the full message)")
    if outcome.best is None:
        print("varcon: error: no trial completed every epoch; see the table above", file=sys.stderr)
        return 1
    print(f"best trial: {outcome.best.trial_id} ({spec.settings.metric} = {outcome.best.metric:.4f}, MLflow run "
          f"{outcome.best.run_id})")
    if outcome.registered:
        print(f"registered model: {outcome.registered}")
    print(f"best config: {outcome.best_config_path}\n  train it:  varcon train --config {outcome.best_config_path}")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from tune.study import StudyFailed, run_study
    from tune.study_spec import load_study

    study = load_study(args.config, args.overrides)  # every check before Ray starts or anything is written
    try:
        outcome = run_study(study, verbose=args.verbose)
    except StudyFailed as exc:
        print(f"varcon: error: {exc}", file=sys.stderr)
        return 1
    print(f"\nMLflow parent run: {outcome.parent_run_id} (the searches and the retraining nested in it)")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.eval_job import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, args.overrides)
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from pipeline.config import describe_keys, to_dict

    kind = _file_kind(args.config)
    if args.keys:
        from tune.spec import TuneSettings
        from tune.study_spec import StudySettings

        own = {"sweep": describe_keys(TuneSettings, "tune."), "study": describe_keys(StudySettings, "study.")}
        rows = own.get(kind, []) + describe_keys()
        width = max(len(key) for key, *_ in rows)
        for key, type_name, default, text in rows:
            print(f"{key.ljust(width)}  {type_name} = {default}\n{' ' * (width + 2)}{text}")
        return 0
    if kind == "sweep":
        from dataclasses import asdict

        from tune.spec import load_sweep

        spec = load_sweep(args.config, args.overrides)
        resolved = {"tune": vars(spec.settings), "space": {p.key: {k: v for k, v in asdict(p).items() if k != "key"}
                                                           for p in spec.space}, "experiment": to_dict(spec.base)}
    elif kind == "study":
        from tune.study_spec import load_study, resolved_study

        resolved = resolved_study(load_study(args.config, args.overrides))
    else:
        resolved = to_dict(load_config(args.config, args.overrides))
    print(yaml.safe_dump(resolved, sort_keys=False), end="")
    return 0


def _file_kind(path: str | None) -> str:
    """``sweep`` (it names an ``experiment`` and a ``space``), ``study`` (an ``experiment`` and a ``study``) or
    ``experiment``."""
    import yaml

    if not path or not os.path.isfile(path):
        return "experiment"
    try:
        raw = yaml.safe_load(open(path).read())
    except yaml.YAMLError:
        return "experiment"
    if isinstance(raw, dict) and "experiment" in raw:
        return "sweep" if "space" in raw else "study" if "study" in raw else "experiment"
    return "experiment"


def _cmd_ui(config: ExperimentConfig) -> int:
    from pipeline.tracking import resolve_tracking_uri, ui_command

    command = ui_command(resolve_tracking_uri(config.tracking.tracking_uri))
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    print(f"serving {shlex.join(command[1:])} at http://127.0.0.1:5000 (Ctrl-C stops)")
    os.execvp(command[0], command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("eval", "tune", "study", "config"):
            return {"eval": _cmd_eval, "tune": _cmd_tune, "study": _cmd_study, "config": _cmd_config}[args.command](
                args)
        config = load_config(args.config, args.overrides)
        if args.command == "train":
            return _cmd_train(config, args.verbose)
        return {"prepare": _cmd_prepare, "ui": _cmd_ui}[args.command](config)
    except (ConfigError, DataError, TrackingError) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"varcon: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from pipeline.train_job import TrainingDiverged

        if not isinstance(exc, TrainingDiverged):
            raise
        if args.debug:
            traceback.print_exc()
        print(f"varcon: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
