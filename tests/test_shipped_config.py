"""What ships composes: every YAML under conf/ with every stage, every command in the README (the README's test
command is CI's), and the README's example reward file works as it says. Config mistakes: test_config.py."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from helpers import REPO, compose_config
from rlhf_cli.cli import SPECS as STAGES, conf_dir
from rlhf_cli.config import SCHEMAS, SFTConfig, finalize

CONF = REPO / "conf"


def _compose(stage: str, overrides: list[str]):
    return compose_config(stage, overrides)


def _finalize(stage: str, overrides: list[str], tmp_path: Path):
    return finalize(_compose(stage, [*overrides, f"run_dir={tmp_path}"]))

def test_conf_dir_is_the_checkout_conf():
    assert conf_dir() == CONF


def test_every_stage_has_a_schema_and_a_yaml():
    assert {name for name, spec in STAGES.items() if spec.hydra} == set(SCHEMAS)
    for stage in SCHEMAS:
        assert (CONF / f"{stage}.yaml").is_file()


GROUP_OPTIONS = sorted((g.name, y.stem) for g in CONF.iterdir() if g.is_dir() for y in g.glob("*.yaml"))


def _stage_groups(stage: str) -> set[str]:
    """The groups a stage's YAML lists in its defaults (a group set to null can still be chosen)."""
    import yaml

    defaults = yaml.safe_load((CONF / f"{stage}.yaml").read_text())["defaults"]
    return {next(iter(d)) for d in defaults if isinstance(d, dict)}


def test_every_group_is_used_by_some_stage():
    assert {g for g, _ in GROUP_OPTIONS} <= set().union(*(_stage_groups(s) for s in SCHEMAS))
REQUIRED_EXTRA = {("data", "hh_sft"): ["data.path=x.jsonl"], ("data", "hh_pref"): ["data.path=x.jsonl"]}


@pytest.mark.parametrize("stage", sorted(SCHEMAS))
@pytest.mark.parametrize("group,option", GROUP_OPTIONS)
def test_every_shipped_yaml_composes(stage, group, option, tmp_path):
    if group not in _stage_groups(stage):
        with pytest.raises(ConfigCompositionException):  # e.g. model=tiny means nothing to ppo: it says so
            _compose(stage, [f"{group}={option}"])
        return
    cfg = _finalize(stage, [f"{group}={option}", *REQUIRED_EXTRA.get((group, option), [])], tmp_path)
    assert cfg.stage == stage


def test_defaults_are_the_dataclass_defaults(tmp_path):
    cfg = _finalize("sft", [], tmp_path)
    assert isinstance(cfg, SFTConfig)
    default = SFTConfig()
    assert cfg.optim == default.optim and cfg.train == default.train and cfg.data.toy == default.data.toy
    assert cfg.model.name_or_path == "builtin:tiny" and cfg.model.trust_remote_code is False


def _readme_commands() -> list[tuple[str, list[str]]]:
    """(stage, overrides) of every `rlhf ...`/`-m rlhf_cli ...` command in the README's code blocks."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():  # a command continued with a trailing backslash
            line = line.split("#")[0].strip()
            m = re.search(r"(?:^|/|\s)(?:rlhf|-m rlhf_cli)\s+(\S+)(.*)$", line)
            if not m or m.group(1) not in STAGES:
                continue
            words = [w for w in shlex.split(m.group(2)) if "=" in w and not w.startswith("-")]
            # a sweep value a,b composes as its first value (a list [a,b] is one value)
            commands.append((m.group(1), [re.sub(r"=([^,\[]*),.*$", r"=\1", w) for w in words]))
    return commands


def test_readme_has_commands_to_check():
    assert len(_readme_commands()) >= 8


@pytest.mark.parametrize("stage,overrides", _readme_commands(), ids=lambda x: " ".join(x) if isinstance(x, list) else x)
def test_every_readme_command_composes(stage, overrides, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    readme_rewards_file(tmp_path)  # what `reward.functions=[my_rewards.py:...]` names, as the README shows it
    if stage == "pipeline":  # routed to each stage, every stage composed
        from rlhf_cli.stages.pipeline import compose, split_overrides

        stages, per_stage = split_overrides(overrides)
        for s in stages:
            compose(s, per_stage[s])
        return
    cfg = _finalize(stage, overrides, tmp_path)
    for word in overrides:
        key, value = word.split("=", 1)
        if "." in key and "/" not in key and not key.startswith("hydra"):
            obj = cfg
            for part in key.split("."):
                obj = getattr(obj, part)
            listed = isinstance(obj, list) and value == f"[{','.join(map(str, obj))}]"
            assert listed or str(obj) == value or obj == type(obj)(value) or str(obj).endswith(Path(value).name)


def readme_rewards_file(where: Path) -> Path:
    """The README's complete reward-function file (the python block that starts `# my_rewards.py`), written to
    `where`/my_rewards.py."""
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
                if b.startswith("# my_rewards.py")]
    path = where / "my_rewards.py"
    path.write_text(block)
    return path


def test_the_readme_reward_file_works_as_it_says(tmp_path):
    from rlhf_cli.engine import reward_functions as rf

    path = readme_rewards_file(tmp_path)
    brevity, cites = rf.load_all([f"{path}:brevity", f"{path}:cites_answer"])
    words = " ".join(["w"] * 10)
    assert rf.call(brevity, ["p", "p"], ["short", words], [{}, {}]) == [0.0, pytest.approx(-0.2)]
    assert rf.call(cites, ["p"] * 3, ["it is 12", "it is 13", "x"], [{"answer": "12"}, {"answer": 12},
                                                                     {"answer": None}]) == [1.0, 0.0, None]
    assert rf.call(cites, ["p"], ["x"], [{}]) == [None]


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = "bash scripts/setup.sh && .venv/bin/python -m pytest -q"
    assert command in readme.split("\n## ")[0] and command in ci
