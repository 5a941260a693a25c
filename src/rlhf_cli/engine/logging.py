"""Everything a stage shows or records: a rank-aware rich console, a progress bar with live metrics, summary
tables, and metrics.jsonl (plus TensorBoard event files when `logger=tensorboard`).

Only rank 0 prints or writes; the other ranks get silent versions of the same objects. JSON lines are strict JSON:
a NaN or infinite number is written as null.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from rlhf_cli import artifacts
from rlhf_cli.errors import ConfigError


def console(is_main: bool) -> Console:
    return Console(quiet=not is_main, highlight=False)


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl; mirrors scalars to TensorBoard if asked."""

    def __init__(self, run_dir: Path, enabled: bool, logger: str, resume_step: int | None = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        try:
            if resume_step is None:
                self.path.write_text("")
            else:  # drop what was logged after the checkpoint we resume from: those steps run again
                truncate_jsonl(self.path, resume_step)
        except OSError as exc:
            raise artifacts.storage_error("metrics.jsonl", exc, hint="check that the run directory is writable") from exc
        if logger == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ConfigError(
                    "logger=tensorboard needs the tensorboard package",
                    hint="pip install 'rlhf-cli[tensorboard]', or use logger=none",
                ) from exc
            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_step)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **metrics}
        append_jsonl(self.path, [row])
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def append_jsonl(path: Path, rows: list[dict]) -> None:
    """Append rows as strict JSON lines; a failed write is a StorageError naming the file."""
    try:
        with path.open("a") as f:
            f.write("".join(artifacts.dumps(row) + "\n" for row in rows))
    except OSError as exc:
        raise artifacts.storage_error(path.name, exc, hint="free space or fix the permissions of the run directory, "
                                                           "then continue with resume=true") from exc


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the rows of a JSON-lines log up to `step` (a resumed run logs the later steps again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    artifacts.write_text_atomic(path, "".join(line + "\n" for line in kept))


def progress_bar(con: Console) -> Progress:
    """A rich progress bar whose `metrics` field shows live values: update(task, metrics='loss 1.2 ...')."""
    return Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[metrics]}"),
        console=con,
        transient=False,
        disable=con.quiet,
    )


def metrics_text(metrics: dict) -> str:
    return "  ".join(f"{k} {fmt(v)}" for k, v in metrics.items())


def summary_table(title: str, rows: dict) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="cyan")
    table.add_column("value", justify="right")
    for key, value in rows.items():
        table.add_row(key, fmt(value))
    return table
