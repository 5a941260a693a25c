"""A real kill (SIGKILL, no handlers, no clean-up) mid-run, then resume=true, reproduces the uninterrupted run:
weights, metrics and logs. One run per way of holding a run's state: plain checkpoint files (reward: the model and
its head), PPO's several models with their optimizer and controller, and sharded checkpoints (FSDP on one process,
with LoRA: only the adapters). The reward and PPO runs are the shared experiment's, killed and resumed in a copy of
it and compared with the shared (uninterrupted) ones. The 2-process runs (DDP and FSDP) are test_distributed's;
in-process resumes (killed while publishing, at an epoch boundary, after a refusal) are test_run_safety's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import EXPERIMENT, FAST_SFT, run_cli

pytestmark = pytest.mark.slow

# sft with LoRA under FSDP, which no shared run has: long enough to be killed after its first checkpoint and still
# have steps to go, with an evaluation on each side of the kill. The shared runs checkpoint at steps 12, 24, 36
# (reward, of 40) and iterations 2, 4 (ppo).
LORA_FSDP_SFT = [*FAST_SFT, "train.max_steps=80", "train.checkpoint_every=20", "train.eval_every=40",
                 "train.keep_checkpoints=3", "train.num_samples=0", "model.lora.r=4", "train.strategy=fsdp"]
KILL_AFTER = {"reward": 12, "ppo": 2, "sft": 20, "grpo": 2}


def _weights(run_dir: Path) -> dict:
    weights = load_file(run_dir / "model" / "model.safetensors")
    head = run_dir / "model" / "reward_head.safetensors"
    return {**weights, **({f"head.{k}": v for k, v in load_file(head).items()} if head.exists() else {})}


@pytest.mark.parametrize("case", ["reward", "ppo", "sft", "grpo"], ids=["reward", "ppo", "sft-lora-fsdp", "ppo-grpo"])
def test_resume_after_kill_gives_identical_weights(case, tmp_path, request):
    """With LoRA the checkpoints hold only the adapters, the frozen base is loaded again from where it came from.
    A critic-free run (algo=grpo) holds the policy alone: no value model in its checkpoints."""
    stage = "ppo" if case == "grpo" else case
    if case in ("sft", "grpo"):  # the uninterrupted run first
        root, experiment, args = tmp_path / "runs", "killed", LORA_FSDP_SFT
        if case == "grpo":  # on the shared experiment's sft and reward artifacts
            shared = request.getfixturevalue("trained_experiment") / "demo"
            args = [*EXPERIMENT["ppo"], "algo=grpo", "ppo.samples_per_prompt=4", f"model.policy={shared / 'sft'}",
                    f"model.reward={shared / 'reward'}"]
        straight = run_cli([stage, "experiment=straight", f"root={root}", *args], tmp_path)
        assert straight.returncode == 0, straight.stderr
        straight_dir = root / "straight" / stage
    else:  # the shared run is the uninterrupted one; its upstream artifacts are copied
        shared = request.getfixturevalue("trained_experiment")
        root, experiment, args = tmp_path / "runs", "demo", EXPERIMENT[stage]
        shutil.copytree(shared, root, ignore=lambda d, names: [stage] if Path(d) == shared / "demo" else [])
        straight_dir = shared / "demo" / stage
    LONG_ = [f"experiment={experiment}", f"root={root}", *args]

    run_dir = root / experiment / stage
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_cli", stage, *LONG_], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    kill_after = KILL_AFTER[case]
    while not (run_dir / "checkpoints" / f"step-{kill_after}" / "state.json").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # a real kill: no exception handlers, no cleanup
    assert proc.wait() == -signal.SIGKILL
    assert not (run_dir / "manifest.json").exists()
    killed_at = max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")
                    if (p / "state.json").exists())
    final_step = int(next(w for w in LONG_[::-1] if w.startswith("train.max_steps=")).split("=")[1])
    assert killed_at >= kill_after
    assert killed_at < final_step

    resumed = run_cli([stage, "resume=true", *LONG_], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{killed_at}'}" in resumed.stdout.replace("\n", "")

    a, b = _weights(straight_dir), _weights(run_dir)
    if stage == "sft":  # LoRA: the adapters alone were published too, and checkpoints hold nothing frozen
        a |= load_file(straight_dir / "adapter" / "adapter_model.safetensors")
        b |= load_file(run_dir / "adapter" / "adapter_model.safetensors")
        from torch.distributed.checkpoint import FileSystemReader

        shards = run_dir / "checkpoints" / f"step-{final_step}" / "shards"
        ckpt = FileSystemReader(str(shards)).read_metadata().state_dict_metadata
        assert ckpt and all("lora_" in k for k in ckpt), [k for k in ckpt if "lora_" not in k]
    if case == "grpo":
        assert not list((run_dir / "checkpoints").rglob("value*"))  # nothing of a value model was ever saved
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == final_step  # no step logged twice after the resume
    # and what the summary, the manifest and the logs report is what the uninterrupted run reported
    assert _computed(_manifest_metrics(run_dir)) == _computed(_manifest_metrics(straight_dir))
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (straight_dir, run_dir)]
    assert [_computed(r) for r in rows[1]] == [_computed(r) for r in rows[0]]


def _manifest_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())["metrics"]


def _computed(metrics: dict) -> dict:
    """Metrics without the timing ones (how fast, not what was computed)."""
    return {k: v for k, v in metrics.items() if k != "time" and not k.endswith("_per_s")}
