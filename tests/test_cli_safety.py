"""The same promises through the `rlhf` command: a run writes its run directory (Hydra's record inside it); one
message and the documented exit code for a refusal, a divergence, an unsafe experiment name, a full disk, a read-only
run directory and a damaged checkpoint; finished artifacts (Hydra's record included) and the last good checkpoint
survive each of them, and a killed replacement leaves the old artifact in place. One sft run, copied by the tests."""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import FAST_SFT, run_cli
from rlhf_cli import artifacts

pytestmark = pytest.mark.slow


def _snapshot(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()
            and ".overwrite" not in p.relative_to(run_dir).parts}


def _one_message(proc, code: int, *needles: str) -> None:
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def _run_limited(args: list[str], cwd: Path, preexec) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf_cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, preexec_fn=preexec, env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple:
    """One `rlhf sft experiment=demo` with FAST_SFT (checkpoints at steps 12 and 24): what it printed and its run
    directory, which the tests copy."""
    cwd = tmp_path_factory.mktemp("first")
    proc = run_cli(["sft", "experiment=demo", *FAST_SFT], cwd)
    assert proc.returncode == 0, proc.stderr
    return proc, cwd / "runs" / "demo" / "sft"


@pytest.fixture
def finished(first_run, tmp_path) -> Path:
    """runs/demo/sft under tmp_path (the working directory of the test's commands): a finished artifact."""
    return shutil.copytree(first_run[1], tmp_path / "runs" / "demo" / "sft")


def test_a_run_writes_its_run_directory(first_run):
    proc, run_dir = first_run
    for name in ("manifest.json", "config.yaml", "metrics.jsonl", "samples.jsonl", "model", "checkpoints", ".hydra"):
        assert (run_dir / name).exists(), name
    assert (run_dir / ".hydra" / "overrides.yaml").is_file()
    assert not (run_dir.parents[2] / "outputs").exists()  # Hydra's files live inside the run directory
    assert "sft summary" in proc.stdout
    assert "examples_per_step 16 = micro_batch_size 8 x grad_accum_steps 2" in proc.stdout


