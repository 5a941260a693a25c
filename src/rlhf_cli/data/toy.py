"""The built-in synthetic "list task": an offline stand-in for human preference data.

Why it exists
-------------
RLHF needs prompts, demonstrations and human preference labels, and judging whether it worked needs humans
again. This module replaces the humans with a hidden, exact *gold* preference function, so the whole pipeline
(SFT -> reward model -> PPO) runs offline on a CPU in minutes and its success is measurable: the gold score of
the policy's answers on held-out prompts should rise from SFT to PPO.

The task
--------
A prompt asks for ``n`` (1..4) distinct items of one category, optionally excluding one item of it::

    "give 3 fruit :"                 -> " fig plum pear !"
    "give 2 animal without cat :"    -> " dog horse !"

Completions start with a single space and separate words with single spaces; they carry no EOS marker (the
tokenizer layer appends EOS). Every prompt is assigned to the ``"train"`` or ``"eval"`` split by a stable
SHA-256 hash of its text (about 20% eval), so held-out evaluation uses prompts never seen in training.

Gold score (the hidden labeller)
--------------------------------
``gold_score(prompt, response)`` parses the prompt into ``(n, category, excluded)`` and splits the response on
whitespace. The maximal run of trailing ``"!"`` words is the enthusiasm count ``e``; every other word (a ``"!"``
in the middle included) is an *item word*, walked left to right:

* the excluded item                                        -> ``-2``  (every occurrence)
* not an item of the category (other category / unknown)  -> ``-1``
* an in-category item already used earlier (duplicate)    -> ``-1``
* a new in-category item while fewer than n were rewarded -> ``+1``
* a new in-category item after n were rewarded (too many) -> ``-1``

With ``items`` the sum of these terms::

    gold = items / n + enthusiasm(e)
    enthusiasm(e) = 0 if e == 0 else 0.5 - 0.75 * (e - 1)     # e = 0, 1, 2, 3 -> 0, 0.5, -0.25, -1.0

A perfect answer (n distinct in-category, non-excluded items, then exactly one "!") scores ``1.5`` for every n;
an empty response scores ``0``. The enthusiasm term is the trap: the labeller likes one "!", so a learned reward
model sees "!" correlate with preference, yet demonstrations rarely use two and never three, so the reward model
must extrapolate and a PPO policy can over-exploit it (more "!" -> higher learned reward, lower gold score).

Data
----
Demonstrations (``demonstrate``) are of mixed quality so that RL has room to improve: about half are item-perfect,
the rest contain one or two mistakes (count n+-1, an out-of-category item, a duplicate, the excluded item); the
trailing "!" count is 0/1/2 with probabilities 0.5/0.35/0.15. Preference pairs are two independent
demonstrations for one prompt with different gold scores; the better one is "chosen", then the pair is swapped
with probability ``label_noise`` (annotator noise), which caps any reward model's pairwise accuracy at
``label_noise_ceiling(label_noise) = 1 - label_noise``.

Everything is pure stdlib and deterministic in its arguments (``random.Random`` seeded with a string, never
Python's salted ``hash()``).
"""

from __future__ import annotations

import functools
import hashlib
import random
import re

from rlhf_cli.data.splits import cycled

SPLITS = ("train", "eval")
EVAL_PERCENT = 20  # share of prompts (by stable hash) held out for evaluation

