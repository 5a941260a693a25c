"""`rlhf pipeline`: sft -> reward -> ppo -> eval for one experiment, in one command.

    rlhf pipeline experiment=exp2 sft.optim.lr=3e-4 ppo.kl_coef=0.1

An override with a stage's prefix goes to that stage: `sft.optim.lr=3e-4` reaches `rlhf sft` as `optim.lr=3e-4`;
one whose remainder is not a top-level key of the stage keeps its prefix, so `ppo.kl_coef=0.1` reaches `rlhf ppo`
as `ppo.kl_coef=0.1`, and goes to the stages whose schema has the whole key when that stage's has not:
`reward.functions=[...]` reaches ppo and eval (the reward stage has no `reward.functions`). An override without a
prefix goes to every stage that has its first part: `experiment=`, `root=`, `seed=`, `data.path=`, `logger=` to
all of them, `model.lora.r=16` or `optim.lr=` to sft, reward, ppo and dpo (eval has no model or optimizer of its
own). `stages=sft,reward` runs a subset; `stages=sft,dpo,eval` runs DPO
instead of the reward model and PPO (dpo is not among the default stages).

Every stage's config is composed and checked before the first one starts. A stage whose artifact is finished
with the same config is reused; one finished with a different config stops the pipeline with the keys that
differ (pass overwrite=true, or pick another experiment); an interrupted one is resumed. Each stage runs in its
own process (stages talk only through their artifacts on disk), so re-running the same command after a crash
continues where it stopped. A stage without an artifact (`rlhf eval`) always runs again: it is a report. The
pipeline ends with `rlhf report`: <root>/<experiment>/report.html, one page with every stage's numbers, config,
charts and samples.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, fields
from pathlib import Path

from rlhf_cli import artifacts
from rlhf_cli.config import SCHEMAS, compose_error, compose_stage, config_diff, finalize
from rlhf_cli.engine import launch
from rlhf_cli.engine.logging import console
from rlhf_cli.errors import ArtifactError, ConfigError, in_chain
from rlhf_cli.stagespec import SPECS, pipeline_order

ORDER = pipeline_order()
GROUPS = ("model", "data", "optim")
HELP = __doc__


def split_overrides(args: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(stages to run, overrides per stage) from the pipeline's words, by the prefix rule above."""
    stages = [s for s in ORDER if SPECS[s].pipeline_default]  # dpo runs when stages= names it
    per_stage: dict[str, list[str]] = {s: [] for s in ORDER}
    for word in args:
        if word.startswith("-"):
            raise ConfigError(f"rlhf pipeline does not take {word}",
                              hint="sweep one stage at a time: rlhf <stage> -m key=a,b")
        if "=" not in word:
            raise ConfigError(f"'{word}' is not key=value", hint="e.g. rlhf pipeline experiment=exp2 ppo.kl_coef=0.1")
        key, value = word.split("=", 1)
        if key == "stages":
            stages = [s for s in value.strip("[]").split(",") if s]
            unknown = [s for s in stages if s not in ORDER]
            if unknown:
                raise ConfigError(f"stages={value}: unknown {', '.join(unknown)}", hint=f"choose from {', '.join(ORDER)}")
            continue
        stage, _, rest = key.partition(".")
        if stage in ORDER and rest:
            top = {f.name for f in fields(SCHEMAS[stage])} | set(GROUPS)
            having = [s for s in ORDER if has_key(SCHEMAS[s], key)]
            if rest.split(".")[0] in top or has_key(SCHEMAS[stage], key) or not having:
                per_stage[stage].append(f"{rest}={value}" if rest.split(".")[0] in top else word)
            else:  # reward.functions: a key of ppo's and eval's own, not the reward stage's
                for s in having:
                    per_stage[s].append(word)
        else:  # to every stage that has the key's first part (model.lora.r: not eval); none has it: all say so
            first = key.lstrip("+~").split(".")[0]
            having = [s for s in ORDER if first in {f.name for f in fields(SCHEMAS[s])}]
            for s in having or ORDER:
                per_stage[s].append(word)
    return [s for s in ORDER if s in stages], per_stage


def has_key(schema: type, dotted: str) -> bool:
    """Whether `dotted` (reward.functions) names a field of the dataclass `schema`, through its nested ones."""
    from dataclasses import is_dataclass

    node = schema
    for part in dotted.lstrip("+~").split("."):
        found = {f.name: f for f in fields(node)}.get(part) if node is not None else None
        if found is None:
            return False
        value = found.default_factory() if callable(found.default_factory) else found.default
        node = type(value) if is_dataclass(value) else None
    return True


