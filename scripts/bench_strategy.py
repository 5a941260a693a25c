#!/usr/bin/env python
"""DDP against FSDP (train.strategy) at 1 and 2 processes: seconds per SFT step and memory per process.

    .venv/bin/python scripts/bench_strategy.py                      # tiny and ~30M Llamas, vocabulary 32000, CPU
    .venv/bin/python scripts/bench_strategy.py --sizes 30m --processes 1 --device cuda   # one GPU

Each cell is one `scripts/bench_sft.py --json` run (the stage's own train_step), launched with torchrun for 2
processes; the processes share the machine's cores (OMP_NUM_THREADS = cores / processes), so on a CPU the
2-process rows measure the cost of the collectives, not a speed-up. Memory per process: the peak resident set on
CPU (with ~0.5 GiB of Python, torch and transformers) or the peak allocated memory on CUDA, and the training state
(weights, gradients, AdamW moments) that process holds: FSDP's shards shrink it by the number of processes.
Sizes (untied embedding and LM head): tiny = hidden 64, 2 layers (4.2M parameters, 4.1M of them embedding and
head); 30m = hidden 384, 4 layers, ffn 1024 (31.7M). Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "bench_sft.py"
SIZES = {"tiny": ["--hidden-size", "64", "--layers", "2", "--heads", "4"],
         "30m": ["--hidden-size", "384", "--layers", "4", "--heads", "6", "--intermediate-size", "1024"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "30m"])
    p.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    p.add_argument("--strategies", nargs="+", choices=("ddp", "fsdp"), default=["ddp", "fsdp"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    p.add_argument("--json", action="store_true", help="one JSON line per cell instead of a table")
    return p.parse_args(argv)


def cell(args: argparse.Namespace, size: str, strategy: str, processes: int) -> dict:
    bench = [str(SCRIPT), *SIZES[size], "--batch", str(args.batch), "--micro-batch", str(args.batch // processes),
             "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup),
             "--device", args.device, "--strategy", strategy, "--json"]
    cmd = [sys.executable, *bench] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *bench]
    threads = max(1, (os.cpu_count() or 1) // processes)
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode != 0:
        raise SystemExit(f"{size} {strategy} x{processes} failed:\n{done.stderr[-2000:]}")
    return {"size": size, **json.loads(done.stdout.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = [cell(args, size, strategy, n)
            for size in args.sizes for n in args.processes for strategy in args.strategies]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"SFT step, DDP vs FSDP ({rows[0]['device']}, batch {args.batch} x {args.seq_len} tokens, "
                        f"vocab 32000)", title_justify="left")
    for col in ("model", "processes", "strategy", "s/step", "tokens/s", "peak memory / process", "state / process",
                "loss"):
        table.add_column(col, justify="left" if col in ("model", "strategy") else "right")
    for r in rows:
        table.add_row(f"{r['size']} ({r['parameters'] / 1e6:.1f}M)", str(r["processes"]), r["strategy"],
                      f"{r['s_per_step']:.3f}", f"{r['tokens_per_s']:,.0f}", f"{r['peak_memory_mib']:,.0f} MiB",
                      f"{r['state_mib']:,.1f} MiB", f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}")
    Console(highlight=False).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