CATEGORIES: dict[str, tuple[str, ...]] = {
    "fruit": ("apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "fig"),
    "animal": ("cat", "dog", "horse", "mouse", "tiger", "lion", "sheep", "goat", "wolf", "bear"),
    "color": ("red", "blue", "green", "yellow", "purple", "black", "white", "brown", "pink", "gray"),
    "tool": ("hammer", "saw", "drill", "wrench", "shovel", "rake", "chisel", "pliers", "axe", "ladder"),
    "city": ("paris", "london", "tokyo", "rome", "berlin", "madrid", "cairo", "lima", "oslo", "delhi"),
    "instrument": ("piano", "violin", "guitar", "drum", "flute", "harp", "cello", "trumpet", "banjo", "tuba"),
}
COUNTS = (1, 2, 3, 4)
BANG = "!"

EXCLUDED_PENALTY = -2.0
WRONG_ITEM_PENALTY = -1.0  # out-of-category or unknown word
DUPLICATE_PENALTY = -1.0
EXTRA_ITEM_PENALTY = -1.0  # a correct item beyond the requested n
BANG_BONUS = 0.5  # exactly one trailing "!"
EXTRA_BANG_PENALTY = 0.75  # per "!" beyond the first

# Demonstrator behaviour.
PERFECT_PROB = 0.5
BANG_COUNT_PROBS = (0.5, 0.35, 0.15)  # P(0, 1, 2 trailing "!")
TWO_MISTAKES_PROB = 0.3
# Which mistakes a flawed demonstration makes. Counting and category errors dominate: a small reward model learns
# them from pairs. Duplicates and the excluded item are rare, so the labels barely teach them: blind spots of the
# learned reward that the gold function still penalises (a second way for PPO to over-optimise).
MISTAKE_WEIGHTS = {"count": 0.45, "wrong_category": 0.45, "duplicate": 0.05, "excluded": 0.05}

_PROMPT_RE = re.compile(r"^\s*give\s+(\d+)\s+([a-z]+)(?:\s+without\s+([a-z]+))?\s*:\s*$")
_ITEM_CATEGORY = {item: cat for cat, items in CATEGORIES.items() for item in items}
assert len(_ITEM_CATEGORY) == sum(len(items) for items in CATEGORIES.values()), "items must be distinct"


# ----------------------------------------------------------------------------------------------- prompts


def make_prompt(n: int, category: str, excluded: str | None = None) -> str:
    """The prompt text for asking `n` items of `category`, optionally without `excluded`."""
    return f"give {n} {category}" + (f" without {excluded}" if excluded else "") + " :"


def parse_prompt(prompt: str) -> tuple[int, str, str | None]:
    """`(n, category, excluded)` of a task prompt; ValueError if `prompt` is not one."""
    match = _PROMPT_RE.match(prompt)
    if not match or match.group(2) not in CATEGORIES:
        raise ValueError(f"not a toy-task prompt: {prompt!r}")
    n, category, excluded = int(match.group(1)), match.group(2), match.group(3)
    if n < 1:
        raise ValueError(f"toy-task prompt asks for {n} items: {prompt!r}")
    return n, category, excluded


def prompt_split(prompt: str) -> str:
    """The split ("train" or "eval") a prompt belongs to, from a stable hash of its text."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % 100
    return "eval" if bucket < EVAL_PERCENT else "train"


@functools.cache
def _all_prompts() -> tuple[str, ...]:
    prompts = []
    for category, items in CATEGORIES.items():
        for n in COUNTS:
            for excluded in (None, *items):
                prompts.append(make_prompt(n, category, excluded))
    return tuple(prompts)


@functools.cache
def split_prompts(split: str) -> tuple[str, ...]:
    """All prompts of one split, in a fixed order."""
    _check_split(split)
    return tuple(p for p in _all_prompts() if prompt_split(p) == split)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


# ----------------------------------------------------------------------------------------------- gold score


def _enthusiasm(bangs: int) -> float:
    return 0.0 if bangs == 0 else BANG_BONUS - EXTRA_BANG_PENALTY * (bangs - 1)


def _split_response(response: str) -> tuple[list[str], int]:
    """`(item_words, trailing_bang_count)` of a response."""
    words = response.split()
    bangs = 0
    while bangs < len(words) and words[len(words) - 1 - bangs] == BANG:
        bangs += 1
    return words[: len(words) - bangs], bangs


def gold_breakdown(prompt: str, response: str) -> dict[str, float]:
    """The gold score's parts: `items` (already divided by n), `enthusiasm`, `bangs` and `total`."""
    n, category, excluded = parse_prompt(prompt)
    words, bangs = _split_response(response)
    allowed = CATEGORIES[category]
    seen: set[str] = set()
    rewarded = 0
    items = 0.0
    for word in words:
        if word == excluded:
            items += EXCLUDED_PENALTY
        elif word not in allowed:
            items += WRONG_ITEM_PENALTY
        elif word in seen:
            items += DUPLICATE_PENALTY
        elif rewarded < n:
            items += 1.0
            rewarded += 1
        else:
            items += EXTRA_ITEM_PENALTY
        seen.add(word)
    enthusiasm = _enthusiasm(bangs)
    return {"items": items / n, "enthusiasm": enthusiasm, "bangs": float(bangs), "total": items / n + enthusiasm}


def gold_score(prompt: str, response: str) -> float:
    """The hidden labeller's score of `response` to `prompt` (formula in the module docstring).

    Any response string is accepted; `prompt` must be a task prompt (ValueError otherwise).
    """
    return gold_breakdown(prompt, response)["total"]


def perfect_response(prompt: str) -> str:
    """The best-scoring answer: the first n allowed items of the category, then one "!"."""
    n, category, excluded = parse_prompt(prompt)
    items = [item for item in CATEGORIES[category] if item != excluded][:n]
    return _render(items, 1)


def max_gold_score() -> float:
    """The gold score of a perfect answer (the same for every prompt)."""
    return 1.0 + BANG_BONUS


# ----------------------------------------------------------------------------------------------- demonstrations


def _render(items: list[str], bangs: int) -> str:
    return "".join(f" {word}" for word in [*items, *[BANG] * bangs])


def _other_category_item(category: str, rng: random.Random) -> str:
    other = rng.choice([c for c in CATEGORIES if c != category])
    return rng.choice(CATEGORIES[other])


def _apply_mistake(kind: str, items: list[str], category: str, excluded: str | None, rng: random.Random) -> None:
    """Spoil `items` in place with one mistake: "duplicate", "wrong_category" or "excluded"."""
    if kind == "duplicate":
        if len(items) >= 2:
            source, target = rng.sample(range(len(items)), 2)
            items[target] = items[source]
        else:
            items.extend(items or [rng.choice(CATEGORIES[category])] * 2)
        return
    word = excluded if kind == "excluded" and excluded else _other_category_item(category, rng)
    if items:
        items[rng.randrange(len(items))] = word
    else:
        items.append(word)


def demonstrate(prompt: str, rng: random.Random) -> str:
    """One demonstration of mixed quality: item-perfect with probability ~0.5, otherwise 1-2 mistakes."""
    n, category, excluded = parse_prompt(prompt)
    allowed = [item for item in CATEGORIES[category] if item != excluded]
    bangs = rng.choices(range(len(BANG_COUNT_PROBS)), weights=BANG_COUNT_PROBS)[0]
    if rng.random() < PERFECT_PROB:
        return _render(rng.sample(allowed, n), bangs)

    kinds = {k: w for k, w in MISTAKE_WEIGHTS.items() if k != "excluded" or excluded}
    mistakes = []
    for _ in range(2 if rng.random() < TWO_MISTAKES_PROB else 1):
        kind = rng.choices(list(kinds), weights=list(kinds.values()))[0]
        mistakes.append(kind)
        del kinds[kind]
    size = n
    if "count" in mistakes:
        size = n + 1 if n == 1 or rng.random() < 0.5 else n - 1
    items = rng.sample(allowed, size)
    for kind in mistakes:
        if kind != "count":
            _apply_mistake(kind, items, category, excluded, rng)
    return _render(items, bangs)


# ----------------------------------------------------------------------------------------------- rows


def _rng(seed: int, split: str, purpose: str) -> random.Random:
    _check_split(split)
    return random.Random(f"rlhf_cli.toy:{purpose}:{split}:{seed}")


def sft_rows(num: int, seed: int, split: str = "train") -> list[dict]:
    """`num` rows `{"prompt", "completion"}` of (mixed-quality) demonstrations on `split`'s prompts."""
    rng = _rng(seed, split, "sft")
    prompts = split_prompts(split)
    rows = []
    for _ in range(num):
        prompt = rng.choice(prompts)
        rows.append({"prompt": prompt, "completion": demonstrate(prompt, rng)})
    return rows


def preference_rows(num: int, seed: int, split: str = "train", label_noise: float = 0.2) -> list[dict]:
    """`num` rows `{"prompt", "chosen", "rejected"}`: two demonstrations with different gold scores, the better
    one chosen, then swapped with probability `label_noise`."""
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    rng = _rng(seed, split, "preference")
    prompts = split_prompts(split)
    rows = []
    while len(rows) < num:
        prompt = rng.choice(prompts)
        a, b = demonstrate(prompt, rng), demonstrate(prompt, rng)
        score_a, score_b = gold_score(prompt, a), gold_score(prompt, b)
        if score_a == score_b:
            continue
        chosen, rejected = (a, b) if score_a > score_b else (b, a)
        if rng.random() < label_noise:
            chosen, rejected = rejected, chosen
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def prompt_rows(num: int, seed: int, split: str = "eval") -> list[dict]:
    """`num` rows `{"prompt"}`: `split`'s prompts in a seeded shuffled order, cycling only once all were used."""
    return [{"prompt": p} for p in cycled(split_prompts(split), num, _rng(seed, split, "prompts"))]


def label_noise_ceiling(label_noise: float) -> float:
    """The best pairwise accuracy any reward model can reach against labels flipped with prob. `label_noise`.

    The gold ordering of every pair is strict, so a perfect model agrees with the noisy label exactly when it
    was not flipped: `1 - label_noise` (for label_noise <= 0.5).
    """
    return 1.0 - label_noise


# ----------------------------------------------------------------------------------------------- tokenizer corpus


def corpus() -> list[str]:
    """Texts covering every word the task can emit (prompt words, all items, "!", ":"), both at the start of a
    text and after a space, for training a tokenizer."""
    texts = list(_all_prompts())
    for category, items in CATEGORIES.items():
        texts.append(_render(list(items), 3))
        texts.append(" ".join([category, *items, BANG, ":", "give", "without", *map(str, COUNTS)]))
    texts.extend(perfect_response(p) for p in _all_prompts())
    return list(dict.fromkeys(texts))
