"""Seeing what happened: plain progress lines in logs, tables in 80 columns, PNG charts of every stage, and the
HTML report (the pipeline's end-to-end run checks the real report: test_pipeline.py)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from helpers import run_cli
from rich.console import Console

from rlhf_cli import charts
from rlhf_cli.charts import abbreviate
from rlhf_cli.engine.logging import LineProgress, progress_bar

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


def test_progress_in_a_log_is_one_timestamped_line_per_log_step():
    out = io.StringIO()
    con = Console(file=out, width=80)  # a file: not a terminal
    with progress_bar(con, every=2) as bar:
        assert isinstance(bar, LineProgress)
        task = bar.add_task("sft", total=5, completed=0, metrics="")
        for step in range(1, 6):
            bar.update(task, completed=step, metrics=f"loss {10 - step} lr 0.001 and a long tail " * 3)
    lines = out.getvalue().splitlines()
    assert [re.search(r"sft (\d)/5", line).group(1) for line in lines] == ["2", "4", "5"]  # every 2 and the last
    assert all(re.match(STAMP + r" sft \d/5 \(\d+%\) elapsed \d:\d\d:\d\d eta ", line) for line in lines)
    assert "loss 8 lr 0.001" in lines[0] and len(lines[0]) > 80  # never broken: one step, one line


def test_abbreviate_keeps_both_ends():
    assert abbreviate("short", 10) == "short"
    cut = abbreviate("an_experiment_with_a_long_name/ppo", 16)
    assert len(cut) == 16 and cut.startswith("an_exp") and cut.endswith("name/ppo") and "…" in cut


def test_eval_table_fits_80_columns_and_keeps_name_ends():
    from rlhf_cli.stages.eval import show_tables

    def row(name: str, score: float) -> dict:
        return {"name": name, "score": score, "score_se": 0.094, "gold": 0.4212, "gold_se": 0.05, "kl": 3.813,
                "kl_se": 0.17, "response_length": 4.121, "stop_rate": 0.9961, "win_rate": 0.9258, "win_rate_se": 0.015}

    names = ["an_experiment_with_a_rather_long_name/sft", "an_experiment_with_a_rather_long_name/ppo"]
    report = {"prompts": {"count": 256}, "baseline": names[0], "policies": [row(names[0], 3.63), row(names[1], 5.004)],
              "curves": {names[1]: [{"step": 0, "kl": 0.0, "kl_se": 0.0, "score": 3.6, "score_se": 0.1, "gold": 0.4,
                                     "gold_se": 0.05}]}}
    out = io.StringIO()
    show_tables(Console(file=out, width=80), report, True, Path("/x"), [])
    lines = out.getvalue().splitlines()
    assert max(map(len, lines)) <= 80
    rows = [line for line in lines if "3.63±0.094" in line or "5.00±0.094" in line]
    assert len(rows) == 2 and rows[0].split()[0].endswith("/sft") and rows[1].split()[0].endswith("/ppo")
    assert all("0.421±0.05" in r and "3.81±0.17" in r and "0.926±0.015" in r for r in rows)  # numbers whole


def _metrics(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.slow
def test_charts_of_every_stage_are_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    _metrics(tmp_path / "sft" / "metrics.jsonl", [{"step": s, "loss": 3 / s, "lr": 1e-3, "grad_norm": 1.0,
                                                   **({"eval_loss": 3.5 / s} if s % 2 == 0 else {})}
                                                  for s in range(1, 9)])
    _metrics(tmp_path / "ppo" / "metrics.jsonl", [{"step": s, "score": s, "kl": 0.1 * s, "entropy": 2.0,
                                                   "clipfrac": 0.1, "value_loss": 1.0} for s in range(1, 5)])
    sft = charts.draw("sft", tmp_path / "sft")
    ppo = charts.draw("ppo", tmp_path / "ppo")
    assert [p.name for p in sft] == ["loss.png", "grad_norm.png", "lr.png"]
    assert "gold.png" not in [p.name for p in ppo] and "kl.png" in [p.name for p in ppo]  # no gold logged: no chart
    for path in sft + ppo:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 300
    points = [{"step": s, "kl": k, "kl_se": 0.1, "score": 3 + k, "score_se": 0.1, "gold": 0.5, "gold_se": 0.05}
              for s, k in ((0, 0.0), (10, 1.0))]
    policy = {"name": "e/sft", "score": 3.0, "score_se": 0.1, "kl": 0.0, "kl_se": 0.0, "win_rate": 0.5,
              "win_rate_se": 0.0, "gold": 0.4, "gold_se": 0.05}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval.json").write_text(json.dumps({"policies": [policy], "baseline": "e/sft",
                                                             "curves": {"e/ppo": points}}))
    assert [p.name for p in charts.draw("eval", tmp_path / "eval")] == ["comparison.png", "overoptimisation.png"]
    assert not list(tmp_path.rglob(".*.tmp-*"))  # written under a temporary name, then renamed


def test_a_chart_is_redrawn_only_when_its_source_changed(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    rows = [{"step": s, "loss": 3 / s, "lr": 1e-3, "grad_norm": 1.0} for s in range(1, 5)]
    _metrics(tmp_path / "metrics.jsonl", rows)
    first = charts.draw("sft", tmp_path)
    drawn = {p: p.read_bytes() for p in first}
    assert len(drawn) == 3 and all(charts.stamp_of(p) for p in first)
    real_figure = charts.figure

    def no_drawing(*args, **kwargs):
        raise AssertionError("redrawn although metrics.jsonl did not change")

    monkeypatch.setattr(charts, "figure", no_drawing)
    assert charts.draw("sft", tmp_path) == first  # `rlhf report` after the stage: the same PNGs, not drawn again
    assert {p: p.read_bytes() for p in first} == drawn
    monkeypatch.setattr(charts, "figure", real_figure)
    _metrics(tmp_path / "metrics.jsonl", [*rows, {"step": 5, "loss": 0.1, "lr": 1e-3, "grad_norm": 1.0}])
    assert charts.draw("sft", tmp_path) == first  # a resumed run logged one more step: every chart drawn again
    assert all(p.read_bytes() != drawn[p] for p in first)
    assert charts.stamp_of(tmp_path / "metrics.jsonl") is None  # not a PNG


def test_without_matplotlib_there_are_no_charts_and_a_hint(tmp_path, monkeypatch):
    from rlhf_cli.engine.logging import charts_row

    monkeypatch.setattr(charts, "available", lambda: False)
    _metrics(tmp_path / "metrics.jsonl", [{"step": 1, "loss": 1.0}])
    assert charts.draw("sft", tmp_path) == [] and not (tmp_path / "charts").exists()
    assert charts_row([], tmp_path) == {"charts": "charts need matplotlib: pip install 'rlhf-cli[plots]'"}


def test_report_of_an_experiment_with_no_runs_is_one_error(tmp_path):
    proc = run_cli(["report", "experiment=nothing"], tmp_path)
    assert proc.returncode == 2
    assert "holds no finished stage" in proc.stderr and "rlhf pipeline experiment=nothing" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs" / "nothing").exists()


def test_report_of_a_swept_stage_shows_its_table(tmp_path):
    from helpers import compose_stage

    from rlhf_cli.artifacts import SCHEMA_VERSION
    from rlhf_cli.stages import report
    from rlhf_cli.sweeps import summarise

    sweep_dir = tmp_path / "runs" / "s" / "reward"
    for job, accuracy in (("optim.lr-0.001", 0.61), ("optim.lr-0.01", 0.74)):
        (sweep_dir / job / ".hydra").mkdir(parents=True)
        (sweep_dir / job / ".hydra" / "overrides.yaml").write_text(f"- experiment=s\n- {job.replace('-', '=')}\n")
        (sweep_dir / job / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION,
                                                                  "metrics": {"eval_accuracy": accuracy}}))
    summary = summarise("reward", sweep_dir)
    assert [j["job"] for j in summary["jobs"]] == ["optim.lr=0.01", "optim.lr=0.001"]  # highest accuracy first
    cfg = compose_stage("report", [f"root={tmp_path / 'runs'}", "experiment=s"], tmp_path / "runs" / "s")
    out = report.run(cfg)
    page = Path(out["report"]).read_text()
    assert "reward (a sweep)" in page and page.index(">optim.lr=0.01<") < page.index(">optim.lr=0.001<")
    assert ">0.74<" in page and ">0.61<" in page
