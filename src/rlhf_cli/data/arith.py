"""The built-in arithmetic task (`data=arith`): prompts with one checkable answer, for rewards written as code.

The task
--------
A prompt is a sum or a difference of two single-digit numbers, the answer its value::

    "7+5="   -> "12"          "9-4="   -> "5"

Differences never go below zero (a >= b), so there are 100 sums and 55 differences. Prompts and completions carry
no spaces: the built-in tiny model's tokenizer reads every digit as one token. Every prompt row has an `answer`
column (the value, as a string: what `rlhf_cli.rewards:exact_match` compares a completion with).

Every prompt belongs to the "train" or "eval" split by a stable SHA-256 hash of its text (about 20% eval), so the
held-out prompts are sums and differences never seen in training: a policy scores on them only by computing.

Demonstrations (SFT) are right with probability `demo_accuracy` (0.4 by default); otherwise the answer is off by
1 or 2 (either way, never below zero), so SFT alone leaves room for RL. At temperature 1 the SFT policy of the
default pipeline answers about 30% of the held-out prompts right, while its most likely answer is right far more
often: a reward that checks the answer can teach it to say what it knows.

Preference pairs (for `rlhf reward` on this task) are a right and a wrong demonstration, the right one chosen,
swapped with probability `label_noise`. The gold score is exact match (1 or 0), as `rlhf_cli.rewards:exact_match`
computes it: on this task the `gold` column of ppo and eval is the share of right answers.

Pure stdlib, deterministic in its arguments (`random.Random` seeded with a string).
"""

from __future__ import annotations

import functools
import hashlib
import random
import re

from rlhf_cli.data.splits import cycled

SPLITS = ("train", "eval")
EVAL_PERCENT = 20
MAX_OPERAND = 9
ERRORS = (-2, -1, 1, 2)  # how far a wrong demonstration is off

_PROMPT_RE = re.compile(r"^\s*(\d+)\s*([+-])\s*(\d+)\s*=\s*$")


def make_prompt(a: int, op: str, b: int) -> str:
    return f"{a}{op}{b}="


def answer(prompt: str) -> int:
    """The value of a task prompt; ValueError if `prompt` is not one."""
    match = _PROMPT_RE.match(prompt)
    if not match:
        raise ValueError(f"not an arith-task prompt: {prompt!r}")
    a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
    return a + b if op == "+" else a - b


def prompt_split(prompt: str) -> str:
    """The split ("train" or "eval") of a prompt, from a stable hash of its text."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % 100
    return "eval" if bucket < EVAL_PERCENT else "train"


@functools.cache
def split_prompts(split: str) -> tuple[str, ...]:
    """All prompts of one split, in a fixed order."""
    _check_split(split)
    prompts = [make_prompt(a, op, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)
               for op in "+-" if op == "+" or a >= b]
    return tuple(p for p in prompts if prompt_split(p) == split)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _rng(seed: int, split: str, purpose: str) -> random.Random:
    _check_split(split)
    return random.Random(f"rlhf_cli.arith:{purpose}:{split}:{seed}")


def wrong_answer(prompt: str, rng: random.Random) -> int:
    """A value 1 or 2 away from the answer, never below zero."""
    right = answer(prompt)
    return rng.choice([right + e for e in ERRORS if right + e >= 0])


def demonstrate(prompt: str, rng: random.Random, accuracy: float) -> str:
    """The answer with probability `accuracy`, else a wrong one."""
    return str(answer(prompt) if rng.random() < accuracy else wrong_answer(prompt, rng))


def sft_rows(num: int, seed: int, split: str = "train", demo_accuracy: float = 0.4) -> list[dict]:
    """`num` rows `{"prompt", "completion", "answer"}` of demonstrations, right with probability `demo_accuracy`."""
    rng = _rng(seed, split, "sft")
    prompts = split_prompts(split)
    rows = []
    for _ in range(num):
        prompt = rng.choice(prompts)
        rows.append({"prompt": prompt, "completion": demonstrate(prompt, rng, demo_accuracy),
                     "answer": str(answer(prompt))})
    return rows


def preference_rows(num: int, seed: int, split: str = "train", label_noise: float = 0.2) -> list[dict]:
    """`num` rows `{"prompt", "chosen", "rejected"}`: the answer against a wrong one, swapped with probability
    `label_noise`."""
    rng = _rng(seed, split, "preference")
    prompts = split_prompts(split)
    rows = []
    for _ in range(num):
        prompt = rng.choice(prompts)
        chosen, rejected = str(answer(prompt)), str(wrong_answer(prompt, rng))
        if rng.random() < label_noise:
            chosen, rejected = rejected, chosen
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def prompt_rows(num: int, seed: int, split: str = "eval") -> list[dict]:
    """`num` rows `{"prompt", "answer"}`: `split`'s prompts in a seeded shuffled order, cycling only once all were
    used."""
    return [{"prompt": p, "answer": str(answer(p))} for p in cycled(split_prompts(split), num,
                                                                   _rng(seed, split, "prompts"))]


def gold_score(prompt: str, response: str) -> float:
    """1.0 when the response's answer (rlhf_cli.rewards.extract_answer) is the prompt's value, else 0.0."""
    from rlhf_cli.rewards import extract_answer

    got = extract_answer(response)
    return float(got is not None and got == answer(prompt))


def label_noise_ceiling(label_noise: float) -> float:
    """The best pairwise accuracy against labels flipped with probability `label_noise`: 1 - label_noise."""
    return 1.0 - label_noise
