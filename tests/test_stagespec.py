"""One declaration per stage (rlhf_cli/stagespec.py): every spec is complete, and every reader (cli, config,
pipeline, report, sweeps, charts, eval's defaults) takes a stage from it alone."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import pytest
from helpers import REPO
from omegaconf import OmegaConf

from rlhf_cli import stagespec
from rlhf_cli.artifacts import SCHEMA_VERSION
from rlhf_cli.stagespec import SPECS, Chart, Metric, StageSpec


@pytest.mark.parametrize("name", list(SPECS))
def test_every_spec_names_a_recipe_a_schema_and_a_yaml(name):
    spec = SPECS[name]
    recipe = importlib.import_module(spec.module)
    assert callable(getattr(recipe, "run" if spec.hydra else "main"))
    if spec.hydra:
        assert dataclasses.is_dataclass(stagespec.schema_class(name))
        defaults = OmegaConf.load(REPO / "conf" / f"{name}.yaml")["defaults"]
        assert defaults[0] == f"{name}_schema"  # the schema first, then groups


def test_the_pipeline_runs_the_stages_with_results_in_order():
    assert stagespec.pipeline_order() == ("sft", "reward", "ppo", "dpo", "eval")
    from rlhf_cli.stages import pipeline

    assert pipeline.ORDER == stagespec.pipeline_order()
    assert [n for n in pipeline.ORDER if SPECS[n].pipeline_default] == ["sft", "reward", "ppo", "eval"]


@pytest.mark.parametrize("broken, says", [
    (dict(charts=()), "declares its headline metrics, its pipeline summary and its charts"),
    (dict(summary=()), "declares its headline metrics, its pipeline summary and its charts"),
    (dict(rank_by=("eval_accuracy", "eval_margin")), "rank_by names headline metrics that have a direction"),
    (dict(rank_by=("no_such_metric",)), "rank_by names headline metrics"),
    (dict(headline=(Metric("eval_accuracy", "acc", best="high"),)), "has sweep columns"),
    (dict(results="metrics.csv"), "no known results file"),
    (dict(charts=(Chart("loss", "loss"),)), "a line chart has series"),
    (dict(samples_last_step=True), "samples_last_step needs a samples file"),
    (dict(schema=None), "a pipeline stage is a Hydra stage"),
])
def test_a_spec_that_lacks_what_a_reader_needs_is_refused(broken, says):
    spec = dataclasses.replace(SPECS["reward"], **broken)
    with pytest.raises(TypeError, match=says.replace("(", r"\(")):
        stagespec.check(spec)


NEW = StageSpec(
    name="newstage", module="rlhf_cli.stages.sft", help="a stage added by declaring it", schema="SFTConfig",
    artifact="policy", results="manifest", pipeline=5, path_keys=("model.name_or_path",),
    headline=(Metric("quality", "quality of the thing", "qual", "high"), Metric("cost", "cost", "cost", "low")),
    rank_by=("quality",), summary=("quality {quality:.2f}", ", cost {cost:.1f}"),
    charts=(Chart("quality", "quality over time", (("quality", "quality"),), "q"),), step_unit="round",
    samples="samples.jsonl", samples_last_step=True, eval_policy=True)


@pytest.fixture
def new_stage(monkeypatch, tmp_path):
    """SPECS with one more stage, and a finished run of it with metrics, samples and a manifest."""
    monkeypatch.setitem(SPECS, NEW.name, NEW)
    run_dir = tmp_path / "runs" / "e" / NEW.name
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "quality": s / 4}) + "\n"
                                                   for s in range(1, 5)))
    (run_dir / "samples.jsonl").write_text("".join(json.dumps({"step": s, "prompt": f"p{s}", "response": f"r{s}"})
                                                   + "\n" for s in (1, 2, 2)))
    (run_dir / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION, "created": "now",
                                                       "metrics": {"quality": 0.75, "cost": 3.0}, "config": {}}))
    return run_dir


def test_a_stage_declared_once_reaches_every_reader(new_stage):
    from rlhf_cli import cli, sweeps
    from rlhf_cli.stages import pipeline, report

    assert stagespec.pipeline_order()[-1] == NEW.name
    assert pipeline._headline(NEW.name, new_stage) == "quality 0.75, cost 3.0"
    rows = sweeps.summarise(NEW.name, new_stage.parent)["jobs"]
    assert rows[0]["metrics"] == {"quality": 0.75, "cost": 3.0}
    assert [r["response"] for r in report.read_samples(NEW, new_stage, 5)] == ["r2", "r2"]  # the last step's
    section, _ = report.stage_section(NEW.name, new_stage, dataclasses.make_dataclass("C", [("samples", int, 4)])())
    assert "quality of the thing" in section and ">0.75<" in section
    import io

    from rich.console import Console

    out = io.StringIO()
    cli._usage(Console(file=out, width=120))
    assert "a stage added by declaring it" in out.getvalue()


def test_a_new_stages_charts_are_drawn(new_stage):
    pytest.importorskip("matplotlib")
    from rlhf_cli import charts

    assert [p.name for p in charts.draw(NEW.name, new_stage)] == ["quality.png"]


def test_a_chart_kind_no_drawer_knows_fails_at_import(monkeypatch):
    import rlhf_cli.charts as charts

    odd = dataclasses.replace(SPECS["sft"], name="odd", charts=(Chart("x", "x", kind="radar"),))
    monkeypatch.setitem(SPECS, "odd", odd)
    with pytest.raises(TypeError, match="no drawer for chart kind"):
        importlib.reload(charts)
    monkeypatch.delitem(SPECS, "odd")
    importlib.reload(charts)


def test_eval_defaults_to_the_policy_stages_of_the_spec(tmp_path):
    from helpers import compose_stage

    from rlhf_cli.errors import ArtifactError
    from rlhf_cli.stages import eval as eval_stage

    cfg = compose_stage("eval", [f"root={tmp_path}", "experiment=e"], tmp_path / "e" / "eval")
    with pytest.raises(ArtifactError, match="sft"):  # the first default policy is the (absent) sft artifact
        eval_stage.resolve_policies(cfg)
    assert [n for n in stagespec.pipeline_order() if SPECS[n].eval_policy] == ["sft", "ppo", "dpo"]


def test_sweep_ranks_by_the_direction_the_spec_gives(tmp_path):
    from rlhf_cli.sweeps import summarise

    sweep_dir = tmp_path / "sft"
    for job, loss in (("a", 2.0), ("b", 1.0)):
        (sweep_dir / job / ".hydra").mkdir(parents=True)
        (sweep_dir / job / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION,
                                                                  "metrics": {"eval_loss": loss}}))
    summary = summarise("sft", sweep_dir)
    assert summary["headline"] == "eval_loss" and summary["best"] == "lowest"
    assert [Path(j["run_dir"]).name for j in summary["jobs"]] == ["b", "a"]


@pytest.mark.parametrize("name", [n for n, s in SPECS.items() if s.path_keys])
def test_every_path_key_of_a_spec_is_made_absolute_at_compose_time(name, tmp_path, monkeypatch):
    from helpers import compose_stage

    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = compose_stage(name, [f"{key}=./here" for key in SPECS[name].path_keys], tmp_path / "run")
    for key in SPECS[name].path_keys:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)  # a key the schema lacks fails here
        assert value == str(tmp_path / "here"), key


@pytest.mark.parametrize("name", [n for n, s in SPECS.items() if s.results == "manifest"])
def test_the_declared_metrics_are_what_a_run_records(name, trained_experiment, tmp_path):
    """objective= is checked against the spec's metrics before a run: they must be exactly what a run of the
    built-in task records (a new metric not declared would be refused as an objective; a declared one never
    written would pass the check and fail after training). A stage the shared experiment does not train (dpo)
    gets a short run here, on the shared SFT policy."""
    run_dir = trained_experiment / "demo" / name
    if not run_dir.is_dir():
        from helpers import FAST_REWARD, compose_stage
        from rlhf_cli.stages import dpo

        run_dir = tmp_path / name
        short = {"dpo": (dpo, [*FAST_REWARD, "train.max_steps=4", "train.eval_every=4", "dpo.kl_prompts=8",
                               "dpo.response_length=8"])}
        module, args = short[name]
        module.run(compose_stage(name, [*args, "experiment=demo", f"root={trained_experiment}"], run_dir))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    numbers = {k for k, v in manifest["metrics"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numbers <= set(SPECS[name].metrics)
    assert set(SPECS[name].metrics) - numbers <= set(SPECS[name].variant_metrics)  # the rest only some settings write
