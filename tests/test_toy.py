"""The synthetic list task: gold formula, determinism, splits, label noise, demonstration quality."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import random
import time

import pytest

from rlhf_cli.data import toy

PROMPT = "give 3 fruit without apple :"  # allowed: every fruit but apple


@pytest.mark.parametrize(
    ("prompt", "response", "expected"),
    [
        (PROMPT, " banana cherry grape !", 3 / 3 + 0.5),  # perfect
        (PROMPT, " banana cherry grape", 3 / 3 + 0.0),  # no "!"
        (PROMPT, " banana cherry grape ! !", 3 / 3 + 0.5 - 0.75),  # two "!"
        (PROMPT, " banana cherry grape ! ! !", 3 / 3 + 0.5 - 1.5),  # three "!"
        (PROMPT, " banana dog grape !", (1 - 1 + 1) / 3 + 0.5),  # one wrong-category word
        (PROMPT, " banana xyzzy grape !", (1 - 1 + 1) / 3 + 0.5),  # an unknown word
        (PROMPT, " banana banana grape !", (1 - 1 + 1) / 3 + 0.5),  # a duplicate
        (PROMPT, " banana apple grape !", (1 - 2 + 1) / 3 + 0.5),  # the excluded item
        (PROMPT, " banana cherry grape fig !", (3 - 1) / 3 + 0.5),  # one item too many
        (PROMPT, " banana cherry !", 2 / 3 + 0.5),  # one item too few
        (PROMPT, " banana ! cherry grape", (1 - 1 + 1 + 1) / 3),  # a "!" that is not trailing is a wrong word
        (PROMPT, "banana   cherry grape !  ", 1.5),  # whitespace does not matter
        (PROMPT, "", 0.0),
        (PROMPT, " !", 0.5),
        ("give 1 animal :", " cat !", 1.5),
        ("give 1 animal :", " cat dog ! !", (1 - 1) / 1 + 0.5 - 0.75),
        ("give 4 color without red :", " blue green pink gray !", 1.5),
        ("give 4 color without red :", " blue red red gray", (1 - 2 - 2 + 1) / 4),
    ],
)
def test_gold_score_matches_hand_computed_values(prompt: str, response: str, expected: float) -> None:
    assert toy.gold_score(prompt, response) == pytest.approx(expected)


def test_perfect_response_scores_the_maximum_for_every_prompt() -> None:
    for split in toy.SPLITS:
        for prompt in toy.split_prompts(split):
            response = toy.perfect_response(prompt)
            assert toy.gold_score(prompt, response) == pytest.approx(toy.max_gold_score()) == pytest.approx(1.5)
            assert response.startswith(" ") and "  " not in response and response == response.rstrip()
    assert toy.perfect_response(PROMPT) == " banana cherry grape !"


GARBAGE = ["", "   ", "\n\t", "!!!", "! ! ! ! ! !", "APPLE Banana", "ünï ☃ 你好", "\x00\x01", "a" * 5000]


@pytest.mark.parametrize("response", GARBAGE)
def test_garbage_responses_do_not_raise(response: str) -> None:
    assert isinstance(toy.gold_score(PROMPT, response), float)


def test_unparseable_prompt_raises_value_error() -> None:
    for prompt in ["hello", "give 3 spaceship :", "give 0 fruit :", ""]:
        with pytest.raises(ValueError):
            toy.gold_score(prompt, " apple")


def test_rows_are_deterministic_per_seed() -> None:
    assert toy.sft_rows(50, seed=1) == toy.sft_rows(50, seed=1)
    assert toy.sft_rows(50, seed=1) != toy.sft_rows(50, seed=2)
    assert toy.preference_rows(50, seed=1) == toy.preference_rows(50, seed=1)
    assert toy.preference_rows(50, seed=1) != toy.preference_rows(50, seed=2)
    assert toy.prompt_rows(20, seed=1) == toy.prompt_rows(20, seed=1)
    assert toy.prompt_rows(20, seed=1) != toy.prompt_rows(20, seed=2)


def test_row_shapes() -> None:
    (sft,) = toy.sft_rows(1, seed=0)
    assert set(sft) == {"prompt", "completion"} and sft["completion"].startswith(" ")
    (pref,) = toy.preference_rows(1, seed=0)
    assert set(pref) == {"prompt", "chosen", "rejected"}
    (prompt,) = toy.prompt_rows(1, seed=0)
    assert set(prompt) == {"prompt"}


def test_splits_are_disjoint_and_rows_stay_in_their_split() -> None:
    train, evaluation = set(toy.split_prompts("train")), set(toy.split_prompts("eval"))
    assert train and evaluation and not train & evaluation
    assert 0.1 < len(evaluation) / (len(train) + len(evaluation)) < 0.3
    assert {r["prompt"] for r in toy.sft_rows(500, seed=0, split="train")} <= train
    assert {r["prompt"] for r in toy.preference_rows(500, seed=0, split="train")} <= train
    assert {r["prompt"] for r in toy.prompt_rows(500, seed=0, split="eval")} <= evaluation
    assert {r["prompt"] for r in toy.sft_rows(500, seed=0, split="eval")} <= evaluation


def test_prompt_rows_use_every_prompt_before_repeating() -> None:
    evaluation = toy.split_prompts("eval")
    rows = toy.prompt_rows(len(evaluation), seed=3)
    assert sorted(r["prompt"] for r in rows) == sorted(evaluation)


def test_unknown_split_raises_value_error() -> None:
    for make in (toy.sft_rows, toy.preference_rows, toy.prompt_rows):
        with pytest.raises(ValueError):
            make(1, 0, split="test")


def test_preference_pairs_without_noise_always_prefer_higher_gold() -> None:
    for row in toy.preference_rows(500, seed=0, label_noise=0.0):
        assert toy.gold_score(row["prompt"], row["chosen"]) > toy.gold_score(row["prompt"], row["rejected"])


def test_preference_label_noise_flips_the_requested_share() -> None:
    rows = toy.preference_rows(2000, seed=0, label_noise=0.3)
    flipped = 0
    for row in rows:
        chosen, rejected = toy.gold_score(row["prompt"], row["chosen"]), toy.gold_score(row["prompt"], row["rejected"])
        assert chosen != rejected
        flipped += chosen < rejected
    assert abs(flipped / len(rows) - 0.3) < 0.04
    assert toy.label_noise_ceiling(0.3) == pytest.approx(0.7)


def test_demonstrations_are_of_mixed_quality() -> None:
    rng = random.Random(0)
    prompts = toy.split_prompts("train")
    item_perfect, bang_counts, gold = 0, [0, 0, 0], []
    for _ in range(2000):
        prompt = rng.choice(prompts)
        parts = toy.gold_breakdown(prompt, toy.demonstrate(prompt, rng))
        item_perfect += parts["items"] == 1.0
        bang_counts[int(parts["bangs"])] += 1
        gold.append(parts["total"])
    assert 0.3 < item_perfect / 2000 < 0.7
    for count, expected in zip(bang_counts, toy.BANG_COUNT_PROBS):
        assert abs(count / 2000 - expected) < 0.04
    assert sum(gold) / len(gold) < toy.max_gold_score() - 0.5  # plenty of room for RL to improve


def test_corpus_covers_every_word_the_task_emits() -> None:
    words = {word for text in toy.corpus() for word in text.split()}
    items = {item for items in toy.CATEGORIES.values() for item in items}
    assert items | set(toy.CATEGORIES) | {"give", "without", "!", ":", "1", "2", "3", "4"} <= words


def test_generation_is_cheap() -> None:
    start = time.perf_counter()
    toy.sft_rows(10_000, seed=0)
    assert time.perf_counter() - start < 1.0
