#!/usr/bin/env python
"""One PPO iteration, timed: rollout (sampling + the policy, reference, value and reward passes) and update.

    .venv/bin/python scripts/bench_ppo.py --hidden-size 64 --layers 2 --prompts 64 --response-length 16

It runs the phases `rlhf ppo` runs, from rlhf_cli.stages.ppo: `collect_rollout`, `check_rollout`, `shape_rewards`
(normalisation, missing-EOS penalty, KL penalty, GAE, whitening) and `ppo_update` (`--epochs` passes over
`--mini-batches` minibatches of `--micro-batch` micro-batches, clipping, the schedule, the divergence guard), on a
built-in tiny Llama (rlhf_cli.models.tiny) as policy and reference and a RewardModel on the same backbone as reward
and value model, with the default PPO and optimizer config otherwise. Prompts are random, of --prompt-length
tokens; responses stop at EOS as in training (an untrained model rarely emits it), and the figures count the
tokens actually generated. `--iterations` iterations after one untimed warm-up.

Figures: rollout tokens/s = generated tokens / rollout seconds; update tokens/s = tokens x epochs / update
seconds; seconds per iteration; peak memory (CUDA: max_memory_allocated; CPU: peak RSS of the process).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

try:
    import rlhf_cli  # noqa: F401
except ImportError:  # a source checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--prompts", type=int, default=64, help="prompts per rollout")
    p.add_argument("--prompt-length", type=int, default=8)
    p.add_argument("--response-length", type=int, default=16)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--mini-batches", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = p.parse_args(argv)
    if args.prompts % args.mini_batches or (args.prompts // args.mini_batches) % args.micro_batch:
        p.error("--prompts must split into --mini-batches minibatches of whole --micro-batch micro-batches")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_cli.config import PPOAlgoConfig, PPOConfig, PPOTrainConfig
    from rlhf_cli.engine import device as dev, dist, train
    from rlhf_cli.engine.guard import Guard
    from rlhf_cli.engine.logging import MetricsLog
    from rlhf_cli.engine.optim import build_optimizer, build_scheduler
    from rlhf_cli.engine.rollout import Scorer
    from rlhf_cli.models.loading import quiet_transformers
    from rlhf_cli.models.reward import RewardModel
    from rlhf_cli.models.tiny import tiny_model_path
    from rlhf_cli.stages import ppo

    quiet_transformers()
    device = dev.pick(args.device)
    cache = os.environ.get("RLHF_CLI_CACHE") or tempfile.mkdtemp(prefix="bench-ppo-")
    path = tiny_model_path(hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.heads,
                           intermediate_size=4 * args.hidden_size,
                           max_position_embeddings=max(256, args.prompt_length + args.response_length),
                           cache_dir=cache)
    tokenizer = AutoTokenizer.from_pretrained(path)
    policy = AutoModelForCausalLM.from_pretrained(path).to(device)
    reference = AutoModelForCausalLM.from_pretrained(path).to(device).eval().requires_grad_(False)
    reward = RewardModel.from_backbone(str(path), tokenizer).to(device).eval().requires_grad_(False)
    value = RewardModel.from_backbone(str(path), tokenizer).to(device)
    roles = ppo.Roles(policy, reference, value, Scorer(reward, tokenizer, True, 4096), tokenizer, "the reward model")
    cfg = PPOConfig(ppo=PPOAlgoConfig(response_length=args.response_length, prompts_per_rollout=args.prompts,
                                      num_ppo_epochs=args.epochs, num_mini_batches=args.mini_batches),
                    train=PPOTrainConfig(max_steps=args.iterations + 1, micro_batch_size=args.micro_batch,
                                         rollout_micro_batch_size=args.prompts))
    d = dist.Dist()
    shape = ppo.batch_shape(cfg, d.world_size)
    params = [*policy.parameters(), *value.parameters()]
    optimizer = build_optimizer(params, cfg.optim)
    training = train.Training(params, optimizer, build_scheduler(optimizer, cfg.optim, shape.optimizer_steps),
                              cfg.optim.max_grad_norm, Guard("ppo", Path(cache) / "no-checkpoints", cfg.optim.lr,
                                                             unit="iteration"),
                              MetricsLog(Path(cache), False, "none"), {})
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, len(tokenizer), (args.prompt_length,), generator=g).tolist()
               for _ in range(args.prompts)]

    def iteration(step: int) -> tuple[float, float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        roll = ppo.collect_rollout(roles, prompts, cfg, device)
        ppo.check_rollout(training.guard, step + 1, roll, "the benchmark's reward model")
        shaped = ppo.shape_rewards(roll, cfg.ppo.kl_coef, cfg.ppo, reward.score_stats)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        ppo.ppo_update([policy, value], roll, shaped, training, step, cfg, shape, d, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return float(roll.mask.sum()), t1 - t0, time.perf_counter() - t1

    iteration(0)  # warm-up
    runs = [iteration(step) for step in range(1, args.iterations + 1)]
    tokens = sum(r[0] for r in runs)
    rollout_s, update_s = sum(r[1] for r in runs), sum(r[2] for r in runs)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    out = {"parameters_m": sum(x.numel() for x in policy.parameters()) / 1e6, "device": str(device),
           "precision": dev.precision(device), "prompts_per_rollout": args.prompts,
           "response_length": args.response_length, "epochs": args.epochs, "iterations": args.iterations,
           "rollout_tokens_per_s": tokens / rollout_s, "update_tokens_per_s": tokens * args.epochs / update_s,
           "seconds_per_iteration": (rollout_s + update_s) / args.iterations, "peak_memory_mib": peak,
           "threads": torch.get_num_threads()}
    if args.json:
        print(json.dumps(out))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="PPO iteration benchmark", show_header=False, title_justify="left")
        for k, v in out.items():
            table.add_row(k, f"{v:,.3f}" if isinstance(v, float) else str(v))
        Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
