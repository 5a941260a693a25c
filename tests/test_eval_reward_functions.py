"""`rlhf eval` with reward functions (`reward.*`) and several responses per prompt (`samples_per_prompt`): the
pass@k estimator against hand values, per-prompt means that skip a function's Nones, the report on the arith task
without any reward model, the weighted score of a reward model plus a function, and a function that fails."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch

from helpers import compose_stage, run_cli
from rlhf_cli.errors import ConfigError, RewardFunctionError
from rlhf_cli.stages import eval as eval_stage
from rlhf_cli.stages.eval import by_prompt, pass_at_k, pass_ks, pass_rates

NAN = math.nan
TINY = ["policies=[builtin:tiny]", "reference=builtin:tiny", "response_length=8", "checkpoints=false"]
ARITH = [*TINY, "data=arith", "num_prompts=8", "samples_per_prompt=4",
         "reward.functions=[rlhf_cli.rewards:exact_match]"]


# ---- the estimator and the per-prompt numbers (pure) -------------------------------------------------------------

@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (5, 2, 1, 0.4),                            # c / n
    (5, 2, 2, 1 - math.comb(3, 2) / math.comb(5, 2)),  # 0.7
    (5, 0, 3, 0.0),                            # nothing correct
    (5, 4, 2, 1.0),                            # n - c < k: every pair holds a correct one
    (5, 5, 5, 1.0),
    (4, 1, 4, 1.0),
    (200, 3, 10, 1 - math.comb(197, 10) / math.comb(200, 10)),
])
def test_pass_at_k_matches_the_binomial_form(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_stays_finite_where_the_binomials_are_huge():
    value = pass_at_k(2000, 7, 1000)
    assert 0.99 < value <= 1.0 and math.isfinite(value)


def test_ks_are_powers_of_two_up_to_n_and_n():
    assert pass_ks(1) == [1] and pass_ks(4) == [1, 2, 4] and pass_ks(6) == [1, 2, 4, 6]


def test_per_prompt_means_skip_a_functions_nones():
    per_response = {"reward/f": torch.tensor([1.0, NAN, 0.0, 0.0, NAN, NAN]), "kl": torch.tensor([1., 2, 3, 4, 5, 6])}
    means = by_prompt(per_response, 2)
    assert means["kl"].tolist() == [1.5, 3.5, 5.5]
    assert means["reward/f"][:2].tolist() == [1.0, 0.0] and math.isnan(means["reward/f"][2])
    summary = eval_stage.summarise({"score": means["kl"], **means}, means["kl"])
    assert summary["reward/f"] == 0.5 and summary["reward/f_se"] == pytest.approx(0.5)  # the NaN prompt left out


def test_pass_rates_of_0_1_quantities_only():
    # 3 prompts x 4 responses; f applies to 4, 3 and 1 of them
    f = torch.tensor([1.0, 0, 0, 0, 1, 1, NAN, 0, NAN, NAN, 1, NAN])
    rates = pass_rates({"reward/f": f, "gold": f.nan_to_num() * 0.5, "reward/g": torch.full((12,), NAN)}, 4,
                       ["reward/f", "gold", "reward/g"])
    assert set(rates) == {f"pass@{k}/f{se}" for k in (1, 2, 4) for se in ("", "_se")}  # gold not 0/1, g never applies
    assert rates["pass@1/f"] == pytest.approx((1 / 4 + 2 / 3 + 1) / 3)
    assert rates["pass@2/f"] == pytest.approx((pass_at_k(4, 1, 2) + pass_at_k(3, 2, 2)) / 2)  # the third: 1 < k
    assert rates["pass@4/f"] == 1.0 and rates["pass@4/f_se"] == 0.0  # only the first prompt has 4


def test_the_rewards_table_fits_80_columns():
    from rich.console import Console

    row = {"name": "an_experiment_with_a_rather_long_name/ppo", "score": 1.5, "score_se": 0.1, "kl": 3.8, "kl_se": 0.2,
           "gold": 0.4, "gold_se": 0.05, "response_length": 4.1, "stop_rate": 0.99, "win_rate": 0.5, "win_rate_se": 0.0,
           "reward/reward_model": 1.2, "reward/reward_model_se": 0.1, "reward/exact_match": 0.3125,
           "reward/exact_match_se": 0.0625, **{f"pass@{k}/{q}{se}": 0.5 for k in (1, 2, 4, 8) for q in
                                              ("exact_match", "gold") for se in ("", "_se")}}
    report = {"prompts": {"count": 8, "samples_per_prompt": 8}, "baseline": row["name"], "policies": [row],
              "curves": {}, "rewards": {"functions": ["rlhf_cli.rewards:exact_match"],
                                        "weights": {"reward_model": 1.0, "exact_match": 0.5}}}
    out = io.StringIO()
    eval_stage.show_tables(Console(file=out, width=80), report, True, Path("/x"), [])
    lines = out.getvalue().splitlines()
    assert max(map(len, lines)) <= 80 and "8 responses each" in out.getvalue()
    header = next(line for line in lines if "pass@1" in line)
    assert "pass@8" in header and "pass@2" not in header
    assert sum("0.312±0.062" in line for line in lines) == 1 and sum("gold" in line for line in lines) >= 2


# ---- eval with reward functions ----------------------------------------------------------------------------------

def test_reward_functions_alone_report_pass_at_k_on_the_arith_task(tmp_path):
    """No reward artifact anywhere: no reward model loads; exact_match and the arith task's gold are 0/1 checks."""
    run_dir = tmp_path / "x" / "eval"
    report = eval_stage.run(compose_stage("eval", [*ARITH, "experiment=x", f"root={tmp_path}"], run_dir))
    on_disk = json.loads((run_dir / "eval.json").read_text())
    assert on_disk["reward_model"] is None and on_disk["reward_same_tokenizer"] is None
    assert on_disk["rewards"] == {"functions": ["rlhf_cli.rewards:exact_match"], "weights": {"exact_match": 1.0},
                                  "aggregation": "sum"}
    assert on_disk["prompts"]["count"] == 8 and on_disk["prompts"]["samples_per_prompt"] == 4
    (policy,) = report["policies"]
    assert "reward/reward_model" not in policy and policy["score"] == policy["reward/exact_match"]
    for name in ("exact_match", "gold"):
        for k in (1, 2, 4):
            assert 0.0 <= policy[f"pass@{k}/{name}"] <= 1.0 and policy[f"pass@{k}/{name}_se"] >= 0.0
        assert policy[f"pass@4/{name}"] >= policy[f"pass@2/{name}"] >= policy[f"pass@1/{name}"]
        assert policy[f"pass@1/{name}"] == pytest.approx(policy[name if name == "gold" else f"reward/{name}"])
    assert len({s["prompt"] for s in policy["samples"]}) == 1  # a prompt's 4 responses come in a row
    assert all(s["score"] in (0.0, 1.0) and "reward/exact_match" in s for s in policy["samples"])


