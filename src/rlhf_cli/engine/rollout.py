"""Rollouts for RL stages and evaluation: sampling, per-token log-probs and values, reward-model scores.

Every sequence of a rollout shares one layout, [P left-padded prompt | R response], R = response_length, with
position_ids = cumsum(attention_mask) - 1 in every forward pass, so a row's numbers do not depend on which rows
share its batch. Log-probs use logits / temperature, the same T as at sampling time.
"""

from __future__ import annotations

import torch

from rlhf_cli.rl import ppo as rl


@torch.inference_mode()
def rollout(policy, prompts: list[list[int]], response_length: int, temperature: float, micro: int, pad_id: int,
            eos_id: int, device) -> dict:
    """Sample responses with the KV cache from left-padded prompts: plain temperature sampling (top_k=0,
    top_p=1, no other logits processor), max_new_tokens = response_length, then everything after the first EOS
    becomes padding. All rows share one layout: [P left-padded prompt | R response] with R = response_length."""
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                           max_new_tokens=response_length, min_new_tokens=0, repetition_penalty=1.0,
                           no_repeat_ngram_size=0, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None)
    width = max(len(x) for x in prompts)
    prompt = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt)
    for i, ids in enumerate(prompts):
        prompt[i, width - len(ids):] = torch.tensor(ids)
        prompt_mask[i, width - len(ids):] = 1
    prompt, prompt_mask = prompt.to(device), prompt_mask.to(device)
    responses = []
    for i in range(0, len(prompts), micro):
        out = policy.generate(input_ids=prompt[i:i + micro], attention_mask=prompt_mask[i:i + micro],
                              generation_config=gen)
        r = out[:, width:]
        if r.shape[1] < response_length:  # every row stopped early
            r = torch.cat([r, r.new_full((r.shape[0], response_length - r.shape[1]), pad_id)], 1)
        responses.append(r)
    tokens, mask, ended = rl.truncate_after_stop(torch.cat(responses), [eos_id], pad_id)
    return {"prompt": prompt, "prompt_mask": prompt_mask, "response": tokens, "mask": mask.float(),
            "ended": ended, "input_ids": torch.cat([prompt, tokens], 1),
            "attention_mask": torch.cat([prompt_mask, mask.long()], 1)}


def _forward_slice(roll: dict, idx):
    """(input_ids, attention_mask, position_ids = cumsum(mask) - 1) of rollout rows `idx`."""
    ids, am = roll["input_ids"][idx], roll["attention_mask"][idx]
    return ids, am, (am.cumsum(-1) - 1).clamp(min=0)


def policy_logits(model, roll: dict, idx) -> torch.Tensor:
    """Logits at the positions that predict each response token: [b, R, V]."""
    width, length = roll["prompt"].shape[1], roll["response"].shape[1]
    ids, am, pos = _forward_slice(roll, idx)
    logits = model(input_ids=ids, attention_mask=am, position_ids=pos).logits
    return logits[:, width - 1:width - 1 + length].float()


def response_logprobs(model, roll: dict, temperature: float, micro: int) -> torch.Tensor:
    out = []
    for i in range(0, roll["response"].shape[0], micro):
        idx = slice(i, i + micro)
        out.append(rl.logprobs_from_logits(policy_logits(model, roll, idx), roll["response"][idx], temperature))
    return torch.cat(out) * roll["mask"]


def value_slice(value_model, roll: dict, idx) -> torch.Tensor:
    """V at the positions that predict each response token: [b, R]."""
    width, length = roll["prompt"].shape[1], roll["response"].shape[1]
    ids, am, _ = _forward_slice(roll, idx)
    return value_model(ids, am, per_token=True)[:, width - 1:width - 1 + length].float()


def response_values(value_model, roll: dict, micro: int) -> torch.Tensor:
    out = [value_slice(value_model, roll, slice(i, i + micro)) for i in range(0, roll["response"].shape[0], micro)]
    return torch.cat(out) * roll["mask"]


def score_responses(reward_model, roll: dict, tokenizer, reward_tokenizer, same_tokens: bool, micro: int,
                    max_len: int) -> torch.Tensor:
    """The reward model's score at the last real token of prompt + response. Shared tokenizer: the rollout's ids
    as they are. Otherwise: decode the texts and re-tokenise them as the reward model was trained to read them."""
    roll["prompt_text"] = tokenizer.batch_decode(roll["prompt"], skip_special_tokens=True)
    roll["response_text"] = tokenizer.batch_decode(roll["response"], skip_special_tokens=True)
    scores = []
    if same_tokens:
        for i in range(0, roll["response"].shape[0], micro):
            idx = slice(i, i + micro)
            scores.append(reward_model(roll["input_ids"][idx], roll["attention_mask"][idx]).float())
        return torch.cat(scores)
    from rlhf_cli.data.preference import collate_pairs, tokenize_pairs

    rows = [{"prompt": pr, "chosen": rs, "rejected": rs} for pr, rs in zip(roll["prompt_text"], roll["response_text"])]
    examples, _ = tokenize_pairs(rows, reward_tokenizer, max_len, reward_model.is_encoder, source="rollout")
    device = roll["input_ids"].device
    for i in range(0, len(examples), micro):
        batch = collate_pairs(examples[i:i + micro], reward_tokenizer.pad_token_id)
        n = len(examples[i:i + micro])
        scores.append(reward_model(batch["input_ids"][:n].to(device), batch["attention_mask"][:n].to(device)).float())
    return torch.cat(scores)
