#!/usr/bin/env python
"""One PPO iteration, timed and measured: rollout (sampling + the policy, reference, value and reward passes) and
update, full fine-tuning or LoRA, through the stage's own code.

    .venv/bin/python scripts/bench_ppo.py --hidden-size 256 --layers 4 --lora-r 16
    .venv/bin/python scripts/bench_ppo.py --compare --sizes 256x4,512x8      # full vs LoRA r=16, one table

A random-init Llama of the given size with a realistic vocabulary (`--vocab-size`, default 32000: at small sizes
the LM head dominates, and the built-in tokenizer's ~500 tokens would hide it; sampled ids beyond the tokenizer
decode to nothing) is saved as the "SFT policy", and a reward model on its body (rlhf_cli.models.reward) as the
reward artifact; `rlhf_cli.stages.ppo.load_roles` then builds the four roles exactly as `rlhf ppo` does
(`--lora-r`: adapters on policy and value model, the reference = the policy with adapters off; `--dtype`: the
frozen weights' dtype, model.dtype), and the timed iterations run the stage's phases: `collect_rollout`,
`check_rollout`, `shape_rewards`, `ppo_update` (`--epochs` passes over `--mini-batches` minibatches of
`--micro-batch` micro-batches, clipping, the schedule, the divergence guard). Prompts are random, of
--prompt-length tokens; responses stop at EOS as in training (an untrained model rarely emits it), and the
figures count the tokens actually generated. `--iterations` iterations after one untimed warm-up.

Figures: parameters (per role: total and trained; the reference's own copy, 0 with LoRA); rollout tokens/s =
generated tokens / rollout seconds; update tokens/s = tokens x epochs / update seconds; seconds per iteration;
memory: on CUDA torch.cuda.max_memory_allocated during loading, the allocated bytes after loading and the peak
during the iterations (reset after loading); on CPU the resident set of the runtime (after importing torch,
transformers and peft, before any model), the peak RSS up to the end of loading, the RSS after loading, and the
process's peak RSS at the end. The random "SFT" and reward models are built and saved by a child process (cached
under $RLHF_CLI_CACHE when set, else in a temporary directory removed at the end), so building them does not count
in this process's peak. Peak RSS is per process, so `--compare` runs each configuration in a process of its own, one
after another (never in parallel), and prints one table; on CPU, subtract the runtime's RSS to compare with
`scripts/ppo_memory.py --device cpu`.

MLP width: `--intermediate-size`, default Llama's 8/3 x hidden (~2.7x) rounded to a multiple of 64.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import rlhf_cli  # noqa: F401
except ImportError:  # a source checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None, help="grouped-query attention (default: --heads)")
    p.add_argument("--intermediate-size", type=int, default=None, help="MLP width (default: Llama's ~2.7 x hidden)")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--lora-r", type=int, default=0, help="0: full fine-tuning; else LoRA rank (alpha = 2r)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="model.dtype: the frozen weights (reference, reward model, LoRA bases)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="train.precision: auto = bf16 autocast on CUDA, fp32 on CPU; bf16 = autocast on CPU too")
    p.add_argument("--rollout-backend", choices=("auto", "eager", "compiled"), default="auto",
                   help="ppo.rollout_backend: auto = compiled (static cache, torch.compile) on CUDA, else eager")
    p.add_argument("--prompts", type=int, default=64, help="prompts per rollout")
    p.add_argument("--prompt-length", type=int, default=8)
    p.add_argument("--response-length", type=int, default=16)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--mini-batches", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--rollout-micro-batch", type=int, default=None, help="default: --prompts")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--compare", action="store_true", help="full vs LoRA r=16 for each of --sizes, one process each")
    p.add_argument("--sizes", default="", help="with --compare: hidden x layers, comma-separated (e.g. 256x4,512x8)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    p.add_argument("--build-upstream", metavar="DIR", help=argparse.SUPPRESS)  # the child that saves the models
    args = p.parse_args(argv)
    if args.prompts % args.mini_batches or (args.prompts // args.mini_batches) % args.micro_batch:
        p.error("--prompts must split into --mini-batches minibatches of whole --micro-batch micro-batches")
    args.kv_heads = args.kv_heads or args.heads
    args.intermediate_size = args.intermediate_size or 64 * round(8 * args.hidden_size / 3 / 64) or 64
    args.rollout_micro_batch = args.rollout_micro_batch or args.prompts
    return args


def rss_mib() -> float:
    """This process's resident set now (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """This process's peak resident set so far (getrusage ru_maxrss, KiB on Linux; the kernel updates it lazily, so
    at least the resident set now), MiB."""
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rss_mib())


SHAPE_FLAGS = ("--hidden-size", "--layers", "--heads", "--kv-heads", "--intermediate-size", "--vocab-size",
               "--prompt-length", "--response-length")


def upstream_dirs(args, cache: str) -> tuple[Path, Path]:
    """Where the models of this shape are cached: (policy directory, reward-model directory)."""
    name = (f"llama-h{args.hidden_size}-l{args.layers}-a{args.heads}-kv{args.kv_heads}-i{args.intermediate_size}"
            f"-v{args.vocab_size}-p{max(256, args.prompt_length + args.response_length)}")
    return Path(cache) / name, Path(cache) / f"{name}-reward"


def build_upstream(args, cache: str) -> None:
    """Save a seeded random Llama of the asked size and vocabulary with the built-in tokenizer ("SFT policy"), and a
    reward model on its body ("reward artifact"), as `rlhf sft` and `rlhf reward` would."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rlhf_cli.models.reward import CONFIG_FILE, RewardModel
    from rlhf_cli.models.tiny import tiny_model_path

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path(cache_dir=cache))  # the built-in tokenizer
    policy_dir, reward_dir = upstream_dirs(args, cache)
    if (reward_dir / CONFIG_FILE).is_file():
        return
    config = LlamaConfig(vocab_size=max(args.vocab_size, len(tokenizer)), hidden_size=args.hidden_size,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate_size,
                         max_position_embeddings=max(256, args.prompt_length + args.response_length),
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    RewardModel.from_backbone(str(policy_dir), tokenizer).save_pretrained(reward_dir, tokenizer)


def upstream(args, cache: str) -> tuple[str, str]:
    """(policy directory, reward-model directory), built by a child process when not cached: what building them
    holds stays out of this process's peak memory."""
    from rlhf_cli.models.reward import CONFIG_FILE

    policy_dir, reward_dir = upstream_dirs(args, cache)
    if not (reward_dir / CONFIG_FILE).is_file():
        shape = [w for flag in SHAPE_FLAGS for w in (flag, str(getattr(args, flag[2:].replace("-", "_"))))]
        subprocess.run([sys.executable, __file__, "--build-upstream", cache, *shape], check=True)
    return str(policy_dir), str(reward_dir)


@contextlib.contextmanager
def cache_dir():
    """$RLHF_CLI_CACHE (kept), else a temporary directory removed at the end."""
    if os.environ.get("RLHF_CLI_CACHE"):
        yield os.environ["RLHF_CLI_CACHE"]
        return
    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp:
        yield tmp


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.build_upstream:
        build_upstream(args, args.build_upstream)
        return 0
    if args.compare:
        return compare(args, sys.argv[1:] if argv is None else argv)
    with cache_dir() as cache:
        return bench(args, cache)


def bench(args, cache: str) -> int:
    """One configuration, measured in this process."""
    import peft  # noqa: F401  (imported by LoRA runs: in the runtime's RSS of every run alike)
    import torch

    from rlhf_cli.config import LoraConfig, PPOAlgoConfig, PPOConfig, PPOModelConfig, PPOTrainConfig
    from rlhf_cli.engine import device as dev, dist, train
    from rlhf_cli.engine.flops import matmul_params, mfu
    from rlhf_cli.engine.guard import Guard
    from rlhf_cli.engine.optim import build_optimizer, build_scheduler
    from rlhf_cli.engine.recording import MetricsLog
    from rlhf_cli.models import lora
    from rlhf_cli.models.loading import quiet_transformers
    from rlhf_cli.stages import ppo

    quiet_transformers()
    device = dev.pick(args.device)
    dev.set_precision(args.precision)
    policy_dir, reward_dir = upstream(args, cache)
    runtime = rss_mib()
    cfg = PPOConfig(model=PPOModelConfig(dtype=args.dtype, lora=LoraConfig(r=args.lora_r, alpha=2.0 * args.lora_r)),
                    ppo=PPOAlgoConfig(response_length=args.response_length, prompts_per_rollout=args.prompts,
                                      num_ppo_epochs=args.epochs, num_mini_batches=args.mini_batches,
                                      rollout_backend=args.rollout_backend),
                    train=PPOTrainConfig(max_steps=args.iterations + 1, micro_batch_size=args.micro_batch,
                                         rollout_micro_batch_size=args.rollout_micro_batch,
                                         gradient_checkpointing=args.gradient_checkpointing,
                                         precision=args.precision))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    roles = ppo.load_roles(cfg, ppo.Upstream(policy_dir, reward_dir, reward_dir, []), device)
    d = dist.Dist()
    shape = ppo.batch_shape(cfg, d.world_size)
    params = [p for m in roles.trained().values() for p in m.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.optim)
    training = train.Training(params, optimizer, build_scheduler(optimizer, cfg.optim, shape.optimizer_steps),
                              cfg.optim.max_grad_norm, Guard("ppo", Path(cache) / "no-checkpoints", cfg.optim.lr,
                                                             unit="iteration"),
                              MetricsLog(Path(cache), False, None), {})
    wrapped = [train.wrap_for_training(m, d, device, cfg.train) for m in (roles.policy, roles.value)]
    if device.type == "cuda":
        loading_peak, loaded = torch.cuda.max_memory_allocated() / 2**20, torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        loading_peak, loaded = peak_rss_mib(), rss_mib()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, args.vocab_size, (args.prompt_length,), generator=g).tolist()
               for _ in range(args.prompts)]

    sampler, generation = ppo.rollout, []

    def timed_rollout(*a, **k):  # the sampling alone, inside collect_rollout
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = sampler(*a, **k)
        if device.type == "cuda":
            torch.cuda.synchronize()
        generation.append(time.perf_counter() - t)
        return out

    ppo.rollout = timed_rollout

    def iteration(step: int) -> tuple[float, float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        roll = ppo.collect_rollout(roles, prompts, cfg, device)
        ppo.check_rollout(training.guard, step + 1, roll, "the benchmark's reward model")
        shaped = ppo.shape_rewards(roll, cfg.ppo.kl_coef, cfg.ppo, roles.reward.score_stats)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        ppo.ppo_update(wrapped, roll, shaped, training, step, cfg, shape, d, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return float(roll.mask.sum()), t1 - t0, time.perf_counter() - t1

    try:
        iteration(0)  # warm-up
        generation.clear()
        runs = [iteration(step) for step in range(1, args.iterations + 1)]
    finally:
        ppo.rollout = sampler
    tokens = sum(r[0] for r in runs)
    rollout_s, update_s = sum(r[1] for r in runs), sum(r[2] for r in runs)
    # the update's FLOPs: 6 N per token of every trained model, over whole rows (prompt + response), every epoch
    row_tokens = args.prompts * (args.prompt_length + args.response_length) * args.epochs * args.iterations
    update_flops = 6 * (matmul_params(roles.policy) + matmul_params(roles.value)) * row_tokens
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mib()
    reference = 0 if isinstance(roles.reference, lora.BaseView) else lora.counts(roles.reference)[1]
    out = {"model": f"{args.hidden_size}x{args.layers}", "lora_r": args.lora_r,
           "parameters_m": lora.counts(roles.policy)[1] / 1e6,
           "trained_policy_m": lora.counts(roles.policy)[0] / 1e6, "reference_copy_m": reference / 1e6,
           "reward_m": lora.counts(roles.reward)[1] / 1e6, "value_m": lora.counts(roles.value)[1] / 1e6,
           "trained_value_m": lora.counts(roles.value)[0] / 1e6,
           "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
           "precision": dev.precision(device), "rollout_backend": args.rollout_backend,
           "frozen_dtype": str(roles.reference.dtype),
           "gradient_checkpointing": args.gradient_checkpointing, "vocab_size": args.vocab_size,
           "prompts_per_rollout": args.prompts, "prompt_length": args.prompt_length,
           "response_length": args.response_length, "epochs": args.epochs, "iterations": args.iterations,
           "rollout_tokens_per_s": tokens / rollout_s, "update_tokens_per_s": tokens * args.epochs / update_s,
           "generation_tokens_per_s": tokens / sum(generation), "generation_s": sum(generation) / args.iterations,
           "update_mfu": mfu(update_flops, update_s, device),
           "rollout_s": rollout_s / args.iterations, "update_s": update_s / args.iterations,
           "seconds_per_iteration": (rollout_s + update_s) / args.iterations,
           "memory_unit": "cuda allocated" if device.type == "cuda" else "rss",
           **({} if device.type == "cuda" else {"runtime_rss_mib": runtime}),
           "peak_loading_mib": loading_peak, "memory_after_loading_mib": loaded, "peak_memory_mib": peak,
           "threads": torch.get_num_threads()}
    if args.json:
        print(json.dumps(out))
    else:
        show([out], "PPO iteration benchmark")
    return 0


def show(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("figure")
    for row in rows:
        table.add_column(f"{row['model']} {'LoRA r=' + str(row['lora_r']) if row['lora_r'] else 'full'}",
                         justify="right")
    for key in rows[0]:
        table.add_row(key, *[f"{r[key]:,.3f}" if isinstance(r[key], float) else str(r[key]) for r in rows])
    Console().print(table)


def compare(args, argv: list[str]) -> int:
    """Each of --sizes (default: the --hidden-size x --layers given), full and LoRA r=16, in a process of its own."""
    sizes = [s.split("x") for s in args.sizes.split(",") if s] or [(args.hidden_size, args.layers)]
    drop = {"--compare", "--json"}
    base, skip = [], False
    for i, word in enumerate(argv):  # the other flags pass through; size and rank are set per run
        if skip:
            skip = False
            continue
        if word in ("--sizes", "--hidden-size", "--layers", "--lora-r"):
            skip = True
            continue
        if word.split("=")[0] in ("--sizes", "--hidden-size", "--layers", "--lora-r") or word in drop:
            continue
        base.append(word)
    rows = []
    with cache_dir() as cache:  # the models of a size are built once, for both runs
        env = {**os.environ, "RLHF_CLI_CACHE": cache}
        for hidden, layers in sizes:
            for r in (0, 16):
                cmd = [sys.executable, __file__, *base, "--hidden-size", str(hidden), "--layers", str(layers),
                       "--lora-r", str(r), "--json"]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode:
                    sys.stderr.write(proc.stderr[-3000:])
                    return proc.returncode
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(rows))
    else:
        show(rows, "PPO iteration benchmark: full fine-tuning vs LoRA r=16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