def compose(stage: str, overrides: list[str]):
    """The typed config `rlhf <stage> <overrides>` would run with (checked, paths absolute)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    GlobalHydra.instance().clear()  # the pipeline is no Hydra app: always its own composition from conf/
    try:
        cfg = compose_stage(stage, overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        hydra_said = isinstance(exc, (HydraException, OmegaConfBaseException)) or str(exc).startswith(
            "Config group override must be")  # optim=1
        if in_chain(exc) is not None or not hydra_said:
            raise
        # one line: the key, this stage, the closest valid keys as the pipeline spells them
        raise compose_error(exc, stage, spell=lambda key: pipeline_key(stage, key)) from exc
    obj = finalize(cfg)
    obj.run_dir = str(artifacts.stage_dir(obj.root, obj.experiment, stage))
    return obj


def pipeline_key(stage: str, key: str) -> str:
    """How `rlhf pipeline` spells one stage's key: bare when that alone reaches only this stage (ppo.kl_coef),
    else with the stage's prefix (sft.optim.lr)."""
    word = f"{key}=x"
    _, routed = split_overrides([word])
    return key if all(routed[s] == ([word] if s == stage else []) for s in ORDER) else f"{stage}.{key}"


def stale_keys(manifest_config: dict, cfg) -> list[str]:
    """Keys whose value differs between a finished artifact's config and the one the pipeline would run
    (config.RUN_KEYS, which say how to run rather than what to train, aside)."""
    return list(config_diff(manifest_config, asdict(cfg)))


def main(args: list[str]) -> int:
    con = console(True)
    if any(a in ("-h", "--help") for a in args):
        con.print(HELP, markup=False)
        return 0
    stages, per_stage = split_overrides(args)
    launch.start()  # the stage processes' imports, once, beside the checks below
    configs = {s: compose(s, per_stage[s]) for s in stages}  # every mistake surfaces before anything runs
    overwrite = {s: configs[s].overwrite for s in stages}

    plan = {}
    for stage in stages:
        run_dir = Path(configs[stage].run_dir)
        artifacts.settle_if_possible(run_dir)
        if SPECS[stage].artifact and artifacts.is_finished(run_dir) and not overwrite[stage]:
            stale = stale_keys(artifacts.read_manifest(run_dir)["config"], configs[stage])
            if stale:
                raise ArtifactError(
                    f"{run_dir} was made with a different config ({', '.join(stale[:6])}"
                    f"{' ...' if len(stale) > 6 else ''})",
                    hint="pass overwrite=true (or <stage>.overwrite=true) to retrain it, or pick another experiment=")
            plan[stage] = "reuse"
        else:
            plan[stage] = "run"
        if plan[stage] == "run" and overwrite[stage] is False and SPECS[stage].artifact:
            per_stage[stage].append("resume=true")  # an interrupted run continues

    results = {}
    for stage in stages:
        run_dir = Path(configs[stage].run_dir)
        if plan[stage] == "reuse":
            con.print(f"[bold]{stage}[/bold]: reusing the finished artifact in {run_dir}")
            results[stage] = ("reused", run_dir)
            continue
        con.rule(f"rlhf {stage}")
        started = time.perf_counter()
        returncode = launch.run_cli([stage, *per_stage[stage]])  # its own process, forked from the preloaded server
        if returncode != 0:
            con.print(f"[bold red]pipeline stopped:[/bold red] rlhf {stage} exited with {returncode}; "
                      f"fix it and run the same command again to continue from there")
            return returncode
        results[stage] = (f"ran in {time.perf_counter() - started:.0f} s", run_dir)
    _summary(con, results)
    first = configs[stages[0]]  # the experiment's page: every stage's numbers, config, charts and samples
    con.rule("rlhf report")
    return launch.run_cli(["report", f"experiment={first.experiment}", f"root={first.root}"])


def _summary(con, results: dict) -> None:
    from rich.table import Table

    table = Table(title="pipeline", title_justify="left")
    for col in ("stage", "status", "headline", "run directory"):
        table.add_column(col, overflow="fold")  # a long path wraps, whole
    for stage, (status, run_dir) in results.items():
        table.add_row(stage, status, _headline(stage, run_dir), _shown(run_dir))
    con.print(table)


def _shown(path: Path) -> str:
    """A path as short as it can be said: relative to the working directory when it is below it."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _headline(stage: str, run_dir: Path) -> str:
    """One line of the numbers that matter for each stage: its spec's summary pieces over its results (one part per
    row of eval.json, `label` being the row's stage or name)."""
    try:
        rows = artifacts.stage_results(SPECS[stage].results, run_dir)
    except (OSError, ValueError, KeyError, ArtifactError):
        return ""
    return "; ".join(filter(None, (summary_line(SPECS[stage].summary, {"label": row.get("stage") or row.get("name"),
                                                                         **row}) for row in rows or [])))


def summary_line(pieces: tuple[str, ...], row: dict) -> str:
    """The pieces formatted with `row`, a piece naming a key that `row` lacks (or holds as None) left out."""
    present = {k: v for k, v in row.items() if v is not None}
    out = []
    for piece in pieces:
        try:
            out.append(piece.format_map(present))
        except KeyError:
            continue
    return "".join(out)
