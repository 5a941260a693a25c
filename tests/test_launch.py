"""engine.launch: `rlhf pipeline` (and the tests' run_cli) start each stage in a process of its own, forked from a
server that imported torch, transformers and Hydra once. A forked child behaves as `python -m rlhf_cli` does (output,
exit code, working directory, environment) and trains the same weights, bit for bit; it is killed past its
timeout; where the environment would change what the libraries read at import, the process starts fresh."""

from __future__ import annotations

import subprocess

import pytest

from helpers import FAST_SFT
from rlhf_cli import __version__
from rlhf_cli.engine import launch

needs_fork = pytest.mark.skipif(not launch.available(), reason="no forkserver here (not Linux, or turned off)")


# both start a process (`slow`); fresh: a new interpreter
@pytest.fixture(params=[pytest.param(how, marks=pytest.mark.slow) for how in ("forked", "fresh")])
def how(request, monkeypatch):
    if request.param == "forked" and not launch.available():
        pytest.skip("no forkserver here (not Linux, or turned off)")
    if request.param == "fresh":
        monkeypatch.setenv(launch.FRESH_ENV, "1")
    return request.param


def test_a_child_prints_and_exits_as_the_cli_does(how, tmp_path, capfd):
    out, err = tmp_path / "out", tmp_path / "err"
    assert launch.run_cli(["--version"], cwd=tmp_path, stdout=out, stderr=err) == 0
    assert out.read_text().count(__version__) == 1  # printed once, by the child
    assert launch.run_cli(["no-such-stage"], cwd=tmp_path, stdout=out, stderr=err) == 2
    assert "unknown stage 'no-such-stage'" in err.read_text()
    assert launch.run_cli(["--version"]) == 0  # no files: the child's output goes where ours goes
    assert capfd.readouterr().out.count(__version__) == 1


def test_a_child_runs_in_its_directory_with_its_environment(how, tmp_path):
    """The child works in the directory given (a relative root= is below it) and prints as wide as the COLUMNS it
    was given."""
    widths = {}
    for columns in (60, 160):
        out = tmp_path / f"out{columns}"
        env = {**launch.os.environ, "COLUMNS": str(columns)}
        assert launch.run_cli([], cwd=tmp_path, env=env, stdout=out) == 0  # bare `rlhf`: the stages, one line each
        widths[columns] = max(len(line) for line in out.read_text().splitlines())
    assert widths[60] <= 60 < widths[160]
    err = tmp_path / "err"
    assert launch.run_cli(["sft", "data.path=missing.jsonl", f"root={tmp_path}"], cwd=tmp_path, stderr=err) == 2
    assert f"relative paths start from {tmp_path}" in err.read_text()


@needs_fork
def test_only_runtime_variables_may_differ_from_the_servers():
    launch.start()
    same = dict(launch.os.environ)
    assert launch.forks({**same, "COLUMNS": "200", "COMP_LINE": "rlhf s"})
    assert not launch.forks({**same, "HF_HOME": "/elsewhere"})  # read when huggingface_hub is imported
    assert not launch.forks({k: v for k, v in same.items() if k != "HF_HUB_OFFLINE"})


def test_a_child_past_its_timeout_is_killed(how, tmp_path):
    with pytest.raises(subprocess.TimeoutExpired):
        launch.run_cli(["sft", "experiment=slow"], cwd=tmp_path, stdout=tmp_path / "o", stderr=tmp_path / "e",
                       timeout=1)


@pytest.mark.slow
@needs_fork
def test_a_forked_stage_trains_what_a_fresh_process_trains(tmp_path, monkeypatch):
    args = ["sft", *FAST_SFT, f"root={tmp_path}"]
    assert launch.run_cli([*args, "experiment=forked"], stdout=tmp_path / "o1") == 0
    monkeypatch.setenv(launch.FRESH_ENV, "1")
    assert launch.run_cli([*args, "experiment=fresh"], stdout=tmp_path / "o2") == 0
    forked, fresh = (tmp_path / name / "sft" / "model" / "model.safetensors" for name in ("forked", "fresh"))
    assert forked.read_bytes() == fresh.read_bytes()
