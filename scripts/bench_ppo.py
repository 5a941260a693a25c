#!/usr/bin/env python
"""One PPO iteration, timed and measured: rollout (sampling + the policy, reference, value and reward passes) and
update, full fine-tuning or LoRA, any advantage estimator, through the stage's own code.

    .venv/bin/python scripts/bench_ppo.py --hidden-size 256 --layers 4 --lora-r 16
    .venv/bin/python scripts/bench_ppo.py --compare --sizes 256x4,512x8      # full vs LoRA r=16, one table
    .venv/bin/python scripts/bench_ppo.py --compare-advantages gae,grpo --trl --prompts 16 --samples-per-prompt 4

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

Estimators: `--advantage` (ppo.advantage, default gae) with the switches of its preset (conf/algo/<name>.yaml whose
ppo.advantage it is: grpo = the KL in the loss with k3, beta 0.04, seq_mean_token_mean; gae = algo=ppo, and
reinforce_pp_baseline, which no preset selects: the schema defaults), `--samples-per-prompt` k
(ppo.samples_per_prompt; each random prompt repeated k times in a row, as the stage does): a rollout has
--prompts x k rows, which --mini-batches and --micro-batch split. The critic-free estimators load no value model
(value_m 0, no value passes, nothing of it trained), kl_coef 0 no reference. `--compare-advantages gae,grpo` runs
each in a process of its own, one after another, on the same models and prompts, and prints one table with each
one's seconds per iteration relative to gae's.

Reward ensembles: `--reward-models K` scores every rollout with K reward models (K copies of the one built, each
a full model held in memory, with nominal held-out statistics), as `model.reward=[a,b,...]` does: the cost of an
ensemble of full members (reward_m counts them all).

TRL: `--trl` (alone, or with --compare-advantages: one more row) runs TRL's GRPOTrainer in a child process on the
same workload: the same saved random policy (loaded by TRL in fp32, its reference too: beta = our grpo preset's
kl_coef), the same reward model scored through rlhf_cli's RewardModel (a Python reward function over the prompt
and completion ids), --prompts prompts x num_generations = k, max_completion_length = --response-length,
num_iterations = --epochs, --mini-batches optimizer steps per generation of --micro-batch rows (gradient
accumulation as ours), loss_type grpo (each response's token mean), no vLLM, logging off. A word-level tokenizer
over the policy's vocabulary ("t<id>" per id) carries the random prompt ids through TRL's text prompts unchanged.
One of our iterations = one TRL generation + its num_iterations x mini-batches optimizer steps; a TrainerCallback
times each such cycle (the first is the untimed warm-up). TRL is not a dependency of rlhf_cli: `pip install trl`
(tested with trl 1.16.0), or install it apart without touching the environment's packages,
`pip install --no-deps --target DIR trl==1.16.0`, and point the script at it with BENCH_PPO_TRL_PATH=DIR
(os.pathsep-separated; searched after the environment's own packages) or PYTHONPATH=DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
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

from rlhf_cli.rl.advantages import ESTIMATORS  # noqa: E402

TRL_PATH = "BENCH_PPO_TRL_PATH"  # where a TRL installed apart lives (os.pathsep-separated), searched last


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
    p.add_argument("--rollout-micro-batch", type=int, default=None, help="default: --prompts x --samples-per-prompt")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--advantage", choices=tuple(ESTIMATORS), default="gae",
                   help="ppo.advantage, with its preset's switches (conf/algo)")
    p.add_argument("--reward-models", type=int, default=1,
                   help="score with an ensemble of this many reward models (copies of the one built; each a full model)")
    p.add_argument("--samples-per-prompt", type=int, default=1,
                   help="ppo.samples_per_prompt k: rows per rollout = --prompts x k (group estimators: k >= 2)")
    p.add_argument("--compare", action="store_true", help="full vs LoRA r=16 for each of --sizes, one process each")
    p.add_argument("--sizes", default="", help="with --compare: hidden x layers, comma-separated (e.g. 256x4,512x8)")
    p.add_argument("--compare-advantages", default="", metavar="A,B",
                   help="these estimators (e.g. gae,grpo), one process each, one table with the ratios to gae")
    p.add_argument("--trl", action="store_true",
                   help="also run TRL's GRPOTrainer on the same workload (a child process; needs trl)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    p.add_argument("--build-upstream", metavar="DIR", help=argparse.SUPPRESS)  # the child that saves the models
    p.add_argument("--trl-child", action="store_true", help=argparse.SUPPRESS)  # the child that runs TRL
    args = p.parse_args(argv)
    rows = args.prompts * args.samples_per_prompt
    if args.samples_per_prompt < 1:
        p.error("--samples-per-prompt must be 1 or more")
    if rows % args.mini_batches or (rows // args.mini_batches) % args.micro_batch:
        p.error(f"--prompts x --samples-per-prompt = {rows} rows must split into --mini-batches minibatches of whole "
                f"--micro-batch micro-batches")
    advantages = [a for a in args.compare_advantages.split(",") if a] or [args.advantage]
    for name in advantages:
        if name not in ESTIMATORS:
            p.error(f"--compare-advantages: unknown estimator {name!r} (choose from {', '.join(ESTIMATORS)})")
        if ESTIMATORS[name].grouped and args.samples_per_prompt < 2:
            p.error(f"--advantage {name} compares the responses sampled for one prompt: --samples-per-prompt must be "
                    f"2 or more")
    if args.trl or args.trl_child:
        if args.samples_per_prompt < 2:
            p.error("--trl: TRL's GRPOTrainer samples num_generations >= 2 responses per prompt: --samples-per-prompt "
                    "must be 2 or more")
        if args.lora_r or args.dtype == "bfloat16" or args.precision == "bf16":
            p.error("--trl compares full fine-tuning in fp32: leave out --lora-r, --dtype bfloat16, --precision bf16")
    if args.compare and (args.compare_advantages or args.trl):
        p.error("--compare (full vs LoRA) and --compare-advantages/--trl are separate modes")
    args.kv_heads = args.kv_heads or args.heads
    args.intermediate_size = args.intermediate_size or 64 * round(8 * args.hidden_size / 3 / 64) or 64
    args.rollout_micro_batch = args.rollout_micro_batch or rows
    return args


def preset(advantage: str) -> tuple[str, dict]:
    """(name, ppo.* switches) of the shipped preset (conf/algo/<name>.yaml) that selects `advantage`, without its
    batch sizes (the benchmark's flags set those); ("none", {}) when no preset selects it (gae's algo=ppo keeps
    every switch at its schema default)."""
    import yaml

    from rlhf_cli.config.paths import conf_dir

    for path in sorted((conf_dir() / "algo").glob("*.yaml")):
        switches = (yaml.safe_load(path.read_text()) or {}).get("ppo") or {}
        if switches.get("advantage") == advantage:
            return path.stem, {k: v for k, v in switches.items()
                               if k not in ("advantage", "samples_per_prompt", "prompts_per_rollout")}
    return ("ppo" if advantage == "gae" else "none"), {}


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
    reward = RewardModel.from_backbone(str(policy_dir), tokenizer)
    reward.score_stats = {"mean": 0.0, "std": 1.0}  # nominal held-out statistics: an ensemble standardises with them
    reward.save_pretrained(reward_dir, tokenizer)


def upstream(args, cache: str) -> tuple[str, str]:
    """(policy directory, reward-model directory), built by a child process when not cached: what building them
    holds stays out of this process's peak memory."""
    from rlhf_cli.models.reward import CONFIG_FILE

    policy_dir, reward_dir = upstream_dirs(args, cache)
    if not (reward_dir / CONFIG_FILE).is_file():
        shape = [w for flag in SHAPE_FLAGS for w in (flag, str(getattr(args, flag[2:].replace("-", "_"))))]
        subprocess.run([sys.executable, __file__, "--build-upstream", cache, *shape], check=True)
    meta = json.loads((reward_dir / CONFIG_FILE).read_text())
    if not meta.get("score_stats"):  # cached by an earlier version: the nominal statistics build_upstream gives
        meta["score_stats"] = {"mean": 0.0, "std": 1.0}
        (reward_dir / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
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
    if args.trl_child:
        with cache_dir() as cache:
            return trl_bench(args, cache)
    if args.trl:
        require_trl()  # before anything is built or run
    if args.compare:
        return compare(args, sys.argv[1:] if argv is None else argv)
    if args.compare_advantages or args.trl:
        return compare_advantages(args, sys.argv[1:] if argv is None else argv)
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
    algo, switches = preset(args.advantage)
    cfg = PPOConfig(algo=algo,
                    model=PPOModelConfig(dtype=args.dtype, lora=LoraConfig(r=args.lora_r, alpha=2.0 * args.lora_r)),
                    ppo=PPOAlgoConfig(**switches, advantage=args.advantage, samples_per_prompt=args.samples_per_prompt,
                                      response_length=args.response_length, prompts_per_rollout=args.prompts,
                                      num_ppo_epochs=args.epochs, num_mini_batches=args.mini_batches,
                                      rollout_backend=args.rollout_backend),
                    train=PPOTrainConfig(max_steps=args.iterations + 1, micro_batch_size=args.micro_batch,
                                         rollout_micro_batch_size=args.rollout_micro_batch,
                                         gradient_checkpointing=args.gradient_checkpointing,
                                         precision=args.precision))
    cfg.ppo.validate()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    roles = ppo.load_roles(cfg, ppo.Upstream(policy_dir, [reward_dir] * args.reward_models, reward_dir, []), device)
    d = dist.Dist()
    shape = ppo.batch_shape(cfg, d.world_size)
    params = [p for m in roles.trained().values() for p in m.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.optim)
    training = train.Training(params, optimizer, build_scheduler(optimizer, cfg.optim, shape.optimizer_steps),
                              cfg.optim.max_grad_norm, Guard("ppo", Path(cache) / "no-checkpoints", cfg.optim.lr,
                                                             unit="iteration"),
                              MetricsLog(Path(cache), False, None), {})
    wrapped = [train.wrap_for_training(m, d, device, cfg.train) for m in roles.trained().values()]
    if device.type == "cuda":
        loading_peak, loaded = torch.cuda.max_memory_allocated() / 2**20, torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        loading_peak, loaded = peak_rss_mib(), rss_mib()
    prompts = [ids for ids in random_prompts(args) for _ in range(args.samples_per_prompt)]  # k in a row, as the stage

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
        ppo.check_rollout(training.guard, step + 1, roll, ["the benchmark's reward model"])
        shaped = ppo.shape_rewards(roll, cfg.ppo.kl_coef, cfg.ppo, roles.rewards)
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
    rows = args.prompts * args.samples_per_prompt
    row_tokens = rows * (args.prompt_length + args.response_length) * args.epochs * args.iterations
    update_flops = 6 * sum(matmul_params(m) for m in roles.trained().values()) * row_tokens
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mib()
    reference = (0 if roles.reference is None or isinstance(roles.reference, lora.BaseView)
                 else lora.counts(roles.reference)[1])
    value = lora.counts(roles.value) if roles.value is not None else (0, 0)  # (trained, all); none: critic-free
    out = {"model": f"{args.hidden_size}x{args.layers}", "lora_r": args.lora_r, "trainer": "rlhf_cli",
           "advantage": args.advantage, "preset": algo, "samples_per_prompt": args.samples_per_prompt,
           "reward_models": args.reward_models,
           "kl_coef": cfg.ppo.kl_coef, "kl_penalty": cfg.ppo.kl_penalty,
           "loss_aggregation": cfg.ppo.loss_aggregation,
           "parameters_m": lora.counts(roles.policy)[1] / 1e6,
           "trained_policy_m": lora.counts(roles.policy)[0] / 1e6, "reference_copy_m": reference / 1e6,
           "reward_m": sum(lora.counts(m)[1] for m in roles.reward_models) / 1e6, "value_m": value[1] / 1e6,
           "trained_value_m": value[0] / 1e6,
           "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
           "precision": dev.precision(device), "rollout_backend": args.rollout_backend,
           "frozen_dtype": str(next(roles.reward_models[0].parameters()).dtype),
           "gradient_checkpointing": args.gradient_checkpointing, "vocab_size": args.vocab_size,
           "prompts_per_rollout": args.prompts, "rows_per_rollout": rows, "prompt_length": args.prompt_length,
           "response_length": args.response_length, "epochs": args.epochs, "iterations": args.iterations,
           "response_tokens_per_iteration": tokens / args.iterations,
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


def random_prompts(args) -> list[list[int]]:
    """--prompts seeded random prompts of --prompt-length ids (none of them special): the same in every run."""
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, args.vocab_size, (args.prompt_length,), generator=g).tolist()
            for _ in range(args.prompts)]


