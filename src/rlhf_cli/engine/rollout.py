"""Rollouts for RL stages and evaluation: sampling, per-token log-probs and values, reward-model scores.

Every sequence of a rollout shares one layout, [P left-padded prompt | R response], R = response_length, with
position_ids = cumsum(attention_mask) - 1 in every forward pass, so a row's numbers do not depend on which rows
share its batch. Log-probs use logits / temperature, the same T as at sampling time.

Types: `sample` returns `Samples` (the tokens and their masks); PPO adds what each role measures on them and gets a
`Rollout`; a `Scorer` is the reward model with what it needs to read a policy's samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

from rlhf_cli.engine.fsdp import generating, is_sharded
from rlhf_cli.models.loading import logits_at
from rlhf_cli.models.reward import score_padded, score_sequences
from rlhf_cli.rl import ppo as rl
from rlhf_cli.rl.masks import position_ids_from_mask


@dataclass
class Samples:
    """B sampled responses to B prompts (P = the widest prompt, R = response_length); every tensor on one device."""
    prompt: torch.Tensor          # [B, P] long: prompt ids, left-padded
    prompt_mask: torch.Tensor     # [B, P] long: 1 on prompt tokens
    response: torch.Tensor        # [B, R] long: response ids, padding after the first EOS
    mask: torch.Tensor            # [B, R] float: 1 on response tokens (the EOS included)
    ended: torch.Tensor           # [B] bool: the response ended with EOS within R tokens
    input_ids: torch.Tensor       # [B, P + R] long: prompt and response
    attention_mask: torch.Tensor  # [B, P + R] long


@dataclass
class Rollout:
    """A PPO rollout: the samples (fields as in `Samples`) and what each role measured on them, all constants for
    the update (no autograd history, outside inference mode)."""
    prompt: torch.Tensor          # [B, P] long
    prompt_mask: torch.Tensor     # [B, P] long
    response: torch.Tensor        # [B, R] long
    mask: torch.Tensor            # [B, R] float
    ended: torch.Tensor           # [B] bool
    input_ids: torch.Tensor       # [B, P + R] long
    attention_mask: torch.Tensor  # [B, P + R] long
    logprobs: torch.Tensor        # [B, R] float: log π_old(response token), at the sampling temperature; 0 on padding
    ref_logprobs: torch.Tensor    # [B, R] float: the same under the frozen reference
    values: torch.Tensor | None   # [B, R] float: V(state before each response token), 0 on padding; None: no value model
    scores: torch.Tensor          # [B] float: the raw score, Σ weight x component (the reward model's score alone
                                  # by default; rl.reward.weighted_sum)
    prompt_text: list[str]        # B decoded prompts (special tokens skipped)
    response_text: list[str]      # B decoded responses
    components: dict = field(default_factory=dict)  # name -> [B] raw value of each reward component (NaN: None)
    members: torch.Tensor | None = None  # [K, B] an ensemble's members' standardised scores (None: one reward model)


def constants(roll: Rollout) -> Rollout:
    """A copy whose tensors are ordinary tensors: those made under inference mode cannot enter autograd."""
    return Rollout(**{f.name: (v.clone() if torch.is_tensor(v := getattr(roll, f.name)) else v)
                      for f in fields(Rollout)})


@dataclass(frozen=True)
class Scorer:
    """The reward model and what it needs to read a policy's samples."""
    model: Any                    # a models.reward.RewardModel, frozen
    tokenizer: Any                # the reward model's tokenizer
    same_tokens: bool             # it reads the policy's token ids as they are (else: decoded text, re-tokenised)
    max_len: int                  # longest re-tokenised prompt + response (data.max_seq_len)


BACKENDS = ("auto", "eager", "compiled")


def backend_for(setting: str, device: torch.device) -> str:
    """`ppo.rollout_backend`: auto = compiled on CUDA (decoding is kernel-launch bound there), eager elsewhere."""
    if setting not in BACKENDS:
        raise ValueError(f"unknown rollout backend {setting!r}; expected one of {', '.join(BACKENDS)}")
    return ("compiled" if device.type == "cuda" else "eager") if setting == "auto" else setting


def rollout(policy, prompts: list[list[int]], response_length: int, temperature: float, micro: int, pad_id: int,
            eos_id: int, device, backend: str = "auto") -> Samples:
    """B responses to B prompts, the one place a sampler plugs in (an inference engine would replace this
    function): `Samples` in the shared layout, plain temperature sampling, truncated after the first EOS.

    Backends (`backend_for`): eager = transformers' `generate` with a dynamic KV cache (the CPU path); compiled =
    `generate` with a static KV cache, whose decoding step transformers compiles (torch.compile, CUDA graphs) on
    CUDA; prompts are then left-padded to a multiple of 64 tokens for generation only, so a run compiles for a few
    shapes, not one per batch. Both sample from the same distribution and return the same layout.

    A sharded (FSDP) policy is gathered for the whole rollout (engine.fsdp.generating): every rank decodes its own
    prompts with the full weights, without a collective per token. `auto` decodes it eagerly: FSDP's per-module
    hooks still run at every step, which CUDA graphs do not capture (`compiled` asks for it anyway)."""
    static = backend_for(backend, device) == "compiled" and not (backend == "auto" and is_sharded(policy))
    with generating(policy):
        return sample(policy, prompts, response_length, temperature, micro, pad_id, eos_id, device, static=static)


