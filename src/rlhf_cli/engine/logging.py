"""Everything a stage shows: a rank-aware rich console, live progress (a rich bar on a terminal, plain timestamped
lines when stdout is a file or a pipe, as in a batch job) and summary tables that fit 80 columns. What a stage
records (metrics.jsonl, samples, the experiment trackers) is engine/recording.py's.

Only rank 0 prints; the other ranks get silent versions of the same objects.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from rlhf_cli import charts


def console(is_main: bool) -> Console:
    """Rank 0's console (the others print nothing). In a log file (not a terminal) a line of text is never broken:
    one message, one line, for grep; tables still fit 80 columns."""
    con = Console(quiet=not is_main, highlight=False)
    con.soft_wrap = not con.is_terminal
    return con


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def progress_bar(con: Console, every: int = 1):
    """Live progress of a loop: update(task, completed=n or advance=1, metrics='loss 1.2 ...'). On a terminal, a
    rich bar redrawn in place; otherwise (stdout is a file, a pipe, a batch job's log) `LineProgress`, one plain
    timestamped line every `every` steps and at the last, so `tail -f` on the log shows the run moving."""
    if not con.is_terminal:
        return LineProgress(con, every)
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


class LineProgress:
    """The progress bar's stand-in for logs, with the same calls (add_task, update, used as a context):

        2026-11-27 08:12:03 sft 120/300 (40%) elapsed 0:00:31 eta 0:00:46 loss 1.2 eval 1.3 lr 0.001

    one line (never wrapped) when a task reaches a multiple of `every` steps, and at its last step."""

    def __init__(self, con: Console, every: int = 1):
        self.con, self.every, self.tasks = con, max(int(every), 1), []

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: int, completed: int = 0, metrics: str = "") -> int:
        self.tasks.append({"description": description, "total": total, "completed": completed, "start": completed,
                           "t0": time.monotonic(), "metrics": metrics})
        return len(self.tasks) - 1

    def update(self, task: int, completed: int | None = None, advance: int = 0, metrics: str | None = None) -> None:
        t = self.tasks[task]
        before = t["completed"]
        t["completed"] = (completed if completed is not None else before) + advance
        if metrics is not None:
            t["metrics"] = metrics
        n = t["completed"]
        if n != before and (n % self.every == 0 or n >= t["total"]):
            self.con.print(self.line(t), markup=False, highlight=False, soft_wrap=True)

    @staticmethod
    def line(t: dict) -> str:
        elapsed = time.monotonic() - t["t0"]
        done, total = t["completed"], t["total"]
        rate = (done - t["start"]) / elapsed if elapsed > 0 else 0.0
        eta = clock((total - done) / rate) if rate > 0 else "?"
        percent = f" ({100 * done / total:.0f}%)" if total else ""
        return (f"{time.strftime('%Y-%m-%d %H:%M:%S')} {t['description']} {done}/{total}{percent} elapsed "
                f"{clock(elapsed)} eta {eta} {t['metrics']}").rstrip()


def clock(seconds: float) -> str:
    """0:01:05"""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def metrics_text(metrics: dict) -> str:
    return "  ".join(f"{k} {fmt(v)}" for k, v in metrics.items())


def charts_row(pngs: list[Path], run_dir: Path) -> dict:
    """The summary-table row that names a stage's charts (or says what drawing them needs)."""
    if not charts.available():
        return {"charts": charts.MISSING}
    return {"charts": f"{run_dir / charts.DIR}/ ({', '.join(p.name for p in pngs)})"} if pngs else {}


def summary_table(title: str, rows: dict) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="cyan", overflow="fold")
    table.add_column("value", justify="right", overflow="fold")  # a long path wraps, whole
    for key, value in rows.items():
        table.add_row(key, fmt(value))
    return table
