#!/usr/bin/env python
"""How much GPU memory one `rlhf ppo` iteration needs, by category, and the largest Llama that fits one GPU.

    python scripts/ppo_memory.py                          # the presets at the issue's settings on one 80 GB GPU,
                                                          # PPO (with a value model) and GRPO (critic-free)
    python scripts/ppo_memory.py --model Llama-3.1-8B --critic-free --prompts 16 --samples-per-prompt 4
    python scripts/ppo_memory.py --model Llama-3.1-8B --lora-r 16 --micro-batch 8 --rollout-micro-batch 32
    python scripts/ppo_memory.py --device cpu --hidden 256 --layers 4 --vocab 32000 --prompts 16 ...   # one model
    python scripts/ppo_memory.py --check                  # the accounting against instantiated models (CPU)

Pure arithmetic (no model is built, torch is not needed): bytes of what `rlhf ppo` holds on one device, by
category, under the stage's precision rules (engine/device.py; stages/ppo.py `load_roles`; model.dtype=auto: on
CUDA the frozen weights are bf16, the trained ones fp32, and the update runs under bf16 autocast; on the CPU
everything is fp32). Notation: h hidden, L layers, kvd = kv_heads x head_dim, I intermediate, V vocabulary,
P = parameters of the causal LM (LM head included; once when tied to the embeddings), B = of its body (no LM head),
A = LoRA adapter parameters of one model, b micro-batch, T = prompt + response tokens, R = response tokens.

Critic-free (--critic-free; `rlhf ppo` with ppo.advantage other than gae, e.g. algo=grpo): load_roles builds no value
model, so everything the value model holds below is 0: its weights, its trained parameters (so their gradients and
AdamW state), its half of the update's activations, its share of autocast's copies, its rollout pass and its part of
the loading peak. The policy, the reference and the reward model are as with PPO. The rows of an iteration are
prompts_per_rollout x samples_per_prompt (algo=grpo: 16 x 4 = 64, as algo=ppo's 64 x 1): each row is a whole
sequence (a prompt's k copies are generated and scored as separate rows), so every per-row term below counts rows.

weights (per role; frozen f = 2 bytes on CUDA, 4 on the CPU):
    full:  policy 4P,           reference f·P,  reward f·(B + h),  value 4·(B + h + 1)
    LoRA:  policy f·P + 4A,     reference 0 (the policy with adapters off), reward f·(B + h), value f·B + 4·(A + h + 1)
    critic-free: value 0 (full or LoRA); the other roles as above.
    A = L · r · [2(h + h) + 2(h + kvd) + 3(h + I)]   (all-linear: q, o; k, v; gate, up, down; never the LM head)
    The reward head is h wide (no bias, as <Arch>ForSequenceClassification); the value head gets a bias (+1).
trained parameters N:  full P + B + h + 1;  LoRA 2A + h + 1.      gradients 4N;   AdamW 8N (exp_avg, exp_avg_sq).
    critic-free: N = P (full), A (LoRA): the policy alone. So a critic-free run holds less than PPO's by exactly
    16·(B + h + 1) bytes full (value weights 4, gradients 4, AdamW 8 per parameter) and
    f·B + 16·(A + h + 1) with LoRA, in weights + gradients + AdamW.

update (one micro-batch of b sequences through the policy and the value model, one backward of both; critic-free:
  through the policy alone, so the kept body activations count once instead of twice):
  saved per token and layer, bytes (counted from the ops, and measured exactly with saved-tensor hooks by --check):
    CUDA, full (fp32 weights under bf16 autocast): 30h + 4kvd + 8I + 4·heads + 8
        fp32 residual in (4h) and after attention (4h), both RMSNorms' fp32 normalised input (2 x 4h), autocast's bf16
        copy of the normed input made by each of q, k, v, gate, up (5 x 2h), q and k after RoPE and v (2h + 4kvd),
        the attention output (2h, which o_proj reads in place), its logsumexp (4 per head), gate, up, silu(gate) and
        their product (4 x 2I), two rsqrt (8).
    CUDA, LoRA (bf16 base, fp32 adapters): 24h + 4kvd + 8I + 14r + 4·heads + 8: the residual is bf16 and the
        frozen base layers keep nothing of their input; each norm keeps its fp32 upcast (2 x 4h), each adapter its
        input's bf16 copy (5 x 2h + 2h + 2I: q, k, v, gate, up read the normed input, o and down their own) and
        A·x (2r each of 7).
    CPU, full: 32h + 8kvd + 16I + 4·heads + 8;   CPU, LoRA: 24h + 8kvd + 16I + 28r + 4·heads + 8 (fp32, no copies).
    With gradient checkpointing only each layer's input stays: 4h (fp32 residual; 2h for LoRA on CUDA).
  plus the transient of the backward: another 1/4 layer of activations without checkpointing, 5/4 with (the layer
  being recomputed and the gradients through it; measured on the CPU: 0.25 and 1.25 x the formula above).
  autocast's bf16 copies of the trained fp32 weights it multiplies with, kept for the micro-step: CUDA full
  2·(matmul weights of the policy, its LM head, the value body and head); LoRA 2·(2A + h). Critic-free: the
  policy's alone, 2·(L·matmul + V·h) full, 2A LoRA.
  logits the loss keeps (rollout.policy_logits, rl.logprobs_and_entropy): the LM head runs only at the R response
  positions, [b, R, V] in the forward's dtype (s = 2 under CUDA autocast, 4 on the CPU), which the fused log-prob
  and entropy function keeps for its backward instead of any fp32 copy; its backward adds the gradient [b, R, V]
  (s bytes again), and both directions upcast one chunk at a time, C = min(bR, rows)·V values with rows = 2^26 // V
  on CUDA (2^18 // V on the CPU), four fp32 buffers at most: 2s·VbR + 16·C.

rollout (train.rollout_micro_batch_size = c sequences per pass; the policy's log-prob pass uses the update's b, so
  its numbers are the update's; under the training precision, bf16 autocast on CUDA):
  generation: KV cache 2·L·kvd·t·c·s bytes (s = 2 on CUDA: k and v come out of autocast's bf16 matmuls, or of the
    bf16 base with LoRA; 4 on the CPU) at t = T, or at t = prompt plus the prefill's MLP transient
    c·prompt·(2h + 3I)·s, whichever is larger;
  the log-prob passes over the R response positions (inference mode, nothing kept): s·VxR + 8·C (two fp32 chunk
    buffers), x = b for the policy and c for the reference; the value and reward passes c·T·(2h + 3I) x 4 bytes
    (f with LoRA or under autocast): a layer's input, its norm and the MLP's three [c, T, I]; critic-free: the
    reward pass alone, of the same size (the two passes run one after the other, so the largest is unchanged).
    Autocast's bf16 copies of the trained weights (as in the update) live for the whole rollout on CUDA. The rollout
    phase holds weights + AdamW state + those copies + the largest of these.

loading (load_roles' order): CUDA full: the reference arrives in fp32 before its cast (8P with the policy); LoRA:
  the value model arrives in fp32 before its base is cast (f·P + 4A + f·(B + h) + 4·(B + h + 1)); never less than
  the policy arriving in fp32 (4P) nor all the weights. Critic-free (no value model arrives): full max(8P, weights)
  as before, LoRA max(4P, weights) = max(4P, f·P + 4A + f·(B + h)).
optimizer step: weights + gradients + AdamW (fused AdamW: no temporaries).
peak = max(loading, rollout, update, step) + --overhead-gib (CUDA context, cuBLAS workspace, allocator slack).

The largest model that fits: per preset, the largest power-of-two train.micro_batch_size (<= rows /
num_mini_batches) and train.rollout_micro_batch_size (<= rows; rows = prompts_per_rollout x samples_per_prompt)
whose peak fits (the two phases are apart, so each is the largest that fits its own); a model fits when 1 / 1
does. The default run shows this for PPO (value model; 64 prompts x 1) and, at the same settings and row count, for
algo=grpo (critic-free; 16 prompts x 4).

Against measurement. Static part: `check_static` builds the four roles with the stage's own load_roles (on the CPU
with model.dtype=bfloat16, the CUDA rule) and steps AdamW once: weights per role, gradients and AdamW state match
this accounting to the byte (tests/test_ppo_memory.py, full and LoRA, tied and untied); with critic_free it builds
the three roles of ppo.advantage=grpo, samples_per_prompt=4 (no value model: value weights 0) alike. Activations:
`check_activations` counts the bytes autograd saves per added layer (saved-tensor hooks) in all four regimes and
matches the formulas above exactly (SDPA without a padding mask; the CPU kernel with one keeps more). A whole
iteration, measured on 2 shared CPU cores (torch 2.13, transformers 5.24): a 19.6M Llama (hidden 256 x 4 layers, 4
heads, I 704, vocab 32000), 16 prompts of 32 tokens, responses of 32, micro-batch 8, rollout micro-batch 16, 4 epochs
x 2 minibatches, no checkpointing:

    .venv/bin/python scripts/bench_ppo.py --compare --sizes 256x4 --vocab-size 32000 --prompts 16 \
        --prompt-length 32 --response-length 32 --micro-batch 8 --iterations 2 --device cpu
    .venv/bin/python scripts/ppo_memory.py --device cpu --hidden 256 --layers 4 --vocab 32000 --prompts 16 \
        --prompt-length 32 --response-length 32 --micro-batch 8 --rollout-micro-batch 16 --no-gradient-checkpointing \
        [--lora-r 16]

    peak RSS less the runtime's (356 MiB after imports)   full  841 MiB   LoRA r=16  556 MiB
    this estimate (update phase; live tensors)            full  742 MiB   LoRA r=16  316 MiB

The gap (+99 / +240 MiB; +255 / +420 before the loss kept only the response positions' logits) is, as far as
checked, glibc's heap rather than tensors (the LoRA run's larger gap is not fully explained): blocks under glibc's
32 MiB mmap threshold are not given back when freed, and the embedding gradient and the [8, 32, 32000] logits
(31.25 MiB each) fall under it. The logits' share of this accounting (`update_logits`, `logprob_pass`) is counted
from the code of rl.ppo.logprobs_and_entropy, not measured. On
CUDA the caching allocator's slack and fragmentation are what --overhead-gib stands for; a GPU run of bench_ppo.py
(torch.cuda.max_memory_allocated) is the check this accounting still lacks.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

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

    @property
    def kvd(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_matmul_params(self) -> int:
        """q, o: h·h; k, v: h·kvd; gate, up, down: h·I."""
        h = self.hidden
        return 2 * h * h + 2 * h * self.kvd + 3 * h * self.intermediate

    def layer_params(self) -> int:
        """The matmul weights and two RMSNorm weights."""
        return self.layer_matmul_params() + 2 * self.hidden

    def body_params(self) -> int:
        """B: the transformer body (AutoModel): embeddings, layers, final norm."""
        return self.vocab * self.hidden + self.layers * self.layer_params() + self.hidden

    def causal_lm_params(self) -> int:
        """P: the body plus the LM head (shared with the embeddings when tied)."""
        return self.body_params() + (0 if self.tied else self.vocab * self.hidden)

    def lora_params(self, r: int) -> int:
        """A: adapters on every linear layer of the blocks (all-linear): r·(in + out) per q, k, v, o, gate, up, down."""
        h, kvd, i = self.hidden, self.kvd, self.intermediate
        return self.layers * r * (2 * (h + h) + 2 * (h + kvd) + 3 * (h + i))


PRESETS = [  # the public config.json numbers
    Llama("Llama-3.2-1B", 2048, 16, 32, 8, 8192, 128256, tied=True),
    Llama("Llama-3.2-3B", 3072, 28, 24, 8, 8192, 128256, tied=True),
    Llama("Llama-3.1-8B", 4096, 32, 32, 8, 14336, 128256),
    Llama("Llama-2-13B", 5120, 40, 40, 40, 13824, 32000),
    Llama("CodeLlama-34B", 8192, 48, 64, 8, 22016, 32000),
    Llama("Llama-3.1-70B", 8192, 80, 64, 8, 28672, 128256),
]


@dataclass(frozen=True)
class Setting:
    prompts: int = 64              # ppo.prompts_per_rollout
    prompt_length: int = 512
    response_length: int = 256     # ppo.response_length
    micro_batch: int = 8           # train.micro_batch_size
    rollout_micro_batch: int = 64  # train.rollout_micro_batch_size
    lora_r: int = 0                # model.lora.r
    gradient_checkpointing: bool = True
    device: str = "cuda"           # cuda: bf16 frozen weights and autocast; cpu: fp32 everything
    num_mini_batches: int = 2      # ppo.num_mini_batches: micro_batch <= rows / num_mini_batches
    samples_per_prompt: int = 1    # ppo.samples_per_prompt: rows = prompts x samples_per_prompt
    critic_free: bool = False      # ppo.advantage other than gae (algo=grpo, ...): no value model

    @property
    def rows(self) -> int:
        """The sequences of one iteration's rollout: prompts_per_rollout x samples_per_prompt."""
        return self.prompts * self.samples_per_prompt


