#!/usr/bin/env python
"""SFT training throughput: optimizer steps of `rlhf sft` (its own `train_step`) on random demonstrations.

    .venv/bin/python scripts/bench_sft.py --hidden-size 256 --layers 4 --intermediate-size 688 --batch 8 \
        --seq-len 256 --steps 40                                  # the CPU workload of issue 10
    .venv/bin/python scripts/bench_sft.py ... --packing            # data.packing=true
    .venv/bin/python scripts/bench_sft.py --hidden-size 1024 --layers 24 --batch 32 --micro-batch 32 \
        --seq-len 512 --steps 20                                  # a 465M Llama: tokens/s and MFU on a GPU

The model is a random-init Llama built by `rlhf_cli.models.tiny.tiny_model_path` with a realistic vocabulary
(`--vocab-size`, default 32000, untied LM head: at small sizes the head dominates, and the built-in tokenizer's ~500
tokens would hide it), loaded with `AutoModelForCausalLM.from_pretrained` in fp32 as `rlhf sft` loads it. Each
step runs `rlhf_cli.stages.sft.train_step`: the stage's collation (padded rows, or `--packing`: one padding-free
row per micro-batch), its loss (the LM head only where a token is supervised), gradient accumulation over
`--micro-batch` rows, clipping, AdamW and the schedule, under the stage's precision (`--precision`, as
train.precision) and optionally torch.compile (`--compile`).

The data is what demonstrations look like: `--batch` examples per step, lengths uniform in [--min-len, --seq-len]
(default min: a quarter of --seq-len), the first `--prompt-fraction` of each example a prompt (not supervised,
as train.completion_only=true), random token ids. `--warmup` untimed steps come first.

Figures: tokens/s = real (non-pad) tokens per second over the timed steps, what a run's `tokens_per_s` reports;
supervised tokens/s; s/step; MFU on a known GPU = 6 · N · real tokens / (seconds · the chip's dense bf16 peak), N
every parameter but the input embedding (rlhf_cli.engine.flops; the usual 6·N·D convention: the LM head counts at
every token, though the stage runs it only where a token is supervised). Peak memory: torch.cuda.max_memory_allocated
on CUDA; on CPU the process's peak resident set (ru_maxrss, with ~0.5 GiB of Python, torch and transformers).

Several processes: launch it with torchrun and pick `--strategy ddp|fsdp` (train.strategy); each step then splits
`--batch` over the processes as the stage does, and the figures are global (tokens/s over all processes) or the
largest of any process (peak memory, and `state`: that process's parameters, gradients and AdamW moments, i.e.
its shards under FSDP). scripts/bench_strategy.py runs DDP against FSDP at 1 and 2 processes.

    .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node=2 scripts/bench_sft.py --strategy fsdp

The model is cached in $RLHF_CLI_CACHE when that is set, else built into a temporary directory that is removed
(under torchrun: the package's cache, which every process sees).
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="SFT training throughput of `rlhf sft`'s train_step on random "
                                            "demonstrations.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate-size", type=int, default=None, help="default: 4 x hidden size")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--batch", type=int, default=32, help="examples per optimizer step")
    p.add_argument("--micro-batch", type=int, default=None, help="examples per forward/backward (default: --batch)")
    p.add_argument("--seq-len", type=int, default=32, help="the longest example, in tokens")
    p.add_argument("--min-len", type=int, default=None, help="the shortest example (default: --seq-len / 4)")
    p.add_argument("--prompt-fraction", type=float, default=0.5, help="the unsupervised share of each example")
    p.add_argument("--packing", action="store_true", help="data.packing=true: one padding-free row per micro-batch")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="train.precision: auto = bf16 autocast on CUDA, fp32 on CPU; bf16 = autocast on CPU too")
    p.add_argument("--compile", action="store_true", help="train.compile=true (the warmup steps compile)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass (train.gradient_checkpointing=true)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp",
                   help="train.strategy: under torchrun, DDP replicas or FSDP shards (one process: the same numbers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = p.parse_args(argv)
    args.intermediate_size = args.intermediate_size or 4 * args.hidden_size
    args.micro_batch = args.micro_batch or args.batch
    args.min_len = args.min_len or max(2, args.seq_len // 4)
    for name in ("hidden_size", "layers", "heads", "intermediate_size", "batch", "steps", "vocab_size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if not 2 <= args.min_len <= args.seq_len:
        p.error("need 2 <= --min-len <= --seq-len (the next-token loss needs two tokens)")
    if args.batch % args.micro_batch:
        p.error("--batch must be a multiple of --micro-batch")
    if not 0 <= args.prompt_fraction < 1:
        p.error("--prompt-fraction must be in [0, 1)")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.hidden_size % args.heads:
        p.error(f"--hidden-size {args.hidden_size} must be divisible by --heads {args.heads}")
    return args


def peak_memory_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def state_mib(params, optimizer) -> float:
    """This process's share of the training state: parameters, their gradients (as large) and AdamW's moments;
    under FSDP, only its shards."""
    import torch

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    weights = sum(local(p).numel() * local(p).element_size() for p in params)
    moments = sum(local(v).numel() * local(v).element_size() for state in optimizer.state.values()
                  for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    return (2 * weights + moments) / 2**20

def demonstrations(args, n: int, vocab: int) -> list[dict]:
    """n random examples as tokenize_sft makes them: input_ids, labels (-100 on the prompt part)."""
    import torch

    g = torch.Generator().manual_seed(args.seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(args.min_len, args.seq_len + 1, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        prompt = min(length - 1, int(length * args.prompt_fraction))
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def bench(args: argparse.Namespace, cache_dir: str | None) -> dict:
    from rlhf_cli.engine import train
    from rlhf_cli.errors import RlhfError
    from rlhf_cli.models.loading import quiet_transformers

    quiet_transformers()
    try:
        with train.process(args.device, args.precision, args.strategy) as (d, device):
            return run(args, cache_dir, d, device)
    except RlhfError:
        raise SystemExit("error: --device cuda but no CUDA device is visible (use --device auto or cpu)")


def run(args: argparse.Namespace, cache_dir: str | None, d, device) -> dict:
    import torch
    import torch.distributed as tdist
    from transformers import AutoModelForCausalLM

    from rlhf_cli.config import DataConfig, SFTConfig, SFTTrainConfig
    from rlhf_cli.engine import device as dev, train
    from rlhf_cli.engine.flops import matmul_params, mfu
    from rlhf_cli.engine.guard import Guard
    from rlhf_cli.engine.optim import build_optimizer, build_scheduler
    from rlhf_cli.engine.recording import MetricsLog
    from rlhf_cli.models.tiny import tiny_model_path
    from rlhf_cli.stages.sft import train_step

    path = train.main_first(d, tiny_model_path, hidden_size=args.hidden_size, num_layers=args.layers,
                            num_heads=args.heads, intermediate_size=args.intermediate_size,
                            max_position_embeddings=max(256, args.seq_len), seed=args.seed, cache_dir=cache_dir,
                            vocab_size=args.vocab_size, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    cfg = SFTConfig(data=DataConfig(packing=args.packing, max_seq_len=args.seq_len),
                    train=SFTTrainConfig(max_steps=args.warmup + args.steps, examples_per_step=args.batch,
                                         micro_batch_size=args.micro_batch, precision=args.precision,
                                         compile=args.compile, gradient_checkpointing=args.gradient_checkpointing,
                                         strategy=args.strategy))
    train_model = train.wrap_for_training(model, d, device, cfg.train)
    n_matmul = matmul_params(model)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    training = train.Training([p for p in model.parameters()], optimizer,
                              build_scheduler(optimizer, cfg.optim, cfg.train.max_steps), cfg.optim.max_grad_norm,
                              Guard("sft", Path(cache_dir or ".") / "no-checkpoints", cfg.optim.lr),
                              MetricsLog(Path(cache_dir or "."), False, None), {})
    vocab = model.config.vocab_size
    steps = [demonstrations(args, args.batch, vocab)]
    for k in range(1, min(args.warmup + args.steps, 4)):  # a few different batches, made up front
        steps.append(demonstrations(argparse.Namespace(**{**vars(args), "seed": args.seed + k}), args.batch, vocab))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, times, tokens, supervised = [], [], 0, 0
    for i in range(args.warmup + args.steps):
        examples = steps[i % len(steps)]
        sync()
        t0 = time.perf_counter()
        loss, _, n_in = train_step(train_model, examples, 0, training, i, cfg, d, device)  # reads the loss: syncs
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            losses.append(loss)
            tokens += n_in
            supervised += sum(sum(1 for x in ex["labels"][1:] if x != -100) for ex in examples)
    seconds = sum(times)
    peak, state = peak_memory_mib(device), state_mib(training.params, optimizer)
    if d.enabled:  # the largest of any process
        worst = torch.tensor([peak, state], dtype=torch.float64, device=device)
        tdist.all_reduce(worst, op=tdist.ReduceOp.MAX)
        peak, state = worst.tolist()
    return {
        "parameters": n_params, "matmul_parameters": n_matmul, "strategy": args.strategy,
        "processes": d.world_size,
        "hidden_size": args.hidden_size, "layers": args.layers, "heads": args.heads,
        "intermediate_size": args.intermediate_size, "vocab_size": vocab,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "precision": dev.precision(device), "compile": args.compile, "packing": args.packing,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "batch": args.batch, "micro_batch": args.micro_batch, "seq_len": args.seq_len, "min_len": args.min_len,
        "warmup": args.warmup, "steps": args.steps, "gradient_checkpointing": args.gradient_checkpointing,
        "tokens_per_s": tokens / seconds, "supervised_tokens_per_s": supervised / seconds,
        "s_per_step": seconds / len(times), "mfu": mfu(6 * n_matmul * tokens, seconds, device),
        "peak_memory_mib": peak, "state_mib": state, "loss_first": losses[0], "loss_last": losses[-1],
        "torch": torch.__version__,
    }


def show(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="sft training throughput", show_header=False, title_justify="left")
    table.add_column("what", style="cyan")
    table.add_column("value", justify="right")
    mem_kind = "allocated" if result["device"] != "cpu" else "RSS"
    extras = [x for x, on in (("packing", result["packing"]), ("torch.compile", result["compile"]),
                              ("gradient checkpointing", result["gradient_checkpointing"])) if on]
    rows = [
        ("parameters", f"{result['parameters'] / 1e6:.2f}M ({result['matmul_parameters'] / 1e6:.2f}M in matmuls)"),
        ("model", f"hidden {result['hidden_size']}, {result['layers']} layers, {result['heads']} heads, "
                  f"ffn {result['intermediate_size']}, vocab {result['vocab_size']}"),
        ("device", result["device"] + (f", {result['threads']} threads" if result["threads"] else "") +
         f"; {result['processes']} process(es), {result['strategy']}"),
        ("precision", ", ".join([result["precision"], *extras])),
        ("batch", f"{result['batch']} examples of {result['min_len']}-{result['seq_len']} tokens, micro-batches of "
                  f"{result['micro_batch']}"),
        ("steps", f"{result['steps']} timed (+{result['warmup']} warmup)"),
        ("tokens/s (non-pad)", f"{result['tokens_per_s']:,.0f}"),
        ("supervised tokens/s", f"{result['supervised_tokens_per_s']:,.0f}"),
        ("seconds/step", f"{result['s_per_step']:.4f}"),
        ("MFU (6·N·tokens)", f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a (not a known GPU)"),
        (f"peak memory ({mem_kind}, largest process)", f"{result['peak_memory_mib']:,.0f} MiB"),
        ("training state per process", f"{result['state_mib']:,.1f} MiB (weights, gradients, AdamW moments)"),
        ("loss", f"{result['loss_first']:.3f} -> {result['loss_last']:.3f}"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    Console(highlight=False).print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.get("RLHF_CLI_CACHE") or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        result = bench(args, cache_dir=os.environ.get("RLHF_CLI_CACHE"))
    else:
        with tempfile.TemporaryDirectory(prefix="rlhf_bench_") as tmp:
            result = bench(args, cache_dir=tmp)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if args.json:
        print(json.dumps(result))
    else:
        show(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
