"""Built-in reward functions, named on the command line as `rlhf_cli.rewards:<name>`.

    rlhf ppo data=arith algo=grpo 'reward.functions=[rlhf_cli.rewards:exact_match]'

Each follows the call convention of every reward function (see the README, "Rewards written as code"):
`fn(prompts, completions, **columns) -> list[float | None]`, one number per completion, None where the function
does not apply to that row. `columns` are the prompt rows' other fields (e.g. `answer`), one list each.

Import-light on purpose (no torch): a user's own reward file may import it.
"""

from __future__ import annotations

import re

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")


def _number(text: str) -> float | None:
    """A number written as text (signs, thousands commas, decimals allowed), else None."""
    text = text.strip().replace(",", "")
    try:
        return float(text)
    except ValueError:
        return None


def extract_answer(completion: str) -> float | None:
    """The answer a completion gives, as a number, or None when it gives none. What counts as the answer:
    1. the content of the last `\\boxed{...}`, when there is one;
    2. else the number after the last `####` (GSM8K's marker), when there is one;
    3. else the last number in the completion.
    A number may carry a sign, thousands commas and decimals: "-3", "1,024", "2.50". So " 12", "12 apples",
    "the answer is 12." and "#### 12" all answer 12; "12 or 13" answers 13.
    """
    boxed = _BOXED.findall(completion)
    if boxed:
        return _number(boxed[-1])
    if "####" in completion:
        tail = _NUMBER.search(completion.rsplit("####", 1)[1])
        return _number(tail.group()) if tail else None
    numbers = _NUMBER.findall(completion)
    return _number(numbers[-1]) if numbers else None


def exact_match(prompts: list[str], completions: list[str], answer: list | None = None, **_) -> list[float | None]:
    """1.0 when a completion's answer (`extract_answer`) equals the row's `answer` column as a number, 0.0 when it
    differs or the completion gives none; None for a row without an answer (no `answer` column, or an empty one).
    """
    if answer is None:
        return [None] * len(completions)
    out: list[float | None] = []
    for completion, expected in zip(completions, answer):
        want = None if expected is None else _number(str(expected))
        if want is None:
            out.append(None)
            continue
        got = extract_answer(completion)
        out.append(float(got is not None and got == want))
    return out


def gold(prompts: list[str], completions: list[str], **_) -> list[float | None]:
    """The built-in list task's hidden gold score (rlhf_cli.data.toy.gold_score) of each completion: RL on the
    labeller itself instead of a reward model learned from its noisy labels. None for a prompt that is not one of
    that task's."""
    from rlhf_cli.data import toy

    out: list[float | None] = []
    for prompt, completion in zip(prompts, completions):
        try:
            toy.parse_prompt(prompt)
        except ValueError:
            out.append(None)
            continue
        out.append(toy.gold_score(prompt, completion))
    return out
