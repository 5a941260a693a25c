#!/usr/bin/env python
"""Reward-model training throughput: forward + backward + AdamW step of a reward model on random token pairs.

    .venv/bin/python scripts/bench_reward.py --pairs 32 --seq-len 32 --steps 50
    .venv/bin/python scripts/bench_reward.py --model-path /path/to/all-MiniLM-L6-v2 --pairs 16 --seq-len 256 --steps 10

It runs the project's own pieces, as `rlhf reward` does: the model is
`rlhf_cli.models.reward.RewardModel.from_backbone` (the backbone's `AutoModel` body with dropout off, fp32 master
weights, a linear head on the pooled hidden state), the chosen and rejected sequences of a step go through it in ONE
forward pass of 2 x pairs sequences (rows 0..P-1 chosen, P..2P-1 rejected), the loss is
`rlhf_cli.rl.reward.pairwise_loss`, gradients are clipped, and the optimizer and schedule come from
`rlhf_cli.engine.optim` under `rlhf_cli.engine.device.autocast` (bf16 on CUDA where supported, fp32 on CPU;
`--precision` as train.precision). `--warmup` untimed steps come first; each of the `--steps` timed steps is timed
on its own (with a CUDA synchronize).

The backbone is the built-in tiny Llama by default (`--hidden-size/--layers/--heads/--intermediate-size` size it),
or any local Hugging Face model directory with `--model-path` (an encoder such as all-MiniLM-L6-v2, or a causal
LM). Every sequence is exactly `--seq-len` tokens of random non-special ids (no padding), framed like real data:
[CLS] ... [SEP] for encoders that have them, ... EOS for causal models (where the reward is read).

Figures: pairs/s mean = all timed pairs / all timed seconds (what a long run would see); pairs/s min = the slowest
single step; s/step = mean seconds per step; tokens/s counts both sides (2 x pairs x seq len per step). Peak memory
is torch.cuda.max_memory_allocated on CUDA (tensors only: weights, gradients, optimizer state, activations), and on
CPU the process's peak resident set size (ru_maxrss, so it includes the Python interpreter and libraries, roughly
0.5 GiB with torch + transformers). MFU, on a known GPU: 6 · N · tokens / (seconds · the chip's dense bf16 peak), N
the parameters but the input embedding (rlhf_cli.engine.flops).

The tiny model is cached in $RLHF_CLI_CACHE when that is set, else built into a temporary directory that is removed.
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

TINY = "builtin:tiny"
TINY_SIZES = {"hidden_size": 64, "layers": 2, "heads": 4}  # intermediate size: 4 x hidden size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Reward-model training throughput on random token pairs.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backbone", "--model-path", dest="backbone", default=TINY, metavar="PATH",
                   help=f"{TINY} (sized by the flags below) or a local Hugging Face model directory")
    p.add_argument("--hidden-size", type=int, default=None, help=f"tiny only; default {TINY_SIZES['hidden_size']}")
    p.add_argument("--layers", type=int, default=None, help=f"tiny only; default {TINY_SIZES['layers']}")
    p.add_argument("--heads", type=int, default=None, help=f"tiny only; default {TINY_SIZES['heads']}")
    p.add_argument("--intermediate-size", type=int, default=None, help="tiny only; default: 4 x hidden size")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="tiny only: embedding rows (default: the built-in tokenizer's ~500; 32000 is realistic)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="train.precision: auto = bf16 autocast on CUDA, fp32 on CPU; bf16 = autocast on CPU too")
    p.add_argument("--pooling", choices=("auto", "last", "first", "mean"), default="auto",
                   help="auto: last token for causal LMs, [CLS] for encoders that have one, else mean")
    p.add_argument("--pairs", type=int, default=32, help="ranked pairs per optimizer step (2x sequences)")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = p.parse_args(argv)
    tiny = args.backbone == TINY
    size_flags = ("hidden_size", "layers", "heads", "intermediate_size", "vocab_size")
    if not tiny:
        given = [f"--{n.replace('_', '-')}" for n in size_flags if getattr(args, n) is not None]
        if given:
            p.error(f"{', '.join(given)} size the built-in tiny model only, not --model-path {args.backbone}")
        if not Path(args.backbone).is_dir():
            p.error(f"--model-path {args.backbone} is not a directory (a local Hugging Face model directory)")
    else:
        for name, default in TINY_SIZES.items():
            if getattr(args, name) is None:
                setattr(args, name, default)
        if args.intermediate_size is None:
            args.intermediate_size = 4 * args.hidden_size
        for name in size_flags:
            if getattr(args, name) is not None and getattr(args, name) <= 0:
                p.error(f"--{name.replace('_', '-')} must be > 0")
        if args.hidden_size % args.heads:
            p.error(f"--hidden-size {args.hidden_size} must be divisible by --heads {args.heads}")
    for name in ("pairs", "steps"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be > 0")
    if args.seq_len < 3:
        p.error("--seq-len must be >= 3 (special tokens around at least one text token)")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def peak_memory_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def random_pairs(tokenizer, model, pairs: int, seq_len: int, n_batches: int, seed: int, device) -> list[dict]:
    """Batches of 2 x pairs random sequences of seq_len tokens (no padding), framed like the stage's data."""
    import torch

    special = set(tokenizer.all_special_ids)
    vocab = model.backbone.get_input_embeddings().weight.shape[0]
    allowed = torch.tensor([i for i in range(min(vocab, len(tokenizer))) if i not in special])
    first = last = None
    if model.is_encoder:
        first, last = tokenizer.cls_token_id, tokenizer.sep_token_id
    else:
        last = tokenizer.eos_token_id
        with_special = tokenizer("x").input_ids[:1]
        if tokenizer.bos_token_id is not None and with_special == [tokenizer.bos_token_id]:
            first = tokenizer.bos_token_id
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = allowed[torch.randint(len(allowed), (2 * pairs, seq_len), generator=g)]
        if first is not None:
            ids[:, 0] = first
        if last is not None:
            ids[:, -1] = last
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)})
    return out