def test_refusals_and_failed_replacements_leave_the_artifact_and_its_hydra_record(finished, tmp_path):
    before = _snapshot(finished)

    def untouched() -> bool:  # every file byte for byte, and no .overwrite/ left beside them
        files = {str(p.relative_to(finished)): p.read_bytes() for p in sorted(finished.rglob("*")) if p.is_file()}
        return files == before and not (finished / ".overwrite").exists()

    _one_message(run_cli(["sft", "experiment=demo", *FAST_SFT, "train.max_steps=12"], tmp_path), 2,
                 "already holds a finished sft artifact", "overwrite=true")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    _one_message(run_cli(["sft", "experiment=demo", *FAST_SFT, "overwrite=true", f"data.path={bad}"], tmp_path), 2,
                 "completion")
    assert untouched()
    # a config that fails only once the data is seen (after the replacement's directory was prepared)
    _one_message(run_cli(["sft", "experiment=demo", *FAST_SFT, "overwrite=true", "data.toy.num_train=8"], tmp_path),
                 2, "only 8 training examples")
    assert untouched()
    _one_message(run_cli(["sft", "experiment=demo", *FAST_SFT, "overwrite=true", "optim.lr=1e6"], tmp_path), 3,
                 "training diverged: sft: the", "no checkpoint was written yet", "lower optim.lr")
    assert untouched()  # diverged before its first checkpoint: nothing to resume either
    _one_message(run_cli(["sft", "experiment=demo", *FAST_SFT, "overwrite=true", "optim.lr=nan"], tmp_path), 2,
                 "optim.lr=nan is not a finite number")
    assert untouched()
    ok = run_cli(["sft", "experiment=demo", *FAST_SFT, "overwrite=true", "train.max_steps=12"], tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "train.max_steps=12" in (finished / ".hydra" / "overrides.yaml").read_text()
    assert json.loads((finished / "manifest.json").read_text())["metrics"]["steps"] == 12


@pytest.mark.parametrize("name", ["../../escape", "team/a", "/tmp/rlhf-abs-experiment"])
def test_unsafe_experiment_names_write_nothing(name, tmp_path):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    _one_message(run_cli(["sft", f"experiment={name}", *FAST_SFT], work), 2, "is not a single name")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["a", "a/b"]
    assert not Path("/tmp/rlhf-abs-experiment").exists()


def _unfinished(first_run: tuple, tmp_path: Path) -> Path:
    """runs/x/sft as a kill after checkpoint step-12 of 24 leaves it (made from a finished run, deterministically)."""
    run_dir = shutil.copytree(first_run[1], tmp_path / "runs" / "x" / "sft")
    (run_dir / "manifest.json").unlink()
    shutil.rmtree(run_dir / "model")
    shutil.rmtree(run_dir / "checkpoints" / "step-24")
    return run_dir


def test_a_full_disk_while_checkpointing_keeps_the_last_good_checkpoint(first_run, tmp_path):
    run_dir = _unfinished(first_run, tmp_path)
    good = _snapshot(run_dir / "checkpoints")
    # the final checkpoint (step 24) holds no optimizer state: half the weights is what cannot be written
    limit = (run_dir / "checkpoints" / "step-12" / "model.safetensors").stat().st_size // 2

    def small_files():  # writes past `limit` bytes fail with EFBIG, as writes to a full disk fail with ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = _run_limited(["sft", "experiment=x", "resume=true", *FAST_SFT], tmp_path, small_files)
    _one_message(proc, 2, "storage error: could not write checkpoint step-24", str(run_dir / "checkpoints" / "step-12"))
    assert _snapshot(run_dir / "checkpoints") == good and not (run_dir / "manifest.json").exists()
    resumed = run_cli(["sft", "experiment=x", "resume=true", *FAST_SFT], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a = (first_run[1] / "model" / "model.safetensors").read_bytes()  # the uninterrupted run's
    assert (run_dir / "model" / "model.safetensors").read_bytes() == a


def _without_root_override():
    """Drop the capabilities that let root write anywhere, so file permissions apply as to any user."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_a_read_only_run_directory_is_one_message(finished, tmp_path):
    before = _snapshot(finished)
    for path in [finished, *finished.rglob("*")]:
        if path.is_dir():
            path.chmod(0o555)
    try:
        proc = _run_limited(["sft", "experiment=demo", "overwrite=true", *FAST_SFT], tmp_path,
                            _without_root_override)
    finally:
        for path in [finished, *finished.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
    _one_message(proc, 2, "storage error", str(finished))
    assert _snapshot(finished) == before


def test_a_tampered_checkpoint_is_refused_on_resume(first_run, tmp_path):
    run_dir = _unfinished(first_run, tmp_path)
    (run_dir / "checkpoints" / "step-12" / "optimizer.pt").write_bytes(b"not a checkpoint")
    _one_message(run_cli(["sft", "experiment=x", "resume=true", *FAST_SFT], tmp_path), 2,
                 "artifact error: checkpoint", "step-12 is damaged", "optimizer.pt")


def test_a_killed_replacement_leaves_the_old_artifact_usable(finished, tmp_path):
    before = _snapshot(finished)
    long = [*FAST_SFT, "train.max_steps=80", "train.checkpoint_every=20", "train.num_samples=0"]
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_cli", "sft", "experiment=demo", "overwrite=true", *long],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staged = finished / ".overwrite" / "checkpoints" / "step-20" / "state.json"
    deadline = time.time() + 120
    while not staged.exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _snapshot(finished) == before
    # the old SFT artifact is still a valid upstream: the check the next stage makes before it loads the model
    model_dir, parent = artifacts.upstream(None, str(tmp_path / "runs"), "demo", "sft", "policy")
    assert model_dir == str(finished / "model")
    assert parent["model_sha256"] == json.loads(before["manifest.json"])["model_sha256"]
    resumed = run_cli(["sft", "experiment=demo", "overwrite=true", "resume=true", *long], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and not (finished / ".overwrite").exists()
    assert json.loads((finished / "manifest.json").read_text())["metrics"]["steps"] == 80
