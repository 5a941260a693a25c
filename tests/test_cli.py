"""The `rlhf` command as a user runs it: dispatch, Hydra flags, errors with exit code 2, a sweep's directories (a
run's own directory, its refusal to overwrite and its replacement: test_cli_safety)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import FAST_SFT, run_cli

pytestmark = pytest.mark.slow
RLHF = Path(sys.executable).parent / "rlhf"


def _one_error(proc, *needles):
    """Exit 2, a message naming each needle, no traceback."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_console_script_lists_the_stages(tmp_path):
    import subprocess

    proc = subprocess.run([str(RLHF), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0
    assert "sft" in proc.stdout and "fine-tune" in proc.stdout
    assert run_cli([], tmp_path).stdout == proc.stdout  # bare `rlhf` shows the same


def test_unknown_stage_lists_valid_ones(tmp_path):
    _one_error(run_cli(["sfx"], tmp_path), "unknown stage 'sfx'", "sft")


def test_stage_help_and_cfg(tmp_path):
    helped = run_cli(["sft", "--help"], tmp_path)
    assert helped.returncode == 0
    assert "model: " in helped.stdout and "tiny" in helped.stdout and "optim:" in helped.stdout
    cfg = run_cli(["sft", "--cfg", "job", "optim.lr=0.02"], tmp_path)
    assert cfg.returncode == 0 and "lr: 0.02" in cfg.stdout and "max_steps:" in cfg.stdout
    assert not (tmp_path / "runs").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("override,needles", [
    ("optim.lrr=3e-4", ["unknown key optim.lrr in the sft config; did you mean optim.lr?"]),
    ("train.max_steps=many", ["train.max_steps", "many"]),
    ("data=hh_sft", ["data.path"]),
    ("model=nope", ["model=nope is not an option of group model", "tiny"]),
    ("train.micro_batch_size=0", ["train.micro_batch_size=0 must be > 0"]),
])
def test_config_mistakes_are_one_message_and_exit_2(override, needles, tmp_path):
    proc = run_cli(["sft", override], tmp_path)
    _one_error(proc, *needles)
    assert "use +" not in proc.stderr  # Hydra's advice, wrong for a structured config
    assert not (tmp_path / "runs" / "default" / "sft" / "model").exists()


def test_misspelled_key_in_a_sweep_or_a_pipeline_names_the_closest_key(tmp_path):
    """`-m` and `rlhf pipeline` report the same one line: the key, the stage, the closest key; no `+key=`."""
    sweep = run_cli(["sft", "-m", "optim.lrr=0.1,0.2"], tmp_path)
    _one_error(sweep, "unknown key optim.lrr in the sft config; did you mean optim.lr?", "`rlhf sft --help`")
    piped = run_cli(["pipeline", "sft.optim.lrr=1"], tmp_path)
    _one_error(piped, "unknown key optim.lrr in the sft config; did you mean sft.optim.lr?")
    for proc in (sweep, piped):
        assert "+" not in proc.stderr and len(proc.stderr.splitlines()) == 2, proc.stderr


def test_multirun_sweep_gives_one_artifact_per_job_and_a_table(tmp_path):
    proc = run_cli(["sft", "-m", "experiment=sweep", "optim.lr=1e-3,3e-3,nan", *FAST_SFT, "train.max_steps=8"],
                   tmp_path)
    assert proc.returncode == 2, proc.stderr  # the nan job failed; the others ran
    sweep_dir = tmp_path / "runs" / "sweep" / "sft"
    jobs = sorted(p for p in sweep_dir.iterdir() if (p / "manifest.json").exists())
    assert [p.name for p in jobs] == ["optim.lr-0.001", "optim.lr-0.003"]  # named after the swept key only
    lrs = [json.loads((p / "manifest.json").read_text())["config"]["optim"]["lr"] for p in jobs]
    assert lrs == [1e-3, 3e-3]
    a, b = (load_file(p / "model" / "model.safetensors") for p in jobs)
    assert any(not (a[k] == b[k]).all() for k in a)

    summary = json.loads((sweep_dir / "sweep.json").read_text())  # best (lowest held-out loss) first, failed last
    losses = {p.name: json.loads((p / "manifest.json").read_text())["metrics"]["eval_loss"] for p in jobs}
    done = [j for j in summary["jobs"] if j["status"] == "done"]
    assert [j["metrics"]["eval_loss"] for j in done] == sorted(losses.values())
    assert {j["job"] for j in done} == {"optim.lr=0.001", "optim.lr=0.003"}  # the swept override, not FAST_SFT
    assert summary["jobs"][-1]["status"] == "config error: optim.lr=nan is not a finite number"
    assert "sweep of sft: 3 jobs, by eval_loss (lowest first)" in proc.stdout


def test_bad_data_file_is_one_message_and_exit_2(tmp_path):
    data = tmp_path / "demos.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"\n')
    proc = run_cli(["sft", f"data.path={data}", *FAST_SFT], tmp_path)
    _one_error(proc, "demos.jsonl", "line 2")
    assert not (tmp_path / "runs" / "default" / "sft" / "manifest.json").exists()


def test_missing_model_is_one_message_and_exit_2(tmp_path):
    proc = run_cli(["sft", f"model.name_or_path={tmp_path / 'no-such-model'}", *FAST_SFT], tmp_path)
    _one_error(proc, "no-such-model")


def test_shell_completion_completes_stages_and_keys(tmp_path):
    script = run_cli(["sft", "-sc", "install=bash"], tmp_path)
    assert script.returncode == 0 and "hydra_bash_completion rlhf" in script.stdout
    stage = run_cli(["-sc", "query=bash"], tmp_path, env={"COMP_LINE": "rlhf s", "COMP_POINT": "6"})
    assert stage.stdout.split() == ["sft"]
    key = run_cli(["-sc", "query=bash"], tmp_path, env={"COMP_LINE": "rlhf sft optim.l", "COMP_POINT": "16"})
    assert key.returncode == 0 and key.stdout.split() == ["optim.lr="]


def test_hydra_info_flag(tmp_path):
    proc = run_cli(["sft", "--info"], tmp_path)
    assert proc.returncode == 0 and "Config search path" in proc.stdout