def bench(args: argparse.Namespace, cache_dir: str | None) -> dict:
    import torch
    from transformers import AutoTokenizer

    from rlhf_cli.config import OptimConfig
    from rlhf_cli.engine import device as dev
    from rlhf_cli.engine.optim import build_optimizer, build_scheduler
    from rlhf_cli.engine.flops import matmul_params, mfu
    from rlhf_cli.errors import RlhfError
    from rlhf_cli.models.loading import ensure_pad_token, quiet_transformers
    from rlhf_cli.models.reward import RewardModel
    from rlhf_cli.rl.reward import pairwise_loss

    quiet_transformers()
    try:
        device = dev.pick(args.device)
    except RlhfError:
        raise SystemExit("error: --device cuda but no CUDA device is visible (use --device auto or cpu)")
    dev.set_precision(args.precision)
    tiny = args.backbone == TINY
    if tiny:
        from rlhf_cli.models.tiny import tiny_model_path

        path = str(tiny_model_path(hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.heads,
                                   intermediate_size=args.intermediate_size,
                                   max_position_embeddings=max(256, args.seq_len), seed=args.seed,
                                   cache_dir=cache_dir, vocab_size=args.vocab_size))
    else:
        path = str(Path(args.backbone).resolve())
    tokenizer = AutoTokenizer.from_pretrained(path)
    ensure_pad_token(tokenizer, require_eos=False)
    try:
        model = RewardModel.from_backbone(path, tokenizer, pooling=args.pooling)
    except RlhfError as exc:
        raise SystemExit(f"error: {exc}")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and args.seq_len > max_pos:
        raise SystemExit(f"error: --seq-len {args.seq_len} is longer than the model's max_position_embeddings "
                         f"{max_pos}")
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())

    torch.manual_seed(args.seed)
    optim_cfg = OptimConfig()
    total = args.warmup + args.steps
    optimizer = build_optimizer(model.parameters(), optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, total)

    # Random batches made up front (outside the timing), cycled through.
    n_batches = min(total, 4)
    batches = random_pairs(tokenizer, model, args.pairs, args.seq_len, n_batches, args.seed, device)
    P = args.pairs

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def train_step(batch: dict) -> float:
        with dev.autocast(device):
            r = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).float()
            loss = pairwise_loss(r[:P], r[P:])  # mean over the step's pairs
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

    config = model.config
    tokens = 2 * P * args.seq_len * len(times)
    return {
        "backbone": "builtin:tiny" if tiny else path,
        "model_type": config.model_type,
        "parameters": n_params,
        "hidden_size": config.hidden_size, "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads, "intermediate_size": getattr(config, "intermediate_size", None),
        "pooling": model.pooling, "is_encoder": model.is_encoder,
        "device": str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})",
        "precision": dev.precision(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "pairs": args.pairs, "seq_len": args.seq_len, "warmup": args.warmup, "steps": args.steps,
        "pairs_per_s_mean": P * len(times) / sum(times),
        "pairs_per_s_min": P / max(times),
        "tokens_per_s_mean": tokens / sum(times),
        "vocab_size": model.backbone.get_input_embeddings().weight.shape[0],
        "mfu": mfu(6 * matmul_params(model) * tokens, sum(times), device),
        "s_per_step": sum(times) / len(times),
        "peak_memory_mib": peak_memory_mib(device),
        "loss_first": losses[0], "loss_last": losses[-1],
        "torch": torch.__version__,
    }


def show(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="reward training throughput", show_header=False, title_justify="left")
    table.add_column("what", style="cyan")
    table.add_column("value", justify="right", overflow="fold")
    mem_kind = "allocated" if result["device"].startswith("cuda") else "RSS"
    ffn = f", ffn {result['intermediate_size']}" if result["intermediate_size"] else ""
    rows = [
        ("backbone", result["backbone"]),
        ("parameters", f"{result['parameters'] / 1e6:.2f}M"),
        ("model", f"{result['model_type']}: hidden {result['hidden_size']}, {result['layers']} layers, "
                  f"{result['heads']} heads{ffn}, vocab {result['vocab_size']}"),
        ("pooling", f"{result['pooling']} ({'encoder' if result['is_encoder'] else 'causal'})"),
        ("device", result["device"] + (f", {result['threads']} threads" if result["threads"] else "")),
        ("precision", result["precision"]),
        ("pairs/step", f"{result['pairs']} ({2 * result['pairs']} sequences in one forward)"),
        ("seq len", str(result["seq_len"])),
        ("steps", f"{result['steps']} timed (+{result['warmup']} warmup)"),
        ("pairs/s mean", f"{result['pairs_per_s_mean']:,.1f}"),
        ("pairs/s min", f"{result['pairs_per_s_min']:,.1f}"),
        ("tokens/s mean", f"{result['tokens_per_s_mean']:,.0f}"),
        ("seconds/step", f"{result['s_per_step']:.4f}"),
        ("MFU (6·N·tokens)", f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a (not a known GPU)"),
        (f"peak memory ({mem_kind})", f"{result['peak_memory_mib']:,.0f} MiB"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    Console(highlight=False).print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.get("RLHF_CLI_CACHE") or args.backbone != TINY:
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