def weights(m: Llama, s: Setting) -> dict[str, int]:
    """Bytes of each role's weights (see the module docstring); the value model's are 0 when critic-free."""
    f = 2 if s.device == "cuda" else 4
    P, B, h = m.causal_lm_params(), m.body_params(), m.hidden
    if s.lora_r:
        A = m.lora_params(s.lora_r)
        out = {"policy": f * P + 4 * A, "reference": 0, "reward": f * (B + h), "value": f * B + 4 * (A + h + 1)}
    else:
        out = {"policy": 4 * P, "reference": f * P, "reward": f * (B + h), "value": 4 * (B + h + 1)}
    return {**out, "value": 0} if s.critic_free else out


def trained_parameters(m: Llama, s: Setting) -> int:
    """N = P + B + h + 1 (full) or 2A + h + 1 (LoRA): the policy and the value model with its head; critic-free
    P (full) or A (LoRA): the policy alone."""
    policy = m.lora_params(s.lora_r) if s.lora_r else m.causal_lm_params()
    if s.critic_free:
        return policy
    return policy + (m.lora_params(s.lora_r) if s.lora_r else m.body_params()) + m.hidden + 1


def layer_activations(m: Llama, s: Setting) -> int:
    """Bytes autograd keeps per token and layer without checkpointing (the module docstring derives each term)."""
    h, kvd, i, r, small = m.hidden, m.kvd, m.intermediate, s.lora_r, 4 * m.heads + 8
    if s.device == "cuda":
        return (24 * h + 4 * kvd + 8 * i + 14 * r if r else 30 * h + 4 * kvd + 8 * i) + small
    return (24 * h + 8 * kvd + 16 * i + 28 * r if r else 32 * h + 8 * kvd + 16 * i) + small


