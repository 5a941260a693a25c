"""Everything a stage records: metrics.jsonl (one strict JSON object per logged step), other JSON-lines logs
(samples.jsonl), and the experiment trackers of `logger=[...]` (engine/trackers.py) that get the same numbers.

Only rank 0 writes; the other ranks get a MetricsLog that does nothing. JSON lines are strict JSON: a NaN or
infinite number is written as null. Printing is engine/logging.py's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rlhf_cli import artifacts
from rlhf_cli.engine.trackers import Trackers


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl and reports it to the trackers `cfg.logger` names
    (engine/trackers.py); rank 0 only. `close` ends the trackers with the run's summary and files."""

    def __init__(self, run_dir: Path, enabled: bool, cfg, resume_step: int | None = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        if enabled:
            try:
                if resume_step is None:
                    self.path.write_text("")
                else:  # drop what was logged after the checkpoint we resume from: those steps run again
                    truncate_jsonl(self.path, resume_step)
            except OSError as exc:
                raise artifacts.storage_error("metrics.jsonl", exc,
                                              hint="check that the run directory is writable") from exc
        self.trackers = Trackers(cfg, run_dir, enabled, resume_step)
        if self.trackers.open:
            OPEN.append(self)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **metrics}
        append_jsonl(self.path, [row])
        self.trackers.log(step, metrics)

    def close(self, summary: dict | None = None, files: dict | None = None, ok: bool = True) -> None:
        """End the trackers: the final metrics, the paths of what the stage wrote ({name: path or [paths]})."""
        self.trackers.finish(summary, files, ok)
        if self in OPEN:
            OPEN.remove(self)


OPEN: list[MetricsLog] = []  # logs whose trackers are still open: a stage that fails ends them as failed


def close_failed() -> None:
    """End the trackers of every log still open, as failed runs (engine.train.process, when a stage raises)."""
    for log in list(OPEN):
        log.close(ok=False)


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
