"""Config mistakes read as one line: the unknown key, the stage, the closest valid keys (or a group's options, or the
type expected), and never Hydra's `+key=` advice, which a structured config cannot take."""

from __future__ import annotations

import io

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from rich.console import Console

from helpers import REPO, compose_config
from rlhf_cli.cli import _is_user_error, _report
from rlhf_cli.config import compose_error, finalize, register_configs
from rlhf_cli.errors import ConfigError

CONF = REPO / "conf"


def _error(stage: str, overrides: list[str]) -> ConfigError:
    """What `rlhf <stage> <overrides>` reports: Hydra's exception as the CLI rewords it, or finalize's own."""
    try:
        finalize(compose_config(stage, [*overrides, "run_dir=."]))
    except ConfigError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - sorted exactly as the CLI sorts it
        assert _is_user_error(exc), exc
        return compose_error(exc, stage)
    raise AssertionError(f"{stage} {overrides} composed without an error")


def _no_plus_advice(err: ConfigError) -> None:
    assert "+" not in err.message + (err.hint or ""), err


@pytest.mark.parametrize("stage,override,suggested", [
    ("sft", "optim.lrr=0.1", "optim.lr"),
    ("sft", "optm.lr=0.1", "optim.lr"),  # a wrong group of keys
    ("sft", "lr=0.1", "optim.lr"),  # the last part alone
    ("sft", "train.max_step=3", "train.max_steps"),
    ("sft", "data.toy.sed=1", "data.toy.seed"),
    ("ppo", "ppo.kl_cof=0.1", "ppo.kl_coef"),
    ("eval", "temperatur=1", "temperature"),
])
def test_misspelled_key_names_the_stage_and_the_closest_key(stage, override, suggested):
    err = _error(stage, [override])
    key = override.split("=")[0]
    assert err.message == f"unknown key {key} in the {stage} config; did you mean {suggested}?"
    assert err.hint == f"`rlhf {stage} --help` lists every key and its default"
    _no_plus_advice(err)


def test_a_bare_name_lists_every_key_ending_like_it():
    assert "did you mean seed, model.tiny.seed or data.toy.seed?" in _error("sft", ["sed=1"]).message


def test_unrelated_name_under_a_valid_group_lists_that_groups_keys():
    err = _error("sft", ["optim.foo=1"])
    assert err.message.startswith("unknown key optim.foo in the sft config; the keys of optim are lr, weight_decay")


@pytest.mark.parametrize("override,key", [("+optim.lrr=0.1", "optim.lrr"), ("++optm.lr=0.1", "optm.lr")])
def test_keys_forced_in_with_plus_are_refused_not_dropped(override, key):
    """`+key=` slips past the struct check; the dataclass would drop the value without a word."""
    err = _error("sft", [override])
    assert err.message == f"unknown key {key} in the sft config; did you mean optim.lr?"


def test_plus_on_an_existing_key_says_to_drop_the_plus():
    err = _error("sft", ["+optim.lr=0.1"])
    assert "optim.lr is already a key of the sft config" in err.message and err.hint == "e.g. optim.lr=0.001"
    assert "++" not in err.message + err.hint


@pytest.mark.parametrize("group,option", [("model", "tinyy"), ("optim", "adamx")])
def test_wrong_group_option_lists_the_groups_options(group, option):
    options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    err = _error("sft", [f"{group}={option}"])
    assert err.message.startswith(f"{group}={option} is not an option of group {group} in the sft config")
    assert err.message.endswith(f"available: {', '.join(options)}")
    _no_plus_advice(err)


def test_group_the_stage_does_not_compose_names_its_keys_instead():
    err = _error("ppo", ["model=tiny"])
    assert "model is not a config group of the ppo config (its groups: data, optim, algo)" in err.message
    assert "model.policy, model.reward, model.value" in err.message
    _no_plus_advice(err)


def test_number_for_a_group_is_a_config_error_not_a_traceback():
    err = _error("sft", ["optim=1"])
    assert "a config group needs the name of an option" in err.message and "optim: adamw" in err.message


@pytest.mark.parametrize("override,expected", [
    ("optim.lr=abc", "optim.lr=abc: optim.lr in the sft config takes a float"),
    ("train.max_steps=1.5", "train.max_steps=1.5: train.max_steps in the sft config takes an integer"),
    ("train=x", "train=x: train in the sft config is a set of keys (train.device, train.micro_batch_size,"),
])
def test_wrong_type_names_the_key_and_the_type(override, expected):
    err = _error("sft", [override])
    assert err.message.startswith(expected)
    assert "e.g. " in err.hint
    _no_plus_advice(err)


@pytest.mark.parametrize("word,suggested", [("sft.optim.lrr=1", "sft.optim.lr"), ("ppo.kl_cof=1", "ppo.kl_coef"),
                                            ("reward.lr=1", "reward.optim.lr")])
def test_pipeline_suggests_keys_as_the_pipeline_spells_them(word, suggested):
    from rlhf_cli.stages.pipeline import compose as pipeline_compose
    from rlhf_cli.stages.pipeline import split_overrides

    stage = word.split(".")[0]
    with pytest.raises(ConfigError) as raised:
        pipeline_compose(stage, split_overrides([word])[1][stage])
    assert raised.value.message.endswith(f"in the {stage} config; did you mean {suggested}?")


def test_cli_prints_one_red_line_and_a_hint():
    register_configs()
    GlobalHydra.instance().clear()
    with pytest.raises(Exception) as raised:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            compose(config_name="sft", overrides=["optim.lrr=0.1"])
    GlobalHydra.instance().clear()
    out = io.StringIO()
    _report(Console(file=out, width=200), raised.value, "sft")
    assert out.getvalue().splitlines() == [
        "config error: unknown key optim.lrr in the sft config; did you mean optim.lr?",
        "hint: `rlhf sft --help` lists every key and its default",
    ]


@pytest.mark.parametrize("stage", ["sft", "eval"])
def test_an_experiment_name_the_lexer_rejects_gets_our_rule(stage):
    err = _error(stage, ["experiment=café"])
    assert err.message.startswith("experiment='café' is not a single name: use letters, digits and . _ + - only")
    assert "LexerNoViableAlt" not in err.message and "hydra.cc" not in err.message


@pytest.mark.slow  # starts the pipeline in a process
def test_the_pipeline_words_an_unreadable_experiment_the_same_way(tmp_path):
    from helpers import run_cli

    run = run_cli(["pipeline", "experiment=café"], tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "experiment='café' is not a single name" in run.stderr and "Lexer" not in run.stderr


def test_an_unreadable_value_says_how_to_quote_it():
    err = _error("sft", ["data.path=/tmp/é x.jsonl"])
    assert err.message.startswith("cannot read the override data.path=/tmp/é x.jsonl: a value with spaces")
    assert "\"data.path='/tmp/é x.jsonl'\"" in err.hint
