"""Resume after a real kill reproduces an uninterrupted run, with plain and with sharded (FSDP) checkpoints. The
runs on 2 processes (DDP and FSDP) are test_distributed's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import FAST_PPO, FAST_REWARD, FAST_SFT, run_cli

pytestmark = pytest.mark.slow

# Per stage: settings of a short run that needs no upstream artifact (the reward model starts from builtin:tiny).
FAST = {"sft": FAST_SFT, "reward": [*FAST_REWARD, "model.name_or_path=builtin:tiny"]}
LONG = {
    "sft": [*FAST_SFT, "train.max_steps=200", "train.checkpoint_every=20", "train.eval_every=100",
            "train.keep_checkpoints=3", "train.num_samples=0"],
    "reward": [*FAST["reward"], "train.max_steps=160", "train.checkpoint_every=20", "train.eval_every=80",
               "train.keep_checkpoints=3"],
    "ppo": [*FAST_PPO, "train.max_steps=14", "train.checkpoint_every=2", "train.keep_checkpoints=3"],
}


def _upstream(stage: str, tmp_path: Path) -> list[str]:
    """PPO needs a reward artifact: a short reward run on builtin:tiny (the policy is builtin:tiny itself)."""
    if stage != "ppo":
        return []
    made = run_cli(["reward", "experiment=base", *FAST["reward"]], tmp_path)
    assert made.returncode == 0, made.stderr
    return ["model.policy=builtin:tiny", f"model.reward={tmp_path / 'runs' / 'base' / 'reward'}"]


def _weights(run_dir: Path) -> dict:
    weights = load_file(run_dir / "model" / "model.safetensors")
    head = run_dir / "model" / "reward_head.safetensors"
    return {**weights, **({f"head.{k}": v for k, v in load_file(head).items()} if head.exists() else {})}


@pytest.mark.parametrize("stage,extra", [("sft", []), ("reward", []), ("ppo", []),
                                         ("sft", ["model.lora.r=4", "train.strategy=fsdp"]),
                                         ("ppo", ["model.lora.r=4"])], ids=["sft", "reward", "ppo", "sft-lora-fsdp",
                                                                             "ppo-lora"])
def test_resume_after_kill_gives_identical_weights(stage, extra, tmp_path):
    """With LoRA too: the checkpoints then hold only the adapters (and the value head), the frozen base is loaded
    again from where it came from; and with FSDP's sharded checkpoints (one process)."""
    LONG_ = [*LONG[stage], *_upstream(stage, tmp_path), *extra]
    straight = run_cli([stage, "experiment=straight", *LONG_], tmp_path)
    assert straight.returncode == 0, straight.stderr

    run_dir = tmp_path / "runs" / "killed" / stage
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_cli", stage, "experiment=killed", *LONG_], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    kill_after = 4 if stage == "ppo" else 40
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

    refused = run_cli([stage, "experiment=killed", *LONG_], tmp_path)
    assert refused.returncode == 2 and "resume=true" in refused.stderr

    resumed = run_cli([stage, "experiment=killed", "resume=true", *LONG_], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{killed_at}'}" in resumed.stdout.replace("\n", "")

    a, b = _weights(tmp_path / "runs" / "straight" / stage), _weights(run_dir)
    if extra:  # LoRA: the adapters alone were published too, and checkpoints hold nothing frozen
        a |= load_file(tmp_path / "runs" / "straight" / stage / "adapter" / "adapter_model.safetensors")
        b |= load_file(run_dir / "adapter" / "adapter_model.safetensors")
        name = "policy" if stage == "ppo" else "model"
        final = run_dir / "checkpoints" / f"step-{final_step}"
        if (final / "shards").is_dir():
            from torch.distributed.checkpoint import FileSystemReader

            ckpt = FileSystemReader(str(final / "shards")).read_metadata().state_dict_metadata
        else:
            ckpt = load_file(final / f"{name}.safetensors")
        assert ckpt and all("lora_" in k for k in ckpt), [k for k in ckpt if "lora_" not in k]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == final_step  # no step logged twice after the resume
    # and what the summary, the manifest and the logs report is what the uninterrupted run reported
    straight_dir = tmp_path / "runs" / "straight" / stage
    assert _computed(_manifest_metrics(run_dir)) == _computed(_manifest_metrics(straight_dir))
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (straight_dir, run_dir)]
    assert [_computed(r) for r in rows[1]] == [_computed(r) for r in rows[0]]


def _manifest_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())["metrics"]


def _computed(metrics: dict) -> dict:
    """Metrics without the timing ones (how fast, not what was computed)."""
    return {k: v for k, v in metrics.items() if k != "time" and not k.endswith("_per_s")}
