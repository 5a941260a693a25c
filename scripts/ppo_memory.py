#!/usr/bin/env python
"""How much GPU memory one `rlhf ppo` iteration needs, by category, and the largest Llama that fits one GPU.

    python scripts/ppo_memory.py                                  # the presets at the issue's settings, 80 GB
    python scripts/ppo_memory.py --gpu-gib 80 --prompts 64 --response-length 256 --prompt-length 512
    python scripts/ppo_memory.py --device cpu --hidden 512 --layers 8 --vocab 32000 --prompts 64 ...   # one model

Pure arithmetic (no model is built): bytes of what `rlhf ppo` holds on one device, category by category, under its
precision rules (engine/device.py, stages/ppo.py):
- weights: on CUDA the trained weights are fp32 and the frozen ones bf16 (model.dtype=auto). Full fine-tuning:
  policy fp32 (4P), reference bf16 copy (2P), reward model bf16 (2B), value model fp32 (4B). LoRA: policy base
  bf16 (2P) + fp32 adapters, no reference (the policy with adapters off), reward model bf16 (2B), value base bf16
  (2B) + adapters + head. P = policy parameters (with the LM head), B = body parameters (reward/value: no LM head).
- gradients 4 bytes and AdamW state 8 bytes per trained parameter (fp32).
- update activations: one micro-batch of b sequences of T = prompt + response tokens through the policy and the
  value model, kept for the backward pass under bf16 autocast. Per layer and token, without checkpointing,
  about (20 h + 8 kv·hd + 8 I) bytes: the fp32 residual stream in and out of each block (2 x 4h), the normed inputs,
  q/k/v/o and the attention output in bf16 (~6 x 2h, k and v at kv·hd), the MLP's gate, up, silu(gate) and their
  product (4 x 2I); attention itself is SDPA (flash / memory-efficient: no T x T scores kept). With gradient
  checkpointing only each block's input stays (4h per token and layer), plus one block's activations while it
  is recomputed. The policy adds its logits: the LM head's bf16 output over all T positions (2 V b T, freed once
  the response slice is taken), the fp32 response slice and the copies the loss keeps for backward (logits / T,
  its softmax, the finite-masked copy, logsumexp's input: 5 x 4 V b R).
- rollout: the KV cache of generation (2 x layers x kv·hd x (prompt + response) x rollout micro-batch x 2 bytes in
  bf16, 4 when the sampled model is held in fp32), and the forward passes of the rollout, whose largest transient is
  the logits of `train.rollout_micro_batch_size` sequences: the full [b, T, V] output plus the fp32 response slice
  and its log-softmax (the policy, fp32 without autocast: 4 bytes each).
- peak of an iteration = max(rollout phase, update phase); the rollout phase holds weights + AdamW state, the update
  phase weights + gradients + AdamW state + activations. Plus `--overhead-gib` for the CUDA context, the allocator's
  fragmentation and workspace (default 3 GiB).

On CPU (`--device cpu`) every weight is fp32 and nothing runs under autocast (activations at 4 bytes): this is the
mode to hold against `scripts/bench_ppo.py` measurements on this machine (peak RSS also holds the Python/torch
runtime, about 0.35 GiB). The note of issue 9 compares the two.

The largest model that fits: for each preset, the largest micro-batch sizes (powers of two, at most the rollout)
with which the peak stays under --gpu-gib, with and without gradient checkpointing; a model fits when some
micro-batch of at least 1 does.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

GIB = 2**30


@dataclass(frozen=True)
class Llama:
    """The shape numbers of a Llama-architecture config."""
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_params(self) -> int:
        """q, o: h·h; k, v: h·kv·hd; gate, up, down: h·I each; two RMSNorm weights."""
        h, kvd = self.hidden, self.kv_heads * self.head_dim
        return 2 * h * h + 2 * h * kvd + 3 * h * self.intermediate + 2 * h

    def body_params(self) -> int:
        """The transformer body (AutoModel): embeddings, layers, final norm."""
        return self.vocab * self.hidden + self.layers * self.layer_params() + self.hidden

    def causal_lm_params(self) -> int:
        """The body plus the LM head (shared with the embeddings when tied)."""
        return self.body_params() + (0 if self.tied else self.vocab * self.hidden)

    def lora_params(self, r: int) -> int:
        """Adapters on every linear layer of the blocks (all-linear): r·(in + out) per q, k, v, o, gate, up, down."""
        h, kvd, i = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        return self.layers * r * (2 * (h + h) + 2 * (h + kvd) + 3 * (h + i))


PRESETS = [
    Llama("Llama-3.2-1B", 2048, 16, 32, 8, 8192, 128256, tied=True),
    Llama("Llama-3.2-3B", 3072, 28, 24, 8, 8192, 128256, tied=True),
    Llama("Llama-3.1-8B", 4096, 32, 32, 8, 14336, 128256),
    Llama("Llama-2-13B", 5120, 40, 40, 40, 13824, 32000),
    Llama("CodeLlama-34B", 8192, 48, 64, 8, 22016, 32000),
    Llama("Llama-3.1-70B", 8192, 80, 64, 8, 28672, 128256),
]


@dataclass(frozen=True)
class Setting:
    prompts: int = 64             # ppo.prompts_per_rollout
    prompt_length: int = 512
    response_length: int = 256
    micro_batch: int = 8          # train.micro_batch_size
    rollout_micro_batch: int = 64  # train.rollout_micro_batch_size
    lora_r: int = 0
    gradient_checkpointing: bool = True
    device: str = "cuda"          # cuda: bf16 frozen weights and autocast; cpu: fp32 everything


def estimate(m: Llama, s: Setting) -> dict[str, float]:
    """Bytes by category of one PPO iteration (see the module docstring for every formula), and the peak."""
    cuda = s.device == "cuda"
    frozen, act = (2, 2) if cuda else (4, 4)     # bytes per frozen weight, per activation element
    P, B = m.causal_lm_params(), m.body_params()
    head = m.hidden + 1                           # the scalar head (+ the value head's bias)
    if s.lora_r:
        adapters = m.lora_params(s.lora_r)
        trained = 2 * adapters + head
        weights = {"policy": frozen * P + 4 * adapters, "reference": 0,
                   "reward": frozen * B + 4 * head, "value": frozen * B + 4 * (adapters + head)}
        sampled_bytes = frozen                     # the policy samples with its frozen-dtype base
    else:
        trained = P + B + head
        weights = {"policy": 4 * P, "reference": frozen * P, "reward": frozen * B + 4 * head, "value": 4 * (B + head)}
        sampled_bytes = 4
    T, R, V = s.prompt_length + s.response_length, s.response_length, m.vocab
    h, kvd, i, L = m.hidden, m.kv_heads * m.head_dim, m.intermediate, m.layers
    per_token_layer = (20 * h + 8 * kvd + 8 * i) * act // 2
    b = s.micro_batch
    if s.gradient_checkpointing:
        body_acts = b * T * (L * 4 * h + per_token_layer)
    else:
        body_acts = b * T * L * per_token_layer
    logits = act * V * b * T + 4 * V * b * R + 5 * 4 * V * b * R
    update_acts = 2 * body_acts + logits          # policy and value model, one micro-batch each, plus the logits
    rb = s.rollout_micro_batch
    kv_cache = 2 * L * kvd * T * rb * sampled_bytes
    rollout_logits = 4 * V * rb * T + 2 * 4 * V * rb * R
    rollout_acts = max(kv_cache, rollout_logits + rb * T * h * 4 * 2)
    static = sum(weights.values())
    out = {**{f"weights_{k}": v for k, v in weights.items()}, "gradients": 4 * trained, "adamw": 8 * trained,
           "update_activations": update_acts, "rollout_activations": rollout_acts,
           "trained_parameters": trained, "parameters": P}
    out["peak"] = max(static + 8 * trained + rollout_acts, static + 12 * trained + update_acts)
    return out


def largest_micro_batches(m: Llama, s: Setting, budget: float) -> Setting | None:
    """The setting with the largest power-of-two micro-batches (update first, then rollout) whose peak fits
    `budget` bytes, or None when even 1 and 1 do not."""
    best = None
    mb = 1
    while mb <= s.prompts:
        rmb = 1
        while rmb <= s.prompts:
            trial = Setting(**{**asdict(s), "micro_batch": mb, "rollout_micro_batch": rmb})
            if estimate(m, trial)["peak"] <= budget:
                best = trial if best is None or (mb, rmb) > (best.micro_batch, best.rollout_micro_batch) else best
            rmb *= 2
        mb *= 2
    return best


def table(models: list[Llama], s: Setting, gpu_gib: float, overhead_gib: float) -> list[dict]:
    """Per model: full and LoRA peaks at the largest micro-batches that fit (or at 1/1 when none does)."""
    budget = (gpu_gib - overhead_gib) * GIB
    rows = []
    for m in models:
        row = {"model": m.name, "parameters_b": m.causal_lm_params() / 1e9}
        for label, r in (("full", 0), ("lora16", 16)):
            for ckpt in (True, False):
                base = Setting(**{**asdict(s), "lora_r": r, "gradient_checkpointing": ckpt})
                fit = largest_micro_batches(m, base, budget)
                at = fit or Setting(**{**asdict(base), "micro_batch": 1, "rollout_micro_batch": 1})
                key = f"{label}{'' if ckpt else '_no_ckpt'}"
                row[f"{key}_gib"] = (estimate(m, at)["peak"] + overhead_gib * GIB) / GIB
                row[f"{key}_fits"] = fit is not None
                row[f"{key}_micro"] = f"{at.micro_batch}/{at.rollout_micro_batch}" if fit else "-"
        rows.append(row)
    return rows


def largest(rows: list[dict], key: str) -> str:
    fitting = [r["model"] for r in rows if r[f"{key}_fits"]]
    return fitting[-1] if fitting else "none"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--gpu-gib", type=float, default=80 * 1e9 / GIB, help="device memory (80 GB = 74.5 GiB)")
    p.add_argument("--overhead-gib", type=float, default=3.0)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prompt-length", type=int, default=512)
    p.add_argument("--response-length", type=int, default=256)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--hidden", type=int, help="one model instead of the presets: its hidden size")
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--rollout-micro-batch", type=int, default=64)
    p.add_argument("--lora-r", type=int, default=0)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    s = Setting(args.prompts, args.prompt_length, args.response_length, args.micro_batch, args.rollout_micro_batch,
                args.lora_r, args.gradient_checkpointing, args.device)
    if args.hidden:  # one model, one setting: the categories
        heads = args.heads or max(1, args.hidden // 64)
        m = Llama("custom", args.hidden, args.layers, heads, args.kv_heads or heads,
                  args.intermediate or 64 * round(8 * args.hidden / 3 / 64), args.vocab)
        out = {k: v / GIB if k not in ("trained_parameters", "parameters") else v for k, v in estimate(m, s).items()}
        print(json.dumps(out) if args.json else "\n".join(f"{k:22s} {v:,.3f}" for k, v in out.items()))
        return 0
    rows = table(PRESETS, s, args.gpu_gib, args.overhead_gib)
    if args.json:
        print(json.dumps(rows))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"rlhf ppo on one {args.gpu_gib:.1f} GiB GPU: prompts_per_rollout {s.prompts}, prompt "
                    f"{s.prompt_length} + response {s.response_length} tokens (peak GiB at the largest micro-batch "
                    f"train/rollout that fits; gradient checkpointing on unless said)", title_justify="left")
    for col in ("model", "params", "full", "micro", "full, no ckpt", "LoRA r=16", "micro", "LoRA r=16, no ckpt"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        def cell(key: str) -> str:
            return f"{r[key + '_gib']:.1f}{'' if r[key + '_fits'] else ' (no)'}"
        t.add_row(r["model"], f"{r['parameters_b']:.2f}B", cell("full"), r["full_micro"], cell("full_no_ckpt"),
                  cell("lora16"), r["lora16_micro"], cell("lora16_no_ckpt"))
    Console(width=150).print(t)
    print(f"largest that fits: full fine-tuning {largest(rows, 'full')}; LoRA r=16 {largest(rows, 'lora16')} "
          f"(gradient checkpointing on)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