def test_a_spec_that_does_not_load_stops_eval_before_any_model(tmp_path):
    cfg = compose_stage("eval", [*TINY, "experiment=x", f"root={tmp_path}", "data=arith",
                                 "reward.functions=[no_such_module_for_eval:fn]"], tmp_path / "x" / "eval")
    with pytest.raises(ConfigError, match="cannot import 'no_such_module_for_eval'"):
        eval_stage.run(cfg)
    assert not (tmp_path / "x" / "eval").exists()


def test_weights_are_checked_against_the_components_before_any_model(tmp_path):
    cfg = compose_stage("eval", [*ARITH, "experiment=x", f"root={tmp_path}", "reward.weights=[1.0,2.0]"],
                        tmp_path / "x" / "eval")
    with pytest.raises(ConfigError, match=r"2 weights for 1 components \(exact_match\)"):
        eval_stage.run(cfg)
    assert not (tmp_path / "x" / "eval").exists()


def _boom(tmp_path: Path) -> str:
    path = tmp_path / "my_rewards.py"
    path.write_text("def boom(prompts, completions, **columns):\n    raise ValueError('no answer here')\n")
    return f"reward.functions=[{path}:boom]"


def test_a_function_that_raises_stops_eval_naming_it_and_the_prompt(tmp_path):
    run_dir = tmp_path / "x" / "eval"
    cfg = compose_stage("eval", [*ARITH[:-1], "experiment=x", f"root={tmp_path}", "num_prompts=2",
                                 _boom(tmp_path)], run_dir)
    with pytest.raises(RewardFunctionError) as err:
        eval_stage.run(cfg)
    message = err.value.message
    assert err.value.exit_code == 2 and "\n" not in message
    assert "reward function boom" in message and "ValueError: no answer here" in message
    assert "on row 0 (prompt '" in message and "policy builtin:tiny" in message
    assert not (run_dir / "eval.json").exists()


@pytest.mark.slow  # a process of its own: ~5 s of imports and start-up
def test_the_command_exits_2_when_a_function_raises(tmp_path):
    run = run_cli(["eval", *ARITH[:-1], "experiment=x", "num_prompts=2", _boom(tmp_path)], tmp_path)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "reward function boom" in run.stderr and "(prompt '" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "runs" / "x" / "eval" / "eval.json").exists()


def test_a_reward_model_and_a_weighted_function_add_up(trained_experiment, tmp_path):
    """score = 1.0 x reward_model + 0.5 x gold (the toy task's gold as a reward function) on every response, and so
    in every mean; the task's gold score itself is no 0/1 check: no pass@k."""
    root = trained_experiment
    report = eval_stage.run(compose_stage("eval", [
        "experiment=demo", f"root={root}", f"policies=[{root / 'demo' / 'sft'}]", "num_prompts=12",
        "samples_per_prompt=2", "response_length=8", "checkpoints=false",
        "reward.functions=[rlhf_cli.rewards:gold]", "reward.weights=[1.0,0.5]"], tmp_path / "eval"))
    assert report["reward_model"] == str(root / "demo" / "reward" / "model")
    assert report["rewards"]["weights"] == {"reward_model": 1.0, "gold": 0.5}
    (policy,) = report["policies"]
    for s in policy["samples"]:
        assert s["score"] == pytest.approx(s["reward/reward_model"] + 0.5 * s["reward/gold"], abs=1e-5)
        assert s["reward/gold"] == pytest.approx(s["gold"])
    assert policy["score"] == pytest.approx(policy["reward/reward_model"] + 0.5 * policy["reward/gold"], abs=1e-5)
    assert not any(k.startswith("pass@") for k in policy)
