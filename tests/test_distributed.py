"""Beyond one process, end to end on CPU (gloo): FSDP2 across two torchrun "nodes" on localhost and DDP on 2
processes match one process, and checkpoints resume under the other strategy and world size; reward and PPO (with LoRA) under FSDP;
a job of two tasks through Hydra's submitit launcher; an Optuna sweep that maximises a manifest metric."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import FAST_PPO, FAST_REWARD, FAST_SFT, compose_stage, run_cli

pytestmark = pytest.mark.slow

SFT = [*FAST_SFT, "data.toy.num_eval=30"]  # 30 held-out rows: the second rank evaluates one batch fewer
REWARD = [*FAST_REWARD, "model.name_or_path=builtin:tiny", "data.toy.num_eval=62"]
ENV = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], cwd: Path, nodes: int = 1) -> list[subprocess.CompletedProcess]:
    """2 processes: one torchrun on one node, or `nodes=2` torchruns of one process each that meet through a c10d
    rendezvous on 127.0.0.1 (what two machines run, with the first one's address)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    if nodes == 1:
        cmds = [[*torchrun, "--standalone", "--nproc_per_node=2", "-m", "rlhf_cli", *args]]
    else:
        port = _free_port()
        cmds = [[*torchrun, "--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1", "--rdzv_backend=c10d",
                 f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=test", "-m", "rlhf_cli", *args]
                for rank in range(2)]
    procs = [subprocess.Popen(c, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    out = []
    for cmd, proc in zip(cmds, procs):
        stdout, stderr = proc.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr))
    return out


def _weights(run_dir: Path) -> dict:
    return {name: tensor for f in sorted((run_dir / "model").glob("*.safetensors")) for name, tensor in
            load_file(f).items()}


def _one_process(stage: str, args: list[str], tmp_path: Path) -> Path:
    """runs/single/<stage>: the 1-process reference, run in this process (the command would only add its start-up)."""
    from rlhf_cli.stages import reward, sft

    run_dir = tmp_path / "runs" / "single" / stage
    cfg = compose_stage(stage, [*args, "experiment=single", f"root={tmp_path / 'runs'}"], run_dir)
    {"sft": sft, "reward": reward}[stage].run(cfg)
    return run_dir


def _assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys() and a
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, worst


def test_sft_fsdp_on_two_nodes_matches_one_process_and_resumes_across_strategies_and_world_sizes(tmp_path):
    runs = _torchrun(["sft", "experiment=fsdp", "train.strategy=fsdp", *SFT], tmp_path, nodes=2)
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-3000:] + runs[1].stderr[-3000:]
    shown = runs[0].stdout + runs[1].stdout
    assert "x world_size 2" in shown and shown.count("sft summary") == 1  # rank 0 prints, on whichever node
    fsdp_dir = tmp_path / "runs" / "fsdp" / "sft"
    assert (fsdp_dir / "checkpoints" / "step-12" / "shards" / ".metadata").is_file()
    single_dir = _one_process("sft", SFT, tmp_path)
    # the same global batch and loss normalisation on 2 shards as on 1 process: equal up to summation order
    _assert_close(_weights(fsdp_dir), _weights(single_dir), atol=1e-5)
    # and on 2 replicas, micro_batch_size an upper bound: each process's 8 examples in 2 micro-batches of 4
    (ddp,) = _torchrun(["sft", "experiment=ddp", *SFT, "train.micro_batch_size=6"], tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "examples_per_step 16 = micro_batch_size 4 (of at most 6) x grad_accum_steps 2 x world_size 2" in \
        ddp.stdout and ddp.stdout.count("sft summary") == 1
    _assert_close(_weights(tmp_path / "runs" / "ddp" / "sft"), _weights(single_dir), atol=1e-5)
    for key in ("eval_loss", "train_loss"):
        assert json.loads((fsdp_dir / "manifest.json").read_text())["metrics"][key] == pytest.approx(
            json.loads((single_dir / "manifest.json").read_text())["metrics"][key], rel=1e-4)

    # the 2-process shards continue on 1 process with DDP's plain files (plain files into sharded models: test_fsdp;
    # FSDP resuming its own shards: test_resume_ddp)
    target = tmp_path / "runs" / "to-ddp" / "sft" / "checkpoints"
    target.mkdir(parents=True)
    shutil.copytree(fsdp_dir / "checkpoints" / "step-12", target / "step-12")
    resumed = run_cli(["sft", "experiment=to-ddp", "resume=true", *SFT], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "(step 12)" in resumed.stdout
    _assert_close(_weights(target.parent), _weights(single_dir), atol=1e-5)


def test_reward_fsdp_on_two_processes_matches_one(tmp_path):
    (run,) = _torchrun(["reward", "experiment=fsdp", "train.strategy=fsdp", *REWARD], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "UserWarning" not in run.stderr  # FSDP2 warned every step while the model returned a view of its scores
    a_dir, b_dir = tmp_path / "runs" / "fsdp" / "reward", _one_process("reward", REWARD, tmp_path)
    _assert_close(_weights(a_dir), _weights(b_dir), atol=1e-5)
    a, b = (json.loads((p / "manifest.json").read_text()) for p in (a_dir, b_dir))
    assert a["metrics"]["eval_accuracy"] == b["metrics"]["eval_accuracy"]
    assert a["reward"]["score_stats"]["std"] == pytest.approx(b["reward"]["score_stats"]["std"], rel=1e-4)


def test_dpo_fsdp_on_two_processes_matches_one(tmp_path, trained_experiment):
    """DPO sharded over 2 processes (policy and the reference's precomputed pass) takes the steps 1 process takes;
    its held-out sampling is seeded per rank, so only the training numbers and weights compare."""
    from rlhf_cli.stages import dpo

    args = [*FAST_REWARD, "train.max_steps=6", "train.eval_every=6", "train.checkpoint_every=6", "optim.lr=1e-3",
            "optim.warmup_steps=0", "dpo.kl_prompts=16", "dpo.response_length=8",
            f"model.name_or_path={trained_experiment / 'demo' / 'sft'}"]
    (run,) = _torchrun(["dpo", "experiment=fsdp", "train.strategy=fsdp", *args], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    single = tmp_path / "runs" / "single" / "dpo"
    dpo.run(compose_stage("dpo", [*args, "experiment=single", f"root={tmp_path / 'runs'}"], single))
    sharded = tmp_path / "runs" / "fsdp" / "dpo"
    _assert_close(_weights(sharded), _weights(single), atol=1e-5)
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (sharded, single)]
    assert [r["loss"] for r in rows[0]] == pytest.approx([r["loss"] for r in rows[1]], rel=1e-4)


def test_ppo_with_lora_under_fsdp_matches_ddp_on_two_processes(tmp_path, trained_experiment):
    reward = trained_experiment / "demo" / "reward"  # the shared experiment's reward model (read only)
    args = [*FAST_PPO, "train.micro_batch_size=4", "model.lora.r=4", "model.policy=builtin:tiny",
            f"model.reward={reward}"]
    for strategy in ("fsdp", "ddp"):
        (run,) = _torchrun(["ppo", f"experiment={strategy}", f"train.strategy={strategy}", *args], tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
    a_dir, b_dir = tmp_path / "runs" / "fsdp" / "ppo", tmp_path / "runs" / "ddp" / "ppo"
    # each rank samples the same responses under both strategies: the same updates, up to summation order
    _assert_close(_weights(a_dir), _weights(b_dir), atol=1e-4)
    assert (a_dir / "adapter" / "adapter_model.safetensors").is_file()
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (a_dir, b_dir)]
    assert [r["score"] for r in rows[0]] == pytest.approx([r["score"] for r in rows[1]], rel=1e-4)
    assert (a_dir / "checkpoints" / "step-4" / "shards").is_dir()

    # the 2-process shards of iteration 2 continue on 1 process to the end
    target = tmp_path / "runs" / "ws1" / "ppo" / "checkpoints"
    target.mkdir(parents=True)
    shutil.copytree(a_dir / "checkpoints" / "step-2", target / "step-2")
    resumed = run_cli(["ppo", "experiment=ws1", "resume=true", *args], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "(iteration 2)" in resumed.stdout
    assert json.loads((target.parent / "manifest.json").read_text())["metrics"]["iterations"] == 4

    # eval on 2 processes: the same numbers with every model sharded, the curve read from sharded and plain
    # checkpoints alike
    judge = ["reference=builtin:tiny", f"reward.model={reward}", "num_prompts=30",
             "micro_batch_size=8", f"policies=[{a_dir},{b_dir}]"]
    for strategy in ("fsdp", "ddp"):
        (run,) = _torchrun(["eval", f"experiment=e{strategy}", f"strategy={strategy}", *judge], tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
    reports = [json.loads((tmp_path / "runs" / f"e{s}" / "eval" / "eval.json").read_text()) for s in ("fsdp", "ddp")]
    for key in ("policies", "curves"):
        for a, b in _rows(reports[0][key], reports[1][key]):
            assert (a["score"], a["kl"], a["response_length"]) == pytest.approx((b["score"], b["kl"],
                                                                                 b["response_length"]), abs=1e-5)
    assert [p["step"] for p in reports[0]["curves"][str(a_dir)]] == [0, 2, 4]


def _rows(a, b) -> list[tuple[dict, dict]]:
    """Pairs of corresponding rows of two eval reports' policies (a list) or curves (a dict of lists)."""
    if isinstance(a, dict):
        return [pair for key in a for pair in zip(a[key], b[key])]
    return list(zip(a, b))


def test_a_submitit_job_of_two_tasks_trains_on_both(tmp_path):
    run = run_cli(["sft", "-m", "experiment=sub", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
                   "train.strategy=fsdp", *SFT], tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    sweep = tmp_path / "runs" / "sub" / "sft"
    (job,) = [p for p in sweep.iterdir() if (p / "manifest.json").is_file()]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_0_log.out"))
    assert "x world_size 2" in logs  # the tasks found each other through the job's environment
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(job / "model")
    assert torch.isfinite(model.lm_head.weight).all()


def test_an_optuna_sweep_maximises_the_named_metric(tmp_path):
    run = run_cli(["reward", "-m", "experiment=tune", "hydra/sweeper=maximize", "objective=eval_accuracy",
                   "hydra.sweeper.n_trials=3", "optim.lr=1e-4,1e-3,1e-2", *REWARD, "train.max_steps=12"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    sweep = tmp_path / "runs" / "tune" / "reward"
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    manifests = [json.loads((p / "manifest.json").read_text()) for p in sorted(sweep.glob("trial*"))]
    assert len(manifests) == 3  # numbered trials: the same value drawn twice still gets its own directory
    accuracy = [(m["config"]["optim"]["lr"], m["metrics"]["eval_accuracy"]) for m in manifests]
    assert results["best_value"] == max(acc for _, acc in accuracy)
    assert (results["best_params"]["optim.lr"], results["best_value"]) in accuracy