@torch.no_grad()
def sample(policy, prompts: list[list[int]], response_length: int, temperature: float, micro: int, pad_id: int,
           eos_id: int, device, static: bool = False) -> Samples:
    """Sample responses with the KV cache from left-padded prompts: plain temperature sampling (top_k=0,
    top_p=1, no other logits processor), max_new_tokens = response_length, then everything after the first EOS
    becomes padding. All rows share one layout: [P left-padded prompt | R response] with R = response_length.
    static: a static KV cache (compiled by transformers on CUDA), over prompts padded to a multiple of 64."""
    from transformers import GenerationConfig

    extra = {"cache_implementation": "static"} if static else {}
    gen = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                           max_new_tokens=response_length, min_new_tokens=0, repetition_penalty=1.0,
                           no_repeat_ngram_size=0, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None, **extra)
    width = max(len(x) for x in prompts)
    prompt = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt)
    for i, ids in enumerate(prompts):
        prompt[i, width - len(ids):] = torch.tensor(ids)
        prompt_mask[i, width - len(ids):] = 1
    prompt, prompt_mask = prompt.to(device), prompt_mask.to(device)
    lead = -width % 64 if static else 0   # generation-only left padding: a few compiled shapes
    responses = []
    for i in range(0, len(prompts), micro):
        ids, am = prompt[i:i + micro], prompt_mask[i:i + micro]
        if lead:
            ids = torch.cat([ids.new_full((ids.shape[0], lead), pad_id), ids], 1)
            am = torch.cat([am.new_zeros((am.shape[0], lead)), am], 1)
        out = policy.generate(input_ids=ids, attention_mask=am, generation_config=gen)
        r = out[:, lead + width:]
        if r.shape[1] < response_length:  # every row stopped early
            r = torch.cat([r, r.new_full((r.shape[0], response_length - r.shape[1]), pad_id)], 1)
        responses.append(r)
    tokens, mask, ended = rl.truncate_after_stop(torch.cat(responses), [eos_id], pad_id)
    return Samples(prompt=prompt, prompt_mask=prompt_mask, response=tokens, mask=mask.float(), ended=ended,
                   input_ids=torch.cat([prompt, tokens], 1), attention_mask=torch.cat([prompt_mask, mask.long()], 1))


def decode(samples: Samples, tokenizer) -> tuple[list[str], list[str]]:
    """(prompt texts, response texts), special tokens skipped."""
    return (tokenizer.batch_decode(samples.prompt, skip_special_tokens=True),
            tokenizer.batch_decode(samples.response, skip_special_tokens=True))


def response_positions(samples: Samples | Rollout) -> torch.Tensor:
    """The R positions whose outputs predict (logits) or value (V) the response tokens: P − 1 ... P + R − 2."""
    width, length = samples.prompt.shape[1], samples.response.shape[1]
    return torch.arange(width - 1, width - 1 + length, device=samples.input_ids.device)


def policy_logits(model, samples: Samples | Rollout, idx) -> torch.Tensor:
    """Logits at the positions that predict each response token of rows `idx`: [b, R, V], in the forward's dtype
    (the LM head runs on those R positions only; log-probs upcast them chunk-wise)."""
    am = samples.attention_mask[idx]
    return logits_at(model, response_positions(samples), input_ids=samples.input_ids[idx], attention_mask=am,
                     position_ids=position_ids_from_mask(am))


def response_logprobs(model, samples: Samples | Rollout, temperature: float, micro: int) -> torch.Tensor:
    """log p(response token) under `model` at `temperature`, [B, R], 0 on padding; `micro` rows per forward."""
    out = []
    for i in range(0, samples.response.shape[0], micro):
        idx = slice(i, i + micro)
        out.append(rl.logprobs_from_logits(policy_logits(model, samples, idx), samples.response[idx], temperature))
    return torch.cat(out) * samples.mask


def value_slice(value_model, samples: Samples | Rollout, idx) -> torch.Tensor:
    """V at the positions that predict each response token of rows `idx`: [b, R]."""
    return value_model(samples.input_ids[idx], samples.attention_mask[idx], per_token=True,
                       positions=response_positions(samples)).float()


def response_values(value_model, samples: Samples, micro: int) -> torch.Tensor:
    """V before each response token, [B, R], 0 on padding; `micro` rows per forward."""
    out = [value_slice(value_model, samples, slice(i, i + micro)) for i in range(0, samples.response.shape[0], micro)]
    return torch.cat(out) * samples.mask


def score_responses(scorer: Scorer, samples: Samples, prompt_text: list[str], response_text: list[str],
                    micro: int) -> torch.Tensor:
    """The reward model's score at the last real token of prompt + response, [B]. Shared tokenizer: the samples'
    ids as they are. Otherwise: the texts re-tokenised as the reward model was trained to read them (one side of
    a preference pair: data.preference.tokenize_responses)."""
    if scorer.same_tokens:
        return score_padded(scorer.model, samples.input_ids, samples.attention_mask, micro)
    from rlhf_cli.data.preference import tokenize_responses

    tokenized = tokenize_responses(prompt_text, response_text, scorer.tokenizer, scorer.max_len,
                                   scorer.model.is_encoder)
    return score_sequences(scorer.model, [x["input_ids"] for x in tokenized], scorer.tokenizer.pad_token_id,
                           samples.input_ids.device, micro)
