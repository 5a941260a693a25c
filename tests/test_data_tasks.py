"""data.tasks: the built-in task or a file, decided once: rows, pairs, prompts and the gold score each stage reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_cli.config import DataConfig, ToyDataConfig
from rlhf_cli.data import tasks, toy
from rlhf_cli.data.loading import Source
from rlhf_cli.data.splits import holdout
from rlhf_cli.errors import DataError

TOY = ToyDataConfig(seed=3, num_train=40, num_eval=12, label_noise=0.25)
SFT_ROWS = [{"prompt": f"question {i}", "completion": f" answer {i}"} for i in range(20)]
PAIRS = [{"prompt": f"question {i}", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(20)]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def builtin() -> DataConfig:
    return DataConfig(toy=TOY)


# ---------------------------------------------------------------------------------------------------------------------
# The built-in task: exactly what data.toy gives


def test_builtin_sft_rows_are_the_toy_task_s():
    train, held, source = tasks.sft_rows(builtin(), seed=99)
    assert train == toy.sft_rows(TOY.num_train, TOY.seed, "train")
    assert held == toy.sft_rows(TOY.num_eval, TOY.seed, "eval")
    assert source == "built-in task"


def test_builtin_preference_pairs_are_the_toy_task_s():
    train, held, source, stats = tasks.preference_pairs(builtin(), seed=99)
    assert train == toy.preference_rows(TOY.num_train, TOY.seed, "train", TOY.label_noise)
    assert held == toy.preference_rows(TOY.num_eval, TOY.seed, "eval", TOY.label_noise)
    assert source == "built-in task"
    assert stats == {"rows": TOY.num_train + TOY.num_eval, "label_noise": TOY.label_noise}


def test_builtin_prompts_are_the_toy_task_s():
    prompts, _, source = tasks.train_prompts(builtin(), tokenizer=None)
    assert prompts == [r["prompt"] for r in toy.prompt_rows(TOY.num_train, TOY.seed, "train")]
    assert source == "built-in task"
    prompts, _, source = tasks.eval_prompts(builtin(), 7, tokenizer=None)
    assert prompts == [r["prompt"] for r in toy.prompt_rows(7, TOY.seed, "eval")]
    assert len(prompts) == 7
    assert source == "the built-in task's held-out split"


def test_builtin_task_has_a_gold_score():
    data = builtin()
    assert tasks.is_builtin(data)
    assert tasks.gold_scorer(data) is toy.gold_score
    _, held, _, _ = tasks.preference_pairs(data, seed=0)
    expected = [toy.gold_score(p["prompt"], p["chosen"]) > toy.gold_score(p["prompt"], p["rejected"]) for p in held]
    assert tasks.gold_preferences(data, held) == expected
    assert not all(expected)  # label_noise flipped some
    assert tasks.label_noise_ceiling(data) == {"label_noise_ceiling": pytest.approx(toy.label_noise_ceiling(0.25))}


# ---------------------------------------------------------------------------------------------------------------------
# A file: split by eval_fraction, or held out from eval_path


def test_file_sft_rows_are_split_by_eval_fraction(tmp_path):
    data = DataConfig(path=write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS), eval_fraction=0.25)
    train, held, source = tasks.sft_rows(data, seed=5)
    assert (train, held) == holdout(SFT_ROWS, 0.25, data.max_eval_rows, 5)
    assert len(held) == 5 and len(train) == 15
    assert train == [row for row in SFT_ROWS if row not in held]  # training rows keep their order
    assert isinstance(source, Source) and source.name == str((tmp_path / "sft.jsonl").resolve())
    assert tasks.sft_rows(data, seed=5) == (train, held, source)
    assert tasks.sft_rows(data, seed=6)[1] != held


def test_file_sft_rows_max_rows_and_max_eval_rows(tmp_path):
    data = DataConfig(path=write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS), eval_fraction=0.5, max_eval_rows=3,
                      max_rows=10)
    train, held, _ = tasks.sft_rows(data, seed=0)
    assert len(held) == 3 and len(train) == 7
    assert sorted(train + held, key=SFT_ROWS.index) == SFT_ROWS[:10]


def test_file_sft_rows_respect_eval_path(tmp_path):
    eval_rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    data = DataConfig(path=write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS),
                      eval_path=write_jsonl(tmp_path / "eval.jsonl", eval_rows), eval_fraction=0.25)
    train, held, source = tasks.sft_rows(data, seed=5)
    assert train == SFT_ROWS  # nothing held out of data.path
    assert held == eval_rows
    assert source.name == str((tmp_path / "sft.jsonl").resolve())


def test_file_sft_rows_are_normalised_and_validated(tmp_path):
    data = DataConfig(path=write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "completion": " c", "id": 1}]),
                      eval_fraction=0.0)
    train, held, _ = tasks.sft_rows(data, seed=0)
    assert (train, held) == ([{"prompt": "p", "completion": " c"}], [])  # other fields dropped, nothing held out
    bad = DataConfig(path=write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": " "}]))
    with pytest.raises(DataError, match="bad.jsonl: line 1: field 'completion' is empty"):
        tasks.sft_rows(bad, seed=0)


def test_file_preference_pairs_split_and_stats(tmp_path):
    data = DataConfig(path=write_jsonl(tmp_path / "pairs.jsonl", PAIRS), eval_fraction=0.1)
    train, held, source, stats = tasks.preference_pairs(data, seed=1)
    assert (train, held) == holdout(PAIRS, 0.1, data.max_eval_rows, 1)
    assert len(held) == 2
    assert stats == {"rows": 20, "dropped_identical": 0, "dropped_empty": 0, "empty_response": 0}
    assert source.name == str((tmp_path / "pairs.jsonl").resolve())


def test_file_preference_pairs_respect_eval_path(tmp_path):
    extra = [{"prompt": "q", "chosen": " yes", "rejected": " yes"}, {"prompt": "q", "chosen": " a", "rejected": " b"}]
    data = DataConfig(path=write_jsonl(tmp_path / "pairs.jsonl", PAIRS),
                      eval_path=write_jsonl(tmp_path / "eval.jsonl", extra), skip_invalid=True)
    train, held, _, stats = tasks.preference_pairs(data, seed=1)
    assert train == PAIRS
    assert held == [extra[1]]
    assert stats["train"]["rows"] == 20
    assert stats["eval"] == {"rows": 1, "dropped_identical": 1, "dropped_empty": 0, "empty_response": 0}


def test_file_has_no_gold_score(tmp_path):
    data = DataConfig(path=write_jsonl(tmp_path / "pairs.jsonl", PAIRS))
    assert not tasks.is_builtin(data)
    assert tasks.gold_scorer(data) is None
    assert tasks.gold_preferences(data, PAIRS) is None
    assert tasks.label_noise_ceiling(data) == {}


def test_file_train_prompts_are_every_row_s_prompt(tmp_path):
    rows = [*SFT_ROWS[:3], {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    data = DataConfig(path=write_jsonl(tmp_path / "prompts.jsonl", rows))
    prompts, _, source = tasks.train_prompts(data, tokenizer=None)  # no chat template: the HH fallback
    assert prompts == ["question 0", "question 1", "question 2", "\n\nHuman: hi\n\nAssistant:"]
    assert source.name == str((tmp_path / "prompts.jsonl").resolve())
    capped = DataConfig(path=data.path, max_rows=2)
    assert tasks.train_prompts(capped, tokenizer=None)[0] == ["question 0", "question 1"]


def test_file_eval_prompts_are_capped_at_num_prompts(tmp_path):
    data = DataConfig(path=write_jsonl(tmp_path / "prompts.jsonl", SFT_ROWS))
    prompts, _, source = tasks.eval_prompts(data, 4, tokenizer=None)
    assert prompts == [f"question {i}" for i in range(4)]
    assert source.name == str((tmp_path / "prompts.jsonl").resolve())
    assert len(tasks.eval_prompts(data, 100, tokenizer=None)[0]) == len(SFT_ROWS)


def test_file_eval_prompts_prefer_eval_path(tmp_path):
    held = [{"prompt": f"held {i}"} for i in range(5)]
    data = DataConfig(path=write_jsonl(tmp_path / "prompts.jsonl", SFT_ROWS),
                      eval_path=write_jsonl(tmp_path / "eval.jsonl", held))
    prompts, _, source = tasks.eval_prompts(data, 3, tokenizer=None)
    assert prompts == ["held 0", "held 1", "held 2"]
    assert source.name == str((tmp_path / "eval.jsonl").resolve())


def test_missing_file_is_a_data_error(tmp_path):
    data = DataConfig(path=str(tmp_path / "absent.jsonl"))
    for load in (lambda: tasks.sft_rows(data, 0), lambda: tasks.preference_pairs(data, 0),
                 lambda: tasks.train_prompts(data, None), lambda: tasks.eval_prompts(data, 3, None)):
        with pytest.raises(DataError, match="absent.jsonl: file not found"):
            load()
