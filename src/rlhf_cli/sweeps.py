"""The table that ends a sweep (`rlhf <stage> -m ...`, any launcher or sweeper): one row per job of this sweep
(its overrides, its status, the stage's headline numbers), best first by the stage's headline metric, printed and
written to <sweep dir>/sweep.json, next to the jobs (`rlhf report` shows it).

Hydra calls `Summary` in the process that launched the sweep once every job has ended (conf/layout.yaml registers
it), so jobs that ran elsewhere (SLURM, submitit) are read from their run directories: a finished artifact (or
eval.json) is `done`; a directory without one is `unfinished` (failed or killed where it ran); a job that failed
in this process is `failed` with its error. A job counts as this sweep's when its directory changed after the sweep
started, so earlier sweeps into the same directory are left out.

The columns are the stage's headline metrics that have a short label, and the ranking metric is the first of its
`rank_by` that any job has, best first in that metric's direction (stagespec.SPECS): sft by eval_loss (lowest),
reward by eval_accuracy, ppo by final_gold when the task has a gold score, else final_score, eval by its last
policy's gold, else its score (highest).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from rich import box
from rich.console import Console
from rich.table import Table

from rlhf_cli import artifacts
from rlhf_cli.errors import ArtifactError
from rlhf_cli.stagespec import SPECS, StageSpec

SWEEP = "sweep.json"
FAILED: dict[str, str] = {}  # run directory -> the error of a job that failed in this process (cli.run_stage)


class Summary(Callback):
    """Hydra's hook around a multirun: note when it started, then summarise its jobs."""

    def on_multirun_start(self, config, **kwargs) -> None:
        self.started = time.time()
        FAILED.clear()

    def on_multirun_end(self, config, **kwargs) -> None:
        summary = summarise(config.stage, Path(config.hydra.sweep.dir).resolve(), getattr(self, "started", 0.0))
        if summary["jobs"]:
            Console(highlight=False).print(sweep_table(summary))


def job_metrics(stage: str, run_dir: Path) -> dict | None:
    """The numbers of a finished job (the manifest's metrics; eval: its last policy's means), else None."""
    rows = artifacts.stage_results(SPECS[stage].results, run_dir)
    return rows[-1] if rows else None


def columns(spec: StageSpec) -> tuple[list[str], list[str], dict[str, bool]]:
    """(the table's metrics, the ranking candidates in order, {metric: higher is better}) of a stage."""
    return ([m.key for m in spec.headline if m.short], list(spec.rank_by),
            {m.key: m.best == "high" for m in spec.headline if m.best})


def swept(run_dirs: list[Path]) -> dict[Path, str]:
    """{job directory: the overrides that tell it from the sweep's other jobs}, from Hydra's record of each job
    (`optim.lr=0.001`; the overrides every job shares are left out); the directory's name where there is no record
    (a job refused before it started) or nothing varies."""
    from omegaconf import OmegaConf

    words = {}
    for run_dir in run_dirs:
        path = run_dir / ".hydra" / "overrides.yaml"
        words[run_dir] = [str(w) for w in OmegaConf.load(path)] if path.is_file() else None
    recorded = [set(w) for w in words.values() if w is not None]
    shared = set.intersection(*recorded) if len(recorded) > 1 else set()
    return {run_dir: " ".join(x for x in w if x not in shared) if w and len(recorded) > 1 else run_dir.name
            for run_dir, w in words.items()}


def summarise(stage: str, sweep_dir: Path, since: float = 0.0) -> dict:
    """The jobs of a sweep (directories under `sweep_dir` changed since `since`, and this process's failed jobs),
    best first; written to sweep_dir/sweep.json."""
    shown, candidates, higher = columns(SPECS[stage])
    dirs = {p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and p.stat().st_mtime >= since
            and (p / ".hydra").is_dir()} if sweep_dir.is_dir() else set()
    failed = {Path(p).resolve(): error for p, error in FAILED.items()}
    dirs |= {p for p in failed if p.parent == sweep_dir}
    jobs = []
    for run_dir, words in swept(sorted(dirs)).items():
        try:
            metrics = job_metrics(stage, run_dir)
            status = "done" if metrics is not None else failed.get(run_dir, "unfinished")
        except (ArtifactError, OSError, ValueError, KeyError, IndexError) as exc:  # a damaged or older artifact
            metrics, status = None, f"unreadable: {exc}"
        jobs.append({"job": words, "status": status, "run_dir": str(run_dir),
                     "metrics": {k: (metrics or {}).get(k) for k in shown}})
    headline = next((k for k in candidates if any(number(j["metrics"].get(k)) for j in jobs)), candidates[0]
                    if candidates else None)
    highest = higher.get(headline, True)

    def rank(job: dict) -> tuple:
        value = job["metrics"].get(headline)
        if not number(value):
            return (1, 0.0)
        return (0, -value if highest else value)

    jobs.sort(key=rank)
    summary = {"stage": stage, "sweep_dir": str(sweep_dir), "headline": headline,
               "best": "highest" if highest else "lowest", "columns": shown, "jobs": jobs}
    if jobs:
        try:
            artifacts.write_text_atomic(sweep_dir / SWEEP, artifacts.dumps(summary, indent=2) + "\n")
        except OSError as exc:
            raise artifacts.storage_error(SWEEP, exc, hint=f"check that {sweep_dir} is writable") from exc
    return summary


def number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def sweep_table(summary: dict) -> Table:
    """The sweep in 80 columns: a long override list or error wraps, whole."""
    table = Table(title=f"sweep of {summary['stage']}: {len(summary['jobs'])} jobs, by {summary['headline']} "
                        f"({summary['best']} first) -> {Path(summary['sweep_dir']) / SWEEP}", title_justify="left")
    table.box, table.show_edge, table.collapse_padding = box.SIMPLE_HEAD, False, True
    table.add_column("job", overflow="fold")
    table.add_column("status", overflow="fold")
    shown = [c for c in summary["columns"] if any(number(j["metrics"].get(c)) for j in summary["jobs"])]
    spec = SPECS.get(summary["stage"])
    short = {m.key: m.short for m in spec.headline if m.short} if spec else {}
    for col in shown:
        table.add_column(short.get(col, col), justify="right", no_wrap=True)
    for job in summary["jobs"]:
        table.add_row(job["job"], job["status"], *[f"{job['metrics'][c]:.4g}" if number(job["metrics"].get(c))
                                                   else "-" for c in shown])
    return table
