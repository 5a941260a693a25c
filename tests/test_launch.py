"""engine.launch: the pipeline's stages run in processes of their own, forked from a parent that imported torch and
transformers once; a forked child behaves as `python -m rlhf_cli` does (output, exit code) and trains the same
weights, bit for bit."""

from __future__ import annotations

import threading

import pytest

from helpers import FAST_SFT
from rlhf_cli import __version__
from rlhf_cli.engine import launch


@pytest.mark.parametrize("fork", [True, False])
def test_a_child_prints_and_exits_as_the_cli_does(fork, capfd):
    if fork and not launch.can_fork():
        pytest.skip("no fork here (not Linux, or an accelerator build of torch)")
    assert launch.run_cli(["--version"], fork=fork) == 0
    assert launch.run_cli(["no-such-stage"], fork=fork) == 2
    out, err = capfd.readouterr()
    assert out.count(__version__) == 1  # printed once, by the child: nothing returned into this process's stack
    assert "unknown stage 'no-such-stage'" in err


def test_no_fork_while_another_thread_runs():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert launch.can_fork() is False
    finally:
        stop.set()
        thread.join()


@pytest.mark.slow
def test_a_forked_stage_trains_what_a_fresh_process_trains(tmp_path):
    launch.preload()
    if not launch.can_fork():
        pytest.skip("no fork here (not Linux, or an accelerator build of torch)")
    args = ["sft", *FAST_SFT, f"root={tmp_path}"]
    assert launch.run_cli([*args, "experiment=forked"], fork=True) == 0
    assert launch.run_cli([*args, "experiment=fresh"], fork=False) == 0
    forked, fresh = (tmp_path / name / "sft" / "model" / "model.safetensors" for name in ("forked", "fresh"))
    assert forked.read_bytes() == fresh.read_bytes()
