#!/usr/bin/env python
"""One PPO iteration, timed: rollout (sampling + the policy, reference, value and reward passes) and update.

    .venv/bin/python scripts/bench_ppo.py --hidden-size 64 --layers 2 --prompts 64 --response-length 16

It uses the pieces `rlhf ppo` uses: a built-in tiny Llama (rlhf_cli.models.tiny) as policy and reference, a
RewardModel on the same backbone as reward and value model, `rlhf_cli.engine.rollout` for the rollout passes, and
`rlhf_cli.stages.ppo.ppo_loss` with the rl/ppo.py math for `--epochs` passes over `--mini-batches` minibatches.
Responses are sampled to exactly --response-length tokens (no stop token), on random prompts of --prompt-length
tokens. `--iterations` iterations after one untimed warm-up.

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

    from rlhf_cli.config import OptimConfig, PPOAlgoConfig
    from rlhf_cli.engine import device as dev
    from rlhf_cli.engine.optim import build_optimizer
    from rlhf_cli.engine.rollout import response_logprobs, response_values, rollout, score_responses
    from rlhf_cli.models.loading import quiet_transformers
    from rlhf_cli.models.reward import RewardModel
    from rlhf_cli.models.tiny import tiny_model_path
    from rlhf_cli.rl import ppo as rl
    from rlhf_cli.stages.ppo import ppo_loss

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
    p = PPOAlgoConfig(response_length=args.response_length, prompts_per_rollout=args.prompts,
                      num_ppo_epochs=args.epochs, num_mini_batches=args.mini_batches)
    params = list(policy.parameters()) + list(value.parameters())
    optimizer = build_optimizer(params, OptimConfig(lr=1e-4))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, len(tokenizer), (args.prompt_length,), generator=g).tolist()
               for _ in range(args.prompts)]
    eos = -1  # no stop token: every response runs to --response-length, so the figures are per full length

    def iteration():
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        policy.eval()
        roll = rollout(policy, prompts, p.response_length, p.temperature, args.prompts, tokenizer.pad_token_id,
                       eos, device)
        with torch.inference_mode():
            roll["logprobs"] = response_logprobs(policy, roll, p.temperature, args.prompts)
            roll["ref_logprobs"] = response_logprobs(reference, roll, p.temperature, args.prompts)
            roll["values"] = response_values(value, roll, args.prompts)
            scores = score_responses(reward, roll, tokenizer, tokenizer, True, args.prompts, 4096)
        roll = {k: v.clone() if torch.is_tensor(v) else v for k, v in roll.items()}
        mask = roll["mask"]
        kl = rl.kl_per_token(roll["logprobs"], roll["ref_logprobs"], "k1") * mask
        adv, ret = rl.gae(rl.per_token_rewards(scores.clone(), kl, mask, 0.05), roll["values"], mask, 1.0, 0.95)
        adv = rl.masked_whiten(adv, mask)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        policy.train()
        mb = args.prompts // args.mini_batches
        for _ in range(args.epochs):
            perm = torch.randperm(args.prompts)
            for m in range(args.mini_batches):
                rows = perm[m * mb:(m + 1) * mb]
                for k in range(0, mb, args.micro_batch):
                    with dev.autocast(device):
                        loss, _ = ppo_loss(policy, value, roll, rows[k:k + args.micro_batch], adv, ret, p)
                    (loss / (mb // args.micro_batch)).backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        return float(mask.sum()), t1 - t0, t2 - t1

    iteration()  # warm-up
    runs = [iteration() for _ in range(args.iterations)]
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