def checkpoint_activations(m: Llama, s: Setting) -> int:
    """Bytes per token and layer with gradient checkpointing: the layer's input (the residual stream)."""
    return 2 * m.hidden if s.device == "cuda" and s.lora_r else 4 * m.hidden


def body_activations(m: Llama, s: Setting, b: int, t: int) -> tuple[int, int]:
    """(kept, backward transient) of one model's body for b sequences of t tokens."""
    layer = b * t * layer_activations(m, s)
    if s.gradient_checkpointing:
        return m.layers * b * t * checkpoint_activations(m, s), layer * 5 // 4
    return m.layers * layer, layer // 4


def autocast_copies(m: Llama, s: Setting) -> int:
    """bf16 copies autocast makes of the trained fp32 weights it multiplies with (kept for the micro-step): the
    policy's, and the value model's (body and head) unless critic-free."""
    if s.device != "cuda":
        return 0
    if s.lora_r:
        A = m.lora_params(s.lora_r)
        return 2 * A if s.critic_free else 2 * (2 * A + m.hidden)
    matmul = m.layers * m.layer_matmul_params()
    policy = matmul + m.vocab * m.hidden
    return 2 * policy if s.critic_free else 2 * (policy + matmul + m.hidden)


def chunk(V: int, rows: int, device: str) -> int:
    """Values one chunk of the fused log-prob function upcasts at a time (rl.ppo.chunk_rows)."""
    budget = 2 ** 26 if device == "cuda" else 2 ** 18
    return min(rows, max(1, budget // V)) * V


def update_logits(m: Llama, s: Setting, b: int) -> int:
    """The loss's logits at their peak: the [b, R, V] logits and their gradient, s bytes each, and four fp32 chunk
    buffers: 2s·VbR + 16·C."""
    V, R, dtype = m.vocab, s.response_length, (2 if s.device == "cuda" else 4)
    return 2 * dtype * V * b * R + 16 * chunk(V, b * R, s.device)


def logprob_pass(V: int, rows: int, R: int, dtype_bytes: int, device: str) -> int:
    """One log-prob pass of the rollout over `rows` sequences: its [rows, R, V] logits and two fp32 chunk buffers."""
    return dtype_bytes * V * rows * R + 8 * chunk(V, rows * R, device)


def rollout_activations(m: Llama, s: Setting) -> dict[str, int]:
    """The rollout's transients: generation (KV cache, prefill), the log-prob passes, the value/reward passes (the
    reward pass alone when critic-free: the same size, so the same number)."""
    c, P, R = s.rollout_micro_batch, s.prompt_length, s.response_length
    T, h, i = P + R, m.hidden, m.intermediate
    half = 2 if s.device == "cuda" else 4      # bf16 under CUDA autocast (or a bf16 base), fp32 on the CPU
    kv = 2 * m.layers * m.kvd * c * half
    generation = max(kv * T, kv * P + c * P * (2 * h + 3 * i) * half)
    logprobs = max(logprob_pass(m.vocab, min(s.micro_batch, c), R, half, s.device),
                   logprob_pass(m.vocab, c, R, half, s.device))
    reward_pass = c * T * (2 * h + 3 * i) * half
    value_pass = 0 if s.critic_free else c * T * (2 * h + 3 * i) * half
    return {"generation": generation, "logprob_pass": logprobs, "value_reward_pass": max(value_pass, reward_pass)}


def estimate(m: Llama, s: Setting) -> dict[str, int]:
    """Bytes by category and phase of one PPO iteration (the module docstring has every formula), and the peak;
    with s.critic_free, of one iteration without a value model (ppo.advantage other than gae)."""
    w = weights(m, s)
    static, N = sum(w.values()), trained_parameters(m, s)
    grads, adam = 4 * N, 8 * N
    b, T = s.micro_batch, s.prompt_length + s.response_length
    kept, transient = body_activations(m, s, b, T)
    bodies = 1 if s.critic_free else 2    # the update runs the policy (and the value model), one backward
    logits = update_logits(m, s, b)
    copies = autocast_copies(m, s)
    rollout = rollout_activations(m, s)
    P, B, h, f = m.causal_lm_params(), m.body_params(), m.hidden, (2 if s.device == "cuda" else 4)
    if s.device != "cuda":
        loading = static
    elif s.lora_r:
        A = m.lora_params(s.lora_r)
        value_arrives = 0 if s.critic_free else 4 * (B + h + 1)  # the value model in fp32 before its base's cast
        loading = max(4 * P, f * P + 4 * A + f * (B + h) + value_arrives)
    else:
        loading = max(8 * P, static)
    out = {**{f"weights_{k}": v for k, v in w.items()}, "gradients": grads, "adamw": adam,
           "autocast_copies": copies, "update_activations": bodies * kept, "update_transient": transient,
           "update_logits": logits, **{f"rollout_{k}": v for k, v in rollout.items()},
           "trained_parameters": N, "parameters": P}
    out["phase_loading"] = loading
    out["phase_rollout"] = static + adam + copies + max(rollout.values())
    out["phase_update"] = static + grads + adam + copies + bodies * kept + max(logits, transient)
    out["phase_step"] = static + grads + adam
    out["peak"] = max(out["phase_loading"], out["phase_rollout"], out["phase_update"], out["phase_step"])
    return out


def powers_of_two(limit: int) -> list[int]:
    return [1 << k for k in range(limit.bit_length()) if 1 << k <= limit]


def largest_micro_batches(m: Llama, s: Setting, budget: float) -> Setting | None:
    """`s` with the largest power-of-two micro-batches (train, then rollout) whose peak fits `budget` bytes, or
    None when even 1 / 1 does not."""
    best = None
    for mb in powers_of_two(s.rows // s.num_mini_batches):
        for rmb in powers_of_two(s.rows):
            trial = replace(s, micro_batch=mb, rollout_micro_batch=rmb)
            if estimate(m, trial)["peak"] <= budget:
                best = trial  # the loops ascend: the last fit is the largest (train first, then rollout)
    return best


KEYS = (("full", 0, True), ("full_no_ckpt", 0, False), ("lora16", 16, True), ("lora16_no_ckpt", 16, False))


def table(models: list[Llama], s: Setting, gpu_gib: float, overhead_gib: float) -> list[dict]:
    """Per model and way (full / LoRA r=16, with / without gradient checkpointing): the peak GiB (overhead included)
    at the largest micro-batches that fit, or at 1 / 1 when none does, whether it fits, and the micro-batches."""
    budget = (gpu_gib - overhead_gib) * GIB
    rows = []
    for m in models:
        row = {"model": m.name, "parameters_b": m.causal_lm_params() / 1e9}
        for key, r, ckpt in KEYS:
            base = replace(s, lora_r=r, gradient_checkpointing=ckpt)
            fit = largest_micro_batches(m, base, budget)
            at = fit or replace(base, micro_batch=1, rollout_micro_batch=1)
            row[f"{key}_gib"] = estimate(m, at)["peak"] / GIB + overhead_gib
            row[f"{key}_fits"] = fit is not None
            row[f"{key}_micro"] = f"{at.micro_batch}/{at.rollout_micro_batch}" if fit else "-"
        rows.append(row)
    return rows


GRPO_SAMPLES = 4  # conf/algo/grpo.yaml: ppo.samples_per_prompt (16 prompts x 4 = algo=ppo's 64 x 1 rows)


def critic_free_setting(s: Setting) -> Setting:
    """`s` as algo=grpo runs it: no value model, the same rows as k = 4 responses to a quarter of the prompts (when
    the rows split so; else the same prompts and samples)."""
    if s.samples_per_prompt == 1 and s.prompts % GRPO_SAMPLES == 0:
        s = replace(s, prompts=s.prompts // GRPO_SAMPLES, samples_per_prompt=GRPO_SAMPLES)
    return replace(s, critic_free=True)


def largest(rows: list[dict], key: str) -> str:
    """The largest model (the rows ascend in size) that fits the given way, or 'none'."""
    fitting = [r for r in rows if r[f"{key}_fits"]]
    return f"{fitting[-1]['model']} ({fitting[-1][key + '_micro']})" if fitting else "none"


# ---- against measurement (needs torch; small configs only) ------------------------------------------------------

def save_upstream(m: Llama, directory: Path) -> tuple[str, str]:
    """A seeded random Llama of shape `m` with the built-in tokenizer (the "SFT policy") and a reward model on its
    body (the "reward artifact"), saved as `rlhf sft` and `rlhf reward` would. m.vocab must cover the tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rlhf_cli.models.reward import RewardModel
    from rlhf_cli.models.tiny import tiny_model_path

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path(cache_dir=str(directory)))
    if m.vocab < len(tokenizer):
        raise ValueError(f"vocab {m.vocab} < the built-in tokenizer's {len(tokenizer)} tokens")
    config = LlamaConfig(vocab_size=m.vocab, hidden_size=m.hidden, num_hidden_layers=m.layers,
                         num_attention_heads=m.heads, num_key_value_heads=m.kv_heads,
                         intermediate_size=m.intermediate, tie_word_embeddings=m.tied,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    policy_dir, reward_dir = directory / "policy", directory / "reward"
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    RewardModel.from_backbone(str(policy_dir), tokenizer).save_pretrained(reward_dir, tokenizer)
    return str(policy_dir), str(reward_dir)


def check_static(m: Llama, lora_r: int, critic_free: bool = False) -> dict[str, tuple[int, int]]:
    """{category: (this accounting's bytes, measured bytes)} for weights per role, gradients, AdamW state and the
    trained parameter count: the roles built by the stage's own `load_roles` on the CPU with model.dtype=bfloat16
    (the CUDA rule: frozen weights bf16, trained fp32), gradients of every trained parameter, AdamW stepped once.
    critic_free: the roles of ppo.advantage=grpo, samples_per_prompt=4 (no value model: its weights measure 0)."""
    import torch

    from rlhf_cli.config import LoraConfig, PPOAlgoConfig, PPOConfig, PPOModelConfig
    from rlhf_cli.engine.optim import build_optimizer
    from rlhf_cli.models import lora
    from rlhf_cli.models.loading import quiet_transformers
    from rlhf_cli.stages import ppo

    quiet_transformers()
    with tempfile.TemporaryDirectory(prefix="ppo-memory-") as tmp:
        policy_dir, reward_dir = save_upstream(m, Path(tmp))
        algo = PPOAlgoConfig(advantage="grpo", samples_per_prompt=4, prompts_per_rollout=16) if critic_free else \
            PPOAlgoConfig()
        cfg = PPOConfig(model=PPOModelConfig(dtype="bfloat16", lora=LoraConfig(r=lora_r, alpha=2.0 * lora_r)),
                        ppo=algo)
        cfg.ppo.validate()
        roles = ppo.load_roles(cfg, ppo.Upstream(policy_dir, [reward_dir], reward_dir, []), torch.device("cpu"))

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    trained = [p for model in roles.trained().values() for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trained, cfg.optim)
    for p in trained:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    reference = 0 if isinstance(roles.reference, lora.BaseView) else nbytes(roles.reference.parameters())
    value = 0 if roles.value is None else nbytes(roles.value.parameters())
    measured = {"weights_policy": nbytes(roles.policy.parameters()), "weights_reference": reference,
                "weights_reward": sum(nbytes(m.parameters()) for m in roles.reward_models), "weights_value": value,
                "gradients": nbytes(p.grad for p in trained),
                "adamw": nbytes(t for st in optimizer.state.values() for k, t in st.items()
                                if k in ("exp_avg", "exp_avg_sq")),
                "trained_parameters": sum(p.numel() for p in trained)}
    est = estimate(m, Setting(lora_r=lora_r, device="cuda", critic_free=critic_free))
    return {k: (est[k], v) for k, v in measured.items()}


def saved_bytes(m: Llama, layers: int, lora_r: int, autocast: bool, b: int, t: int) -> int:
    """Bytes autograd saves for the backward in one forward of the body of `m` with `layers` layers (b sequences of
    t tokens, no padding), parameters themselves not counted: bf16 base under CPU autocast (the CUDA rule) when
    `autocast`, else fp32."""
    import contextlib

    import torch
    from transformers import LlamaConfig, LlamaModel

    from rlhf_cli.config import LoraConfig
    from rlhf_cli.models import lora

    config = LlamaConfig(vocab_size=m.vocab, hidden_size=m.hidden, num_hidden_layers=layers,
                         num_attention_heads=m.heads, num_key_value_heads=m.kv_heads,
                         intermediate_size=m.intermediate, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    model = LlamaModel(config).train()
    lora.add_adapters(model, LoraConfig(r=lora_r, alpha=2.0 * lora_r), 0,
                      base_dtype=torch.bfloat16 if autocast else None)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(x):
        storage = x.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return x

    ids = torch.randint(0, m.vocab, (b, t), generator=torch.Generator().manual_seed(0))
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with cast, torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return sum(seen.values())


def check_activations(m: Llama, lora_r: int, device: str, b: int = 2, t: int = 16) -> tuple[int, int]:
    """(this accounting, measured): bytes one more layer adds to what autograd keeps, for b x t tokens: the
    per-token formula plus, on CUDA, autocast's copies of that layer's trained weights. Measured as the difference
    of `saved_bytes` between 2 and 1 layers (on the CPU; CPU autocast stands in for CUDA's)."""
    s = Setting(lora_r=lora_r, device=device, gradient_checkpointing=False)
    one = Llama(m.name, m.hidden, 1, m.heads, m.kv_heads, m.intermediate, m.vocab)
    copies = 0
    if device == "cuda":
        copies = 2 * (one.lora_params(lora_r) if lora_r else one.layer_matmul_params())
    expected = b * t * layer_activations(m, s) + copies
    autocast = device == "cuda"
    measured = saved_bytes(m, 2, lora_r, autocast, b, t) - saved_bytes(m, 1, lora_r, autocast, b, t)
    return expected, measured


def run_checks() -> int:
    """Print the static and activation checks for a small config."""
    m = Llama("check", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=160, vocab=512)
    ok = True
    for critic_free in (False, True):
        for tied in (False, True):
            for r in (0, 4):
                for k, (est, got) in check_static(replace(m, tied=tied), r, critic_free).items():
                    ok &= est == got
                    print(f"static  {'grpo' if critic_free else 'ppo '} {'tied' if tied else 'untied'} r={r} "
                          f"{k:20s} estimate {est:>10,} measured {got:>10,}  {'ok' if est == got else 'DIFFERS'}")
    for device in ("cuda", "cpu"):
        for r in (0, 4):
            est, got = check_activations(m, r, device)
            ok &= est == got
            print(f"layer   {device} rule r={r:<2} saved bytes per layer estimate {est:>10,} measured {got:>10,}  "
                  f"{'ok' if est == got else 'DIFFERS'}")
    return 0 if ok else 1


# ---- the command ------------------------------------------------------------------------------------------------

def show_categories(m: Llama, s: Setting, overhead_gib: float, as_json: bool) -> None:
    out = {k: (v if k in ("trained_parameters", "parameters") else v / GIB) for k, v in estimate(m, s).items()}
    out["peak_with_overhead"] = out["peak"] + overhead_gib
    if as_json:
        print(json.dumps({"model": m.name, "micro_batch": s.micro_batch,
                          "rollout_micro_batch": s.rollout_micro_batch, "critic_free": s.critic_free,
                          "rows": s.rows, **out}))
        return
    print(f"{m.name}: {m.causal_lm_params() / 1e9:.2f}B parameters, {'LoRA r=' + str(s.lora_r) if s.lora_r else 'full'}"
          f", {'critic-free (no value model)' if s.critic_free else 'with a value model'}, {s.rows} rows "
          f"({s.prompts} x {s.samples_per_prompt}), {s.device}, micro-batches {s.micro_batch}/{s.rollout_micro_batch}"
          f", gradient checkpointing {'on' if s.gradient_checkpointing else 'off'} (GiB)")
    for k, v in out.items():
        print(f"  {k:22s} {v:>14,.3f}" if isinstance(v, float) else f"  {k:22s} {v:>14,}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--gpu-gib", type=float, default=79.2,
                   help="device memory: an 80 GB A100/H100 reports about 79.2 GiB")
    p.add_argument("--overhead-gib", type=float, default=3.0,
                   help="CUDA context, cuBLAS workspace, allocator fragmentation")
    p.add_argument("--prompts", type=int, default=64, help="ppo.prompts_per_rollout")
    p.add_argument("--samples-per-prompt", type=int, default=1,
                   help="ppo.samples_per_prompt: rows = prompts x this (algo=grpo: 16 x 4)")
    p.add_argument("--critic-free", action="store_true",
                   help="(one model) without a value model: ppo.advantage other than gae (algo=grpo, rloo, ...); "
                        "the table shows both")
    p.add_argument("--mini-batches", type=int, default=2, help="ppo.num_mini_batches")
    p.add_argument("--prompt-length", type=int, default=512)
    p.add_argument("--response-length", type=int, default=256)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--model", choices=[m.name for m in PRESETS], help="the categories of one preset")
    p.add_argument("--hidden", type=int, help="the categories of one custom model: its hidden size")
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int, help="default hidden / 64")
    p.add_argument("--kv-heads", type=int, help="default --heads")
    p.add_argument("--intermediate", type=int, help="default Llama's 8/3 x hidden, to a multiple of 64")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tied", action="store_true", help="LM head tied to the embeddings")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="train.micro_batch_size (one model: default the largest that fits, or 8 on the CPU)")
    p.add_argument("--rollout-micro-batch", type=int, default=None,
                   help="train.rollout_micro_batch_size (default as --micro-batch; 64 on the CPU)")
    p.add_argument("--lora-r", type=int, default=0)
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                   help="(one model) without gradient checkpointing; the table shows both")
    p.add_argument("--check", action="store_true", help="compare the accounting with instantiated models")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.check:
        return run_checks()
    rows = args.prompts * args.samples_per_prompt
    s = Setting(args.prompts, args.prompt_length, args.response_length, args.micro_batch or 8,
                args.rollout_micro_batch or min(64, rows), args.lora_r, args.gradient_checkpointing,
                args.device, args.mini_batches, args.samples_per_prompt, args.critic_free)
    if args.hidden or args.model:
        if args.model:
            m = next(x for x in PRESETS if x.name == args.model)
        else:
            heads = args.heads or max(1, args.hidden // 64)
            m = Llama("custom", args.hidden, args.layers, heads, args.kv_heads or heads,
                      args.intermediate or 64 * round(8 * args.hidden / 3 / 64), args.vocab, args.tied)
        if args.device == "cuda" and args.micro_batch is None:
            s = largest_micro_batches(m, s, (args.gpu_gib - args.overhead_gib) * GIB) or replace(
                s, micro_batch=1, rollout_micro_batch=1)
        if args.rollout_micro_batch:
            s = replace(s, rollout_micro_batch=args.rollout_micro_batch)
        show_categories(m, s, args.overhead_gib if args.device == "cuda" else 0.0, args.json)
        return 0
    s = replace(s, critic_free=False)
    grpo = critic_free_setting(s)
    rows, cf_rows = table(PRESETS, s, args.gpu_gib, args.overhead_gib), table(PRESETS, grpo, args.gpu_gib,
                                                                              args.overhead_gib)
    if args.json:  # each row: PPO's keys as before, and algo=grpo's (critic-free) as grpo_<key>
        print(json.dumps([{**r, **{f"grpo_{k}": v for k, v in c.items() if k not in ("model", "parameters_b")}}
                          for r, c in zip(rows, cf_rows)]))
        return 0
    show_presets(f"rlhf ppo on one GPU of {args.gpu_gib:g} GiB ({args.overhead_gib:g} GiB overhead counted): "
                 f"prompts_per_rollout {s.prompts}, prompt {s.prompt_length} + response {s.response_length} "
                 f"tokens; peak GiB at the largest micro-batches train/rollout that fit", rows, "largest that fits")
    show_presets(f"rlhf ppo algo=grpo (critic-free: no value model), same GPU and settings: prompts_per_rollout "
                 f"{grpo.prompts} x samples_per_prompt {grpo.samples_per_prompt} = {grpo.rows} responses, prompt "
                 f"{grpo.prompt_length} + response {grpo.response_length} tokens", cf_rows,
                 "largest that fits, algo=grpo (critic-free)")
    return 0


def show_presets(title: str, rows: list[dict], verdict: str) -> None:
    """The presets' table (peak GiB at the largest micro-batches that fit, per column) and its verdict line."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for col in ("model", "params", "full, ckpt", "full, no ckpt", "LoRA r=16, ckpt", "LoRA r=16, no ckpt"):
        t.add_column(col, justify="left" if col == "model" else "right")

    def cell(r: dict, key: str) -> str:
        if r[key + "_fits"]:
            return f"{r[key + '_gib']:.1f} ({r[key + '_micro']}) fits"
        return f"{r[key + '_gib']:.1f} at 1/1: no"

    for r in rows:
        t.add_row(r["model"], f"{r['parameters_b']:.2f}B", *(cell(r, key) for key, _, _ in KEYS))
    Console(width=160).print(t)
    print(f"{verdict}: full fine-tuning {largest(rows, 'full')} with gradient checkpointing, "
          f"{largest(rows, 'full_no_ckpt')} without; LoRA r=16 {largest(rows, 'lora16')} with, "
          f"{largest(rows, 'lora16_no_ckpt')} without (micro-batches train/rollout)")


if __name__ == "__main__":
    sys.exit(main())
