"""Rewards written as code: the built-in functions on hand cases, loading a function from a module or a file,
every way a function can fail (one message naming the function, the row and the error), the combination of
components against hand values, the arith task, and the keys that reach ppo and eval."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch

from helpers import compose_stage
from rlhf_cli import rewards
from rlhf_cli.data import arith
from rlhf_cli.engine import reward_functions as rf
from rlhf_cli.errors import ConfigError, RewardFunctionError
from rlhf_cli.rl.reward import normalize_then_sum, unscored, weighted_sum


# ---- the built-in functions ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, expected", [
    ("12", 12), (" 12", 12), ("12 apples", 12), ("the answer is 12.", 12), ("-3", -3), ("+4", 4), ("1,024", 1024),
    ("2.50", 2.5), ("12 or 13", 13), ("#### 7 and then 9", 7), ("so \\boxed{42} (not 41)", 42), ("no number", None),
    ("", None), ("####", None),
])
def test_extract_answer_reads_the_documented_answer(completion, expected):
    assert rewards.extract_answer(completion) == expected


def test_exact_match_on_hand_cases():
    completions = ["12", " 12", "12 apples", "-3", "13", "x", "5"]
    answers = ["12", 12, "12", "-3", "12", "12", None]
    assert rewards.exact_match([""] * 7, completions, answer=answers) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, None]
    assert rewards.exact_match(["a", "b"], ["1", "2"]) == [None, None]  # no answer column: not applicable


def test_gold_is_the_toy_task_s_gold_score_and_none_elsewhere():
    from rlhf_cli.data import toy

    prompt = "give 2 fruit :"
    assert rewards.gold([prompt, "7+5="], [" fig plum !", "12"]) == [toy.gold_score(prompt, " fig plum !"), None]
    assert rewards.gold([prompt], [" fig plum !"])[0] == 1.5


# ---- the arith task -----------------------------------------------------------------------------------------------

def test_arith_task_splits_prompts_and_answers_them():
    train, held = arith.split_prompts("train"), arith.split_prompts("eval")
    assert len(train) + len(held) == 155 and not set(train) & set(held) and 20 <= len(held) <= 45
    assert arith.answer("7+5=") == 12 and arith.answer("9-4=") == 5
    rows = arith.sft_rows(2000, 0, "train", demo_accuracy=0.4)
    right = [r["completion"] == r["answer"] == str(arith.answer(r["prompt"])) for r in rows]
    assert 0.35 < sum(right) / len(rows) < 0.45 and {r["prompt"] for r in rows} <= set(train)
    wrong = [abs(int(r["completion"]) - int(r["answer"])) for r, ok in zip(rows, right) if not ok]
    assert set(wrong) == {1, 2} and all(int(r["completion"]) >= 0 for r in rows)
    row = arith.prompt_rows(3, 0, "eval")[0]
    assert row["answer"] == str(arith.answer(row["prompt"]))
    assert arith.gold_score("7+5=", "12") == 1.0 and arith.gold_score("7+5=", "13") == 0.0
    pairs = arith.preference_rows(400, 0, "train", label_noise=0.2)
    flipped = sum(p["chosen"] != str(arith.answer(p["prompt"])) for p in pairs) / len(pairs)
    assert 0.12 < flipped < 0.28


def test_data_arith_reaches_every_stage(tmp_path):
    from rlhf_cli.data import tasks

    cfg = compose_stage("sft", ["data=arith"], tmp_path)
    assert cfg.data.task == "arith" and cfg.data.path is None
    train, held, source = tasks.sft_rows(cfg.data, 0)
    assert source == "built-in arith task" and "answer" in train[0] and len(held) == cfg.data.arith.num_eval
    prompts, columns, _ = tasks.train_prompts(compose_stage("ppo", ["data=arith"], tmp_path).data, None)
    assert columns[0] == {"answer": str(arith.answer(prompts[0]))}
    assert compose_stage("sft", ["data=toy"], tmp_path).data.task == "toy"


# ---- loading ------------------------------------------------------------------------------------------------------

def _file(tmp_path, body: str, name: str = "my_rewards.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def test_functions_load_from_a_module_and_from_a_file(tmp_path):
    path = _file(tmp_path, """
        def brevity(prompts, completions, **columns):
            return [-len(c) / 10 for c in completions]
    """)
    loaded = rf.load_all(["rlhf_cli.rewards:exact_match", f"{path}:brevity"])
    assert [f.name for f in loaded] == ["exact_match", "brevity"] and loaded[0].fn is rewards.exact_match
    assert rf.call(loaded[1], ["p"], ["abcd"], [{}]) == [-0.4]


@pytest.mark.parametrize("spec, message", [
    ("rlhf_cli.rewards", "is not <module>:<function>"),
    ("rlhf_cli.rewards:", "is not <module>:<function>"),
    ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ("rlhf_cli.rewards:no_such", "has no function 'no_such'"),
    ("missing/file.py:f", "names the file missing/file.py, which does not exist"),
])
def test_a_spec_that_does_not_load_is_one_config_error(spec, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        rf.load_all([spec])


def test_a_module_that_fails_on_import_is_named(tmp_path):
    path = _file(tmp_path, "raise RuntimeError('boom at import')\n", "broken.py")
    with pytest.raises(ConfigError, match="importing .*broken.py.* failed: RuntimeError: boom at import"):
        rf.load_all([f"{path}:f"])


def test_two_functions_of_one_name_are_refused(tmp_path):
    path = _file(tmp_path, "def exact_match(p, c, **k):\n    return [0.0] * len(c)\n")
    with pytest.raises(ConfigError, match="two functions are named exact_match"):
        rf.check_specs(["rlhf_cli.rewards:exact_match", f"{path}:exact_match"])


# ---- calling ------------------------------------------------------------------------------------------------------

def _fn(body):
    return rf.RewardFunction("f", "mine.py:f", body)


def test_columns_reach_the_function_as_lists_and_none_is_kept():
    seen = {}

    def f(prompts, completions, **columns):
        seen.update(columns)
        return [None if a is None else 1.0 for a in columns["answer"]]

    out = rf.call(_fn(f), ["a", "b"], ["x", "y"], [{"answer": "1", "id": 7}, {"answer": None, "id": 8}])
    assert out == [1.0, None] and seen == {"answer": ["1", None], "id": [7, 8]}
    scored = rf.score([_fn(f)], ["a", "b", "c"], ["x", "y", "z"], [{"answer": "1"}, {"answer": None},
                                                                  {"answer": "2"}], micro=2)
    assert torch.isnan(scored["f"][1]) and scored["f"][[0, 2]].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("fn, message", [
    (lambda p, c, **k: [1 / (len(x) - 3) for x in c], r"raised ZeroDivisionError: .* on row 1 \(prompt 'second'\)"),
    (lambda p, c, **k: [1.0], "returned 1 values for 3 completions"),
    (lambda p, c, **k: [1.0, "good", 0.0], r"returned 'good' \(str\), not a number or None on row 1"),
    (lambda p, c, **k: [1.0, float("nan"), 0.0], "returned nan, not a finite number on row 1"),
    (lambda p, c, **k: 3.0, "returned float, not a list"),
])
def test_a_failing_function_is_one_message_naming_it_and_the_row(fn, message):
    with pytest.raises(RewardFunctionError, match=message) as err:
        rf.call(_fn(fn), ["first", "second", "third"], ["ab", "abc", "abcd"], [{}, {}, {}], where=", at iteration 3")
    assert str(err.value).startswith("reward function f (mine.py:f) ") and ", at iteration 3" in str(err.value)
    assert err.value.exit_code == 2


def test_numpy_and_torch_values_are_numbers():
    np = pytest.importorskip("numpy")
    assert rf.call(_fn(lambda p, c, **k: np.array([1.5, 2.0])), ["a", "b"], ["x", "y"], [{}, {}]) == [1.5, 2.0]
    assert rf.call(_fn(lambda p, c, **k: torch.tensor([0.5])), ["a"], ["x"], [{}]) == [0.5]


# ---- combining components -----------------------------------------------------------------------------------------

def test_weighted_sum_against_hand_values_and_none_adds_nothing():
    nan = float("nan")
    comps = {"reward_model": torch.tensor([1.0, 2.0, 3.0]), "f": torch.tensor([0.5, nan, -1.0])}
    total = weighted_sum(comps, {"reward_model": 1.0, "f": 0.2})
    assert total.tolist() == pytest.approx([1.1, 2.0, 2.8])
    assert unscored({"f": torch.tensor([nan, 1.0]), "g": torch.tensor([nan, nan])}).tolist() == [True, False]


def test_normalize_then_sum_against_hand_values():
    # group 1: a = [1, 3] -> mean 2, std √2 -> ±1/√2; b = [0, 0] -> 0. group 2: a = [2, 2] -> 0; b = [4, nan] ->
    # one value: centred 0
    comps = {"a": torch.tensor([1.0, 3.0, 2.0, 2.0]), "b": torch.tensor([0.0, 0.0, 4.0, float("nan")])}
    out = normalize_then_sum(comps, {"a": 2.0, "b": 1.0}, k=2)
    s = 2 / (math.sqrt(2) + 1e-4)
    assert out.tolist() == pytest.approx([-s, s, 0.0, 0.0])


def test_weights_are_one_per_component_in_order():
    assert rf.weights_for(["reward_model", "f"], []) == {"reward_model": 1.0, "f": 1.0}
    assert rf.weights_for(["reward_model", "f"], [1.0, 0.2]) == {"reward_model": 1.0, "f": 0.2}
    with pytest.raises(ConfigError, match=r"gives 1 weights for 2 components \(reward_model, f\)"):
        rf.weights_for(["reward_model", "f"], [1.0])


def test_component_metrics_are_mean_std_and_the_share_of_none():
    stats = rf.component_stats({"f": torch.tensor([1.0, 3.0, float("nan"), float("nan")])})
    out = rf.component_metrics(stats, rows=4)
    assert out == {"reward/f": 2.0, "reward_std/f": 1.0, "reward_none/f": 0.5}
    assert rf.component_metrics(rf.component_stats({"g": torch.tensor([float("nan")])}), 1) == {"reward_none/g": 1.0}


# ---- the keys -----------------------------------------------------------------------------------------------------

def test_reward_keys_compose_and_their_rules_hold(tmp_path):
    cfg = compose_stage("ppo", ["reward.functions=[rlhf_cli.rewards:exact_match]", "reward.weights=[0.5]"], tmp_path)
    assert cfg.reward.functions == ["rlhf_cli.rewards:exact_match"] and cfg.reward.weights == [0.5]
    with pytest.raises(ConfigError, match="model.reward=none leaves nothing to reward the policy"):
        compose_stage("ppo", ["model.reward=none"], tmp_path)
    with pytest.raises(ConfigError, match="normalize_then_sum .* ppo.samples_per_prompt=1"):
        compose_stage("ppo", ["reward.aggregation=normalize_then_sum"], tmp_path)
    with pytest.raises(ConfigError, match="which does not exist"):
        compose_stage("ppo", ["reward.functions=[nowhere/r.py:f]"], tmp_path)
    cfg = compose_stage("eval", ["reward.model=none", "reward.functions=[rlhf_cli.rewards:exact_match]"], tmp_path)
    assert cfg.reward.model == "none"


def test_the_pipeline_sends_reward_functions_to_ppo_and_eval_and_reward_keys_to_the_reward_stage():
    from rlhf_cli.stages.pipeline import split_overrides

    _, routed = split_overrides(["reward.functions=[m:f]", "reward.weights=[1,2]", "reward.center_coef=0.1"])
    assert routed["ppo"] == routed["eval"] == ["reward.functions=[m:f]", "reward.weights=[1,2]"]
    assert routed["reward"] == ["reward.center_coef=0.1"] and routed["sft"] == []


def test_wants_reward_model(tmp_path):
    assert rf.wants_reward_model(None, [], str(tmp_path), "x")          # no functions: the reward model, always
    assert not rf.wants_reward_model(None, ["m:f"], str(tmp_path), "x")  # functions, no reward artifact: none
    assert rf.wants_reward_model("some/path", ["m:f"], str(tmp_path), "x")
    assert not rf.wants_reward_model("none", ["m:f"], str(tmp_path), "x")
