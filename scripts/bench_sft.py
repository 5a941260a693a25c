#!/usr/bin/env python
"""SFT training throughput: forward + backward + AdamW step of a built-in tiny Llama on random token batches.

    .venv/bin/python scripts/bench_sft.py --hidden-size 256 --layers 4 --batch 16 --seq-len 256 --steps 20

It runs the project's own pieces, as `rlhf sft` does: the model is built by `rlhf_cli.models.tiny.tiny_model_path`
and loaded with `AutoModelForCausalLM.from_pretrained` (fp32 master weights), the loss is
`rlhf_cli.stages.sft.token_loss_sum` (every token supervised), gradients are clipped, and the optimizer and
schedule come from `rlhf_cli.engine.optim` under `rlhf_cli.engine.device.autocast` (bf16 on CUDA where supported,
fp32 on CPU). `--warmup` untimed steps come first; each of the `--steps` timed steps is timed on its own (with a
CUDA synchronize).

Figures: tokens/s mean = all timed tokens / all timed seconds (what a long run would see); tokens/s min = the
slowest single step; s/step = mean seconds per step. Peak memory is torch.cuda.max_memory_allocated on CUDA
(tensors only: weights, gradients, optimizer state, activations), and on CPU the process's peak resident set size
(ru_maxrss, so it includes the Python interpreter and libraries, roughly 0.5 GiB with torch + transformers).

The model is cached in $RLHF_CLI_CACHE when that is set, else built into a temporary directory that is removed.
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
    p = argparse.ArgumentParser(description="SFT training throughput of a built-in tiny Llama on random tokens.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate-size", type=int, default=None, help="default: 4 x hidden size")
    p.add_argument("--batch", type=int, default=32, help="sequences per optimizer step")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass (train.gradient_checkpointing=true)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = p.parse_args(argv)
    if args.intermediate_size is None:
        args.intermediate_size = 4 * args.hidden_size
    for name in ("hidden_size", "layers", "heads", "intermediate_size", "batch", "steps"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if args.seq_len < 2:
        p.error("--seq-len must be >= 2 (next-token loss needs two tokens)")
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


def bench(args: argparse.Namespace, cache_dir: str | None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_cli.config import OptimConfig
    from rlhf_cli.engine import device as dev
    from rlhf_cli.engine.optim import build_optimizer, build_scheduler
    from rlhf_cli.errors import RlhfError
    from rlhf_cli.models.loading import quiet_transformers
    from rlhf_cli.models.tiny import tiny_model_path
    from rlhf_cli.stages.sft import token_loss_sum

    quiet_transformers()
    try:
        device = dev.pick(args.device)
    except RlhfError:
        raise SystemExit("error: --device cuda but no CUDA device is visible (use --device auto or cpu)")
    path = tiny_model_path(hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.heads,
                           intermediate_size=args.intermediate_size,
                           max_position_embeddings=max(256, args.seq_len), seed=args.seed, cache_dir=cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).to(device)
    model.train()
    if args.gradient_checkpointing:
        from rlhf_cli.models.loading import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    n_params = sum(p.numel() for p in model.parameters())

    optim_cfg = OptimConfig()
    total = args.warmup + args.steps
    optimizer = build_optimizer(model.parameters(), optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, total)

    # Random batches made up front (outside the timing): token ids past the special tokens, every token supervised.
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(args.seed)
    n_batches = min(total, 4)
    position_ids = torch.arange(args.seq_len, device=device).expand(args.batch, -1)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(3, vocab, (args.batch, args.seq_len), generator=g).to(device)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
                        "position_ids": position_ids})

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def train_step(batch: dict) -> float:
        with dev.autocast(device):
            loss_sum, n_tok = token_loss_sum(model, batch)
            loss = loss_sum / max(n_tok, 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup):
        train_step(batches[i % n_batches])
    times, losses = [], []
    for i in range(args.steps):
        batch = batches[(args.warmup + i) % n_batches]
        sync()
        t0 = time.perf_counter()
        losses.append(train_step(batch))  # .item() waits for the step's work
        sync()
        times.append(time.perf_counter() - t0)

    tokens_per_step = args.batch * args.seq_len
    return {
        "parameters": n_params,
        "hidden_size": args.hidden_size, "layers": args.layers, "heads": args.heads,
        "intermediate_size": args.intermediate_size,
        "device": str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})",
        "precision": dev.precision(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "batch": args.batch, "seq_len": args.seq_len, "warmup": args.warmup, "steps": args.steps,
        "gradient_checkpointing": args.gradient_checkpointing,
        "tokens_per_s_mean": tokens_per_step * len(times) / sum(times),
        "tokens_per_s_min": tokens_per_step / max(times),
        "s_per_step": sum(times) / len(times),
        "peak_memory_mib": peak_memory_mib(device),
        "loss_first": losses[0], "loss_last": losses[-1],
        "torch": torch.__version__,
    }


def show(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="sft training throughput", show_header=False, title_justify="left")
    table.add_column("what", style="cyan")
    table.add_column("value", justify="right")
    mem_kind = "allocated" if result["device"].startswith("cuda") else "RSS"
    rows = [
        ("parameters", f"{result['parameters'] / 1e6:.2f}M"),
        ("model", f"hidden {result['hidden_size']}, {result['layers']} layers, {result['heads']} heads, "
                  f"ffn {result['intermediate_size']}"),
        ("device", result["device"] + (f", {result['threads']} threads" if result["threads"] else "")),
        ("precision", result["precision"] + (", gradient checkpointing" if result["gradient_checkpointing"] else "")),
        ("batch", str(result["batch"])),
        ("seq len", str(result["seq_len"])),
        ("steps", f"{result['steps']} timed (+{result['warmup']} warmup)"),
        ("tokens/s mean", f"{result['tokens_per_s_mean']:,.0f}"),
        ("tokens/s min", f"{result['tokens_per_s_min']:,.0f}"),
        ("seconds/step", f"{result['s_per_step']:.4f}"),
        (f"peak memory ({mem_kind})", f"{result['peak_memory_mib']:,.0f} MiB"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    Console(highlight=False).print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.get("RLHF_CLI_CACHE"):
        result = bench(args, cache_dir=None)
    else:
        with tempfile.TemporaryDirectory(prefix="rlhf_bench_") as tmp:
            result = bench(args, cache_dir=tmp)
    if args.json:
        print(json.dumps(result))
    else:
        show(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