# ---- TRL's GRPOTrainer on the same workload ---------------------------------------------------------------------

def trl_paths() -> None:
    """Add $BENCH_PPO_TRL_PATH's directories to the end of sys.path: a TRL installed apart is found, and nothing
    there shadows the environment's own packages."""
    for path in filter(None, os.environ.get(TRL_PATH, "").split(os.pathsep)):
        if path not in sys.path:
            sys.path.append(path)


def missing_trl(why: str) -> str:
    return (f"bench_ppo.py: --trl needs TRL's GRPOTrainer, which {why}: `pip install trl` (tested with 1.16.0), or "
            f"`pip install --no-deps --target DIR trl==1.16.0` and {TRL_PATH}=DIR (or PYTHONPATH=DIR)")


def require_trl() -> None:
    """Stop with one line when TRL cannot be found (before anything is built or run)."""
    trl_paths()
    try:
        found = importlib.util.find_spec("trl") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        sys.exit(missing_trl("is not installed here"))


def trl_bench(args, cache: str) -> int:
    """TRL's GRPOTrainer on this benchmark's workload, measured in this process (see the module's docstring): one
    generation + num_iterations x mini-batches optimizer steps = one of our iterations, timed by a TrainerCallback
    after one untimed cycle."""
    trl_paths()
    try:
        import trl
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as e:
        sys.exit(missing_trl(f"cannot be imported ({type(e).__name__}: {e})".replace("\n", " ")))
    import peft  # noqa: F401  (as bench: in the runtime's RSS alike)
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast, TrainerCallback

    from rlhf_cli.config import PPOConfig
    from rlhf_cli.engine import device as dev
    from rlhf_cli.models.loading import quiet_transformers
    from rlhf_cli.models.reward import load_frozen_reward_model, score_sequences

    quiet_transformers()
    device = dev.pick(args.device)
    policy_dir, reward_dir = upstream(args, cache)
    runtime = rss_mib()
    algo, switches = preset("grpo")
    k, rows = args.samples_per_prompt, args.prompts * args.samples_per_prompt
    grad_accum = rows // args.mini_batches // args.micro_batch
    steps_per_iteration = args.epochs * args.mini_batches  # optimizer steps, as ours

    # TRL reads text prompts: a word-level tokenizer with one word per id of the policy's vocabulary ("t<id>")
    # carries the random prompt ids through unchanged; its special tokens are the policy tokenizer's
    ours = AutoTokenizer.from_pretrained(policy_dir)
    words = [f"t{i}" for i in range(AutoConfig.from_pretrained(policy_dir).vocab_size)]
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {f"{name}_token": words[getattr(ours, f"{name}_token_id")] for name in ("pad", "eos", "bos")
               if getattr(ours, f"{name}_token_id") is not None}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, **special)
    prompts = random_prompts(args)
    dataset = Dataset.from_dict({"prompt": [" ".join(words[i] for i in ids) for ids in prompts]})

    # the reward: our reward model's score of prompt + completion ids, as collect_rollout scores them
    reward_model, _ = load_frozen_reward_model(reward_dir, device, torch.float32)

    def reward_model_score(prompts, completions, completion_ids, **kwargs):
        sequences = [[int(w[1:]) for w in prompt.split()] + list(ids) for prompt, ids in zip(prompts, completion_ids)]
        with torch.no_grad():
            return score_sequences(reward_model, sequences, ours.pad_token_id, device,
                                   args.rollout_micro_batch).tolist()

    class Clock(TrainerCallback):
        """perf_counter when training begins and at the end of every optimizer step."""
        def __init__(self):
            self.ends = []

        def on_step_end(self, *a, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

        def on_train_begin(self, *a, **kw):
            self.ends.append(time.perf_counter())

    optim = PPOConfig().optim  # our schedule and learning rate
    with tempfile.TemporaryDirectory(prefix="bench-ppo-trl-") as out:
        config = GRPOConfig(
            output_dir=out, use_cpu=device.type == "cpu", bf16=False, fp16=False,
            model_init_kwargs={"dtype": "float32"}, disable_dropout=True,
            per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=grad_accum,
            steps_per_generation=args.mini_batches * grad_accum,  # micro-steps: --mini-batches optimizer steps
            num_generations=k, num_iterations=args.epochs, max_completion_length=args.response_length,
            temperature=1.0, beta=switches["kl_coef"], loss_type="grpo", scale_rewards=switches["scale_rewards"],
            epsilon=0.2, learning_rate=optim.lr, lr_scheduler_type="linear", warmup_steps=0,
            max_grad_norm=optim.max_grad_norm, weight_decay=optim.weight_decay,
            gradient_checkpointing=args.gradient_checkpointing,
            max_steps=steps_per_iteration * (args.iterations + 1), seed=0, data_seed=0,
            logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True, log_completions=False,
            dataloader_num_workers=0)
        clock = Clock()
        trainer = GRPOTrainer(model=policy_dir, reward_funcs=reward_model_score, args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[clock])
        loaded = rss_mib()
        sampler, sampling, generated = trainer._generate_single_turn, [], []

        def timed_sampling(*a, **kw):  # the sampling alone (transformers' generate), as ours' generation_s
            t = time.perf_counter()
            out = sampler(*a, **kw)
            if device.type == "cuda":
                torch.cuda.synchronize()
            sampling.append(time.perf_counter() - t)
            generated.append(sum(len(ids) for ids in out[0]))  # (completion ids, their log-probs)
            return out

        trainer._generate_single_turn = timed_sampling
        trainer.train()
    ends = clock.ends[1:]  # [0]: training begins
    if len(ends) != steps_per_iteration * (args.iterations + 1):
        raise RuntimeError(f"TRL took {len(ends)} optimizer steps, expected {steps_per_iteration} x "
                           f"{args.iterations + 1}")
    if len(sampling) != args.iterations + 1:
        raise RuntimeError(f"TRL generated {len(sampling)} times in {args.iterations + 1} cycles")
    cycles, generation = [], []  # after the warm-up cycle: the whole cycle, its first step (generation, scoring,
    #                              the reference's and the old policy's passes, the first optimizer step)
    for c in range(1, args.iterations + 1):
        first, last = c * steps_per_iteration, (c + 1) * steps_per_iteration - 1
        cycles.append(ends[last] - ends[first - 1])
        generation.append(ends[first] - ends[first - 1])
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mib()
    policy = trainer.model
    out = {"model": f"{args.hidden_size}x{args.layers}", "lora_r": 0, "trainer": "trl",
           "advantage": "grpo (TRL)", "preset": algo, "samples_per_prompt": k, "kl_coef": config.beta,
           "kl_penalty": "loss", "loss_aggregation": f"loss_type={config.loss_type}",
           "parameters_m": sum(p.numel() for p in policy.parameters()) / 1e6,
           "trained_policy_m": sum(p.numel() for p in policy.parameters() if p.requires_grad) / 1e6,
           "reference_copy_m": (sum(p.numel() for p in trainer.ref_model.parameters()) / 1e6
                                if trainer.ref_model is not None else 0.0),
           "reward_m": sum(p.numel() for p in reward_model.parameters()) / 1e6, "value_m": 0.0,
           "trained_value_m": 0.0,
           "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
           "precision": "fp32", "frozen_dtype": str(next(reward_model.parameters()).dtype),
           "gradient_checkpointing": args.gradient_checkpointing, "vocab_size": args.vocab_size,
           "prompts_per_rollout": args.prompts, "rows_per_rollout": rows, "prompt_length": args.prompt_length,
           "response_length": args.response_length, "epochs": args.epochs, "iterations": args.iterations,
           "optimizer_steps_per_iteration": steps_per_iteration,
           "response_tokens_per_iteration": sum(generated[-args.iterations:]) / args.iterations,
           "generation_s": sum(sampling[-args.iterations:]) / args.iterations,
           "generation_step_s": sum(generation) / args.iterations,
           "other_steps_s": (sum(cycles) - sum(generation)) / args.iterations,
           "seconds_per_iteration": sum(cycles) / args.iterations,
           "memory_unit": "cuda allocated" if device.type == "cuda" else "rss",
           **({} if device.type == "cuda" else {"runtime_rss_mib": runtime}),
           "memory_after_loading_mib": loaded, "peak_memory_mib": peak,
           "threads": torch.get_num_threads(), "trl_version": trl.__version__}
    if args.json:
        print(json.dumps(out))
    else:
        show([out], "TRL GRPOTrainer iteration benchmark")
    return 0


def show(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("figure", no_wrap=True)
    for row in rows:
        table.add_column(column_label(row), justify="right")
    keys = list(dict.fromkeys(k for row in rows for k in row))  # every row's figures, first seen first
    for key in keys:
        table.add_row(key, *["-" if key not in r else f"{r[key]:,.3f}" if isinstance(r[key], float) else str(r[key])
                             for r in rows])
    Console(width=None if sys.stdout.isatty() else 40 + 24 * len(rows)).print(table)  # piped: not cut to 80


def column_label(row: dict) -> str:
    if row.get("trainer") == "trl":
        return f"{row['model']} TRL GRPOTrainer k={row['samples_per_prompt']}"
    k = row.get("samples_per_prompt", 1)
    return (f"{row['model']} {'LoRA r=' + str(row['lora_r']) if row['lora_r'] else 'full'} "
            f"{row.get('advantage', 'gae')}{f' k={k}' if k > 1 else ''}")


def compare(args, argv: list[str]) -> int:
    """Each of --sizes (default: the --hidden-size x --layers given), full and LoRA r=16, in a process of its own."""
    sizes = [s.split("x") for s in args.sizes.split(",") if s] or [(args.hidden_size, args.layers)]
    # the other flags pass through; size and rank are set per run
    base = passthrough(argv, ("--sizes", "--hidden-size", "--layers", "--lora-r"), ("--compare", "--json"))
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


def passthrough(argv: list[str], valued: tuple, flags: tuple) -> list[str]:
    """`argv` without the `valued` options (with their values, `--x v` or `--x=v`) and the `flags`."""
    base, skip = [], False
    for word in argv:
        if skip:
            skip = False
            continue
        if word in valued:
            skip = True
            continue
        if word.split("=")[0] in valued or word in flags:
            continue
        base.append(word)
    return base


def run_child(cmd: list[str], env: dict) -> dict | None:
    """One configuration in a process of its own: its JSON row, or None (its error shown) when it failed."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-3000:])
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare_advantages(args, argv: list[str]) -> int:
    """Each estimator of --compare-advantages (default: --advantage) in a process of its own, one after another on
    the same models and prompts, then, with --trl, TRL's GRPOTrainer on the same workload; one table, each row's
    seconds per iteration relative to gae's (or the first row's, without gae) and TRL's relative to ours."""
    names = [a for a in args.compare_advantages.split(",") if a] or [args.advantage]
    base = passthrough(argv, ("--compare-advantages", "--advantage"), ("--trl", "--json"))
    rows = []
    with cache_dir() as cache:  # the models are built once, for every run
        env = {**os.environ, "RLHF_CLI_CACHE": cache}
        for name in names:
            row = run_child([sys.executable, __file__, *base, "--advantage", name, "--json"], env)
            if row is None:
                return 1
            rows.append(row)
        if args.trl:
            row = run_child([sys.executable, __file__, *base, "--trl-child", "--json"], env)
            if row is None:
                return 1
            rows.append(row)
    ours = [r for r in rows if r["trainer"] == "rlhf_cli"]
    baseline = next((r for r in ours if r["advantage"] == "gae"), ours[0])
    base_name = baseline["advantage"]
    vs = f"seconds_vs_{base_name}"
    grpo = next((r for r in ours if r["advantage"] == "grpo"), ours[-1])
    over = f"trl_over_ours_{grpo['advantage']}"  # TRL's seconds per iteration / ours: how much faster ours is
    for r in rows:
        r[vs] = r["seconds_per_iteration"] / baseline["seconds_per_iteration"]
        if r["trainer"] == "trl":
            r[over] = r["seconds_per_iteration"] / grpo["seconds_per_iteration"]
    if args.json:
        print(json.dumps(rows))
        return 0
    show(rows, "PPO iteration benchmark: advantage estimators" + (" and TRL's GRPOTrainer" if args.trl else ""))
    for r in rows:
        line = f"{column_label(r)}: {r['seconds_per_iteration']:.3f} s per iteration, {r[vs]:.2f} x {base_name}'s"
        if over in r:
            line += f"; ours ({grpo['advantage']}) is {r[over]:.2f} x faster per iteration"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
