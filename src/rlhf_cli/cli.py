"""`rlhf <stage> [Hydra overrides and flags]`.

The first word picks the stage; everything after it goes to Hydra untouched, so `-m/--multirun`, `--cfg`, `--info`,
`--help`, `--config-dir`, `hydra/launcher=...` and shell completion behave as Hydra users expect. A new stage slots
in through its declaration in stagespec.py (see there for the rest of what a stage touches).

This is the only place that prints errors and decides the exit code: problems the user can fix (the project's
exceptions, Hydra's composition errors such as a misspelled key or a wrong type, and a file system that refuses a
write) become one red line plus a hint and exit code 2 (3 when training diverged, see errors.py); bugs keep their
traceback.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
from pathlib import Path

from rich.console import Console

from rlhf_cli.stagespec import SPECS

EXIT_USER_ERROR = 2
# A write the file system refused is the user's to fix (free space, permissions), not a bug.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


def conf_dir() -> Path:
    from rlhf_cli.config import conf_dir as where

    return where()


def _usage(console: Console) -> None:
    from rlhf_cli import __version__

    console.print(f"[bold]rlhf[/bold] {__version__}: RLHF in three stages (SFT -> reward model -> PPO)\n")
    console.print("usage: rlhf <stage> [key=value ...] [-m] [--cfg job] [--help]\n", markup=False)
    console.print("stages:")
    for name, spec in SPECS.items():
        console.print(f"  [cyan]{name:<10}[/cyan] {spec.help}")
    console.print("\n`rlhf <stage> --help` lists a stage's config groups and keys.")


def _project_error(exc: BaseException):
    """The project's own exception in exc's chain (a resolver's ConfigError arrives wrapped by OmegaConf), or a
    file-system refusal turned into a StorageError; else None."""
    from rlhf_cli.artifacts import write_failure
    from rlhf_cli.errors import StorageError, in_chain

    if (own := in_chain(exc)) is not None:
        return own
    refused = exc.errno in STORAGE_ERRNOS if isinstance(exc, OSError) else write_failure(exc) is not None
    if refused:
        return StorageError(f"could not write a file ({write_failure(exc)})",
                            hint="check that the directory is writable and its disk has free space (or pick another "
                                 "root=), then run again; finished artifacts and checkpoints are untouched")
    return None


def _is_user_error(exc: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    group_value = isinstance(exc, ValueError) and str(exc).startswith("Config group override must be")  # optim=1
    return _project_error(exc) is not None or group_value or isinstance(exc, (HydraException, OmegaConfBaseException))


def _exit_code(exc: BaseException) -> int:
    own = _project_error(exc)
    return own.exit_code if own is not None else EXIT_USER_ERROR


def _report(console: Console, exc: BaseException, stage: str | None = None) -> None:
    from rlhf_cli.config import compose_error

    # Hydra/OmegaConf composition errors are reworded: the unknown key, the stage, the closest valid keys.
    from rich.markup import escape

    own = _project_error(exc) or compose_error(exc, stage)  # messages are text, not markup: [slurm] stays
    console.print(f"[bold red]{own.kind}:[/bold red] {escape(own.message)}", highlight=False, soft_wrap=True)
    if own.hint:
        console.print(f"[yellow]hint:[/yellow] {escape(own.hint)}", highlight=False, soft_wrap=True)


def _job_dir_naming(args: list[str]) -> str:
    """Name multirun job directories after the swept keys only (optim.lr=0.001), not every fixed override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    fixed = ["experiment", "root", "overwrite", "resume", "logger"]
    words = [a for a in args if not a.startswith("-") and "=" in a]
    try:
        parsed = OverridesParser.create().parse_overrides(words)
    except Exception:  # noqa: BLE001 - Hydra reports the bad override itself, with a better message
        return "hydra.job.config.override_dirname.exclude_keys=[" + ",".join(fixed) + "]"
    fixed += [o.get_key_element() for o in parsed if not o.is_sweep_override()]
    return "hydra.job.config.override_dirname.exclude_keys=[" + ",".join(dict.fromkeys(fixed)) + "]"


# Hydra plugins behind the shipped presets (optional extras): the words that need one -> (module, extra)
PLUGINS = {"hydra/launcher=": ("hydra_plugins.hydra_submitit_launcher", "slurm", ("slurm", "submitit_slurm",
                                                                                  "submitit_local")),
           "hydra/sweeper=": ("hydra_plugins.hydra_optuna_sweeper", "optuna", ("maximize", "optuna"))}


def missing_plugin(args: list[str]):
    """A ConfigError for a launcher or sweeper preset whose Hydra plugin is not installed (else None): one line
    that names the extra to install, instead of Hydra's "could not find" deep in composition."""
    import importlib.util

    from rlhf_cli.errors import ConfigError

    for word in args:
        for prefix, (module, extra, names) in PLUGINS.items():
            if word.startswith(prefix) and word[len(prefix):] in names and importlib.util.find_spec(module) is None:
                return ConfigError(f"{word} needs Hydra's {extra} plugin ({module.split('.')[-1]}), which is not "
                                   f"installed", hint=f"pip install 'rlhf-cli[{extra}]'")
    return None


def objective_value(metrics, name: str | None):
    """What the Hydra task returns: the `objective` metric (a float, for a sweeper to optimise), else None."""
    from rlhf_cli.errors import ConfigError

    if name is None:
        return None
    value = metrics.get(name) if isinstance(metrics, dict) else None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        known = sorted(k for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        raise ConfigError(f"objective={name} is not a number in this stage's metrics",
                          hint=f"use one of: {', '.join(known)}")
    return float(value)


def check_objective(stage: str, args: list[str]):
    """A ConfigError (else None) for an `objective=` that names no metric of the stage, or a sweeper preset with no
    objective at all: refused before the first trial, not after every trial has trained for nothing."""
    from rlhf_cli.errors import ConfigError

    named = [a.split("=", 1)[1] for a in args if a.startswith("objective=")]
    objective = named[-1] if named and named[-1] not in ("null", "None", "") else None
    known = SPECS[stage].metrics
    listed = ", ".join([*known, *(f"{p}<name>" for p in SPECS[stage].metric_prefixes[:1])]) if known else \
        f"none: rlhf {stage} records no final metrics"
    if objective is None:
        if any(a.startswith("hydra/sweeper=") for a in args):
            return ConfigError(f"a sweeper needs objective=<metric of rlhf {stage}> to optimise",
                               hint=f"e.g. objective={SPECS[stage].rank_by[0] if SPECS[stage].rank_by else '...'}; "
                                    f"the metrics: {listed}")
        return None
    if objective not in known and not objective.startswith(SPECS[stage].metric_prefixes):
        return ConfigError(f"objective={objective} is not a metric of rlhf {stage}", hint=f"use one of: {listed}")
    return None


def run_stage(stage: str, args: list[str]) -> int:
    import hydra
    from omegaconf import DictConfig, OmegaConf

    from rlhf_cli.config import finalize, logger_word, register_configs

    register_configs()
    args = [logger_word(a) for a in args]  # logger=tensorboard, as before logger became a list
    wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    if not OmegaConf.has_resolver("rlhf_stage_help"):
        OmegaConf.register_new_resolver("rlhf_stage_help", lambda name: SPECS[name].help)
    if "-m" in args or "--multirun" in args:
        args = [*args, _job_dir_naming(args)]
        if any(a.startswith("hydra/sweeper=") for a in args) and not any(a.startswith("hydra.sweep.subdir=")
                                                                         for a in args):
            # a sweeper may draw the same values twice: its trials are numbered, so each has its own directory
            args.append("hydra.sweep.subdir='trial${hydra.job.num}__${rlhf_slug:${hydra.job.override_dirname},0}'")

    from rlhf_cli.errors import RlhfError

    failed: list[RlhfError] = []  # user mistakes inside jobs; a multirun goes on with its other jobs

    @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=stage)
    def task(cfg: DictConfig) -> float | None:  # None: no objective, or a failed run
        try:
            stage_cfg = finalize(cfg)  # config mistakes surface here, before torch or any model loads
            metrics = importlib.import_module(SPECS[stage].module).run(stage_cfg)
            return objective_value(metrics, getattr(stage_cfg, "objective", None))  # what a sweeper optimises
        except Exception as exc:  # noqa: BLE001 - the user's problems are collected, bugs go on up
            own = _project_error(exc)
            if wants_traceback or own is None:
                raise
            failed.append(own)
            from hydra.core.hydra_config import HydraConfig

            from rlhf_cli.sweeps import FAILED  # for the table that ends a sweep

            FAILED[HydraConfig.get().runtime.output_dir] = f"{own.kind}: {own.message}"
            return None  # a failed trial, to a sweeper

    for refused in (missing_plugin(args), check_objective(stage, args)):
        if refused is not None:
            _report(Console(stderr=True), refused)
            return refused.exit_code
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let exceptions reach us instead of Hydra's printer
    completing = "-sc" in args or "--shell-completion" in args
    sys.argv = ["rlhf" if completing else f"rlhf {stage}", *args]  # completion registers itself for `rlhf`
    try:
        task()
    except Exception as exc:  # noqa: BLE001 - sorted into user mistakes and bugs right here
        if failed and not wants_traceback and not _is_user_error(exc):
            # a sweeper that gives up once every trial has failed (Optuna: "No trials are completed yet"): the
            # trials' own errors say why, once each
            return _report_failed(failed, "the sweep ended without a finished trial: every trial failed")
        if wants_traceback or not _is_user_error(exc):
            raise
        _report(Console(stderr=True), exc, stage)
        return _exit_code(exc)
    return _report_failed(failed)


def _report_failed(failed: list, ending: str = "") -> int:
    """Each distinct error of a multirun's failed jobs, once; the worst exit code (0 when none failed)."""
    err = Console(stderr=True)
    seen = set()
    for exc in failed:
        if (exc.kind, exc.message) not in seen:
            seen.add((exc.kind, exc.message))
            _report(err, exc)
    if ending:
        err.print(f"[bold red]error:[/bold red] {ending} ({len(failed)} of them)", highlight=False, soft_wrap=True)
    return max((exc.exit_code for exc in failed), default=0)


def _complete(argv: list[str], console: Console) -> int:
    """Shell completion. `rlhf <stage> -sc install=bash` installs Hydra's script for `rlhf`; the script then calls
    `rlhf -sc query=bash` with the whole line in COMP_LINE: complete the stage name, or hand the line (minus the
    stage word) to that stage's Hydra completion."""
    line = os.environ.get("COMP_LINE", "")
    point = int(os.environ.get("COMP_POINT", len(line)))
    words = line[:point].split(" ")
    if len(words) <= 2:  # still typing the stage
        prefix = words[1] if len(words) == 2 else ""
        console.print(" ".join(name for name in SPECS if name.startswith(prefix)), highlight=False)
        return 0
    stage = words[1]
    if stage not in SPECS:
        return 0
    cut = line.index(stage) + len(stage) + 1
    os.environ["COMP_LINE"] = line[:line.index(stage)] + line[cut:]
    os.environ["COMP_POINT"] = str(max(0, point - len(stage) - 1))
    return run_stage(stage, argv)


def _run_plain(stage: str, args: list[str]) -> int:
    """A command that is not a Hydra app (pipeline): same error contract, exit 2 for user mistakes."""
    try:
        return importlib.import_module(SPECS[stage].module).main(args)
    except Exception as exc:  # noqa: BLE001 - sorted into user mistakes and bugs right here
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or not _is_user_error(exc):
            raise
        _report(Console(stderr=True), exc)
        return _exit_code(exc)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    console = Console()
    if not argv or argv[0] in ("-h", "--help", "help"):
        _usage(console)
        return 0
    if argv[0] == "--version":
        from rlhf_cli import __version__

        console.print(__version__)
        return 0
    if argv[0] in ("-sc", "--shell-completion"):
        return _complete(argv, console)
    stage = argv[0]
    if stage not in SPECS:
        err = Console(stderr=True)
        err.print(f"[bold red]error:[/bold red] unknown stage '{stage}'; valid stages: {', '.join(SPECS)}",
                  highlight=False, soft_wrap=True)
        err.print("[yellow]hint:[/yellow] rlhf --help", highlight=False, soft_wrap=True)
        return EXIT_USER_ERROR
    if not SPECS[stage].hydra:
        return _run_plain(stage, argv[1:])
    return run_stage(stage, argv[1:])


def entrypoint() -> None:
    sys.exit(main())
