"""`rlhf pipeline`: override routing, stale-artifact detection, and the whole chain end to end."""

from __future__ import annotations

import json
import re

import pytest

from helpers import EXPERIMENT, run_cli
from rlhf_cli.errors import ConfigError
from rlhf_cli.stages.pipeline import compose, split_overrides, stale_keys


def test_prefixed_overrides_reach_their_stage():
    stages, per = split_overrides(["experiment=exp2", "sft.optim.lr=3e-4", "ppo.kl_coef=0.1", "ppo.optim.lr=1e-5",
                                   "reward.data=hh_pref", "eval.num_prompts=8"])
    assert stages == ["sft", "reward", "ppo", "eval"]
    assert per["sft"] == ["experiment=exp2", "optim.lr=3e-4"]
    assert per["ppo"] == ["experiment=exp2", "ppo.kl_coef=0.1", "optim.lr=1e-5"]  # kl_coef lives under ppo.
    assert per["reward"] == ["experiment=exp2", "data=hh_pref"]
    assert per["eval"] == ["experiment=exp2", "num_prompts=8"]


def test_unprefixed_overrides_reach_every_stage_that_has_them():
    _, per = split_overrides(["experiment=l", "model.lora.r=16", "optim.lr=1e-4", "data.max_seq_len=256"])
    for stage in ("sft", "reward", "ppo"):
        assert per[stage] == ["experiment=l", "model.lora.r=16", "optim.lr=1e-4", "data.max_seq_len=256"]
    assert per["eval"] == ["experiment=l", "data.max_seq_len=256"]
    _, per = split_overrides(["bogus.key=1"])  # no stage has it: every stage's compose names it
    assert all(words == ["bogus.key=1"] for words in per.values())


def test_stage_subset_and_bad_words():
    assert split_overrides(["stages=sft,reward"])[0] == ["sft", "reward"]
    with pytest.raises(ConfigError, match="unknown bogus"):
        split_overrides(["stages=sft,bogus"])
    with pytest.raises(ConfigError, match="-m"):
        split_overrides(["-m", "sft.optim.lr=1,2"])
    with pytest.raises(ConfigError, match="key=value"):
        split_overrides(["sft"])


def test_compose_checks_every_stage_before_running(tmp_path):
    cfg = compose("ppo", ["experiment=x", f"root={tmp_path}", "ppo.kl_coef=0.1"])
    assert cfg.ppo.kl_coef == 0.1 and cfg.run_dir == str(tmp_path / "x" / "ppo")


def test_stale_keys_ignore_how_a_run_was_launched(tmp_path):
    from dataclasses import asdict

    cfg = compose("sft", [f"root={tmp_path}"])
    same = asdict(cfg) | {"resume": True, "run_dir": "/elsewhere"}
    assert stale_keys(same, cfg) == []
    changed = asdict(compose("sft", [f"root={tmp_path}", "optim.lr=0.5"]))
    assert stale_keys(changed, cfg) == ["optim.lr"]


@pytest.mark.slow
def test_pipeline_runs_reuses_and_refuses_stale(tmp_path, experiment_copy):
    """On a copy of the shared experiment less its PPO run: sft and reward are reused (same config), ppo and eval
    run in processes of their own, the report ends it; then everything is reused, then a changed key is stale."""
    import shutil

    shutil.rmtree(experiment_copy / "demo" / "ppo")
    fast = [*[f"{stage}.{w}" for stage in ("sft", "reward", "ppo") for w in EXPERIMENT[stage]],
            "eval.num_prompts=16", "eval.response_length=8"]
    where = ["experiment=demo", f"root={experiment_copy}"]
    proc = run_cli(["pipeline", *where, *fast], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("reusing the finished artifact") == 2  # sft and reward
    exp = experiment_copy / "demo"
    for stage in ("sft", "reward", "ppo"):
        assert (exp / stage / "manifest.json").is_file()
    report = json.loads((exp / "eval" / "eval.json").read_text())
    assert len(report["policies"]) == 2
    assert "pipeline" in proc.stdout
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ppo 4/4 \(100%\) elapsed", proc.stdout)  # a log's lines
    check_report(exp, proc.stdout)

    again = run_cli(["pipeline", *where, "stages=sft,reward,ppo", *fast], tmp_path, timeout=600)  # no eval
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("reusing the finished artifact") == 3 and "rlhf eval" not in again.stdout

    stale = run_cli(["pipeline", *where, *fast, "ppo.kl_coef=0.3"], tmp_path)
    assert stale.returncode == 2 and "ppo.kl_coef" in stale.stderr and "overwrite=true" in stale.stderr


def check_report(exp, stdout: str) -> None:
    """The pipeline ends by naming report.html and the charts; the page holds every stage's numbers and its charts,
    inlined as PNGs that decode."""
    import base64
    import io

    from PIL import Image

    from rlhf_cli.engine.logging import fmt

    page = (exp / "report.html").read_text()
    pngs = sorted(exp.glob("*/charts/*.png"))
    assert {p.parent.parent.name for p in pngs} == {"sft", "reward", "ppo", "eval"}
    assert str(exp / "report.html") in stdout and all(str(p) in stdout for p in pngs)
    inlined = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(inlined) == len(pngs)
    for data in inlined:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            assert image.format == "PNG" and image.size[0] > 300
    sft, reward, ppo = (json.loads((exp / s / "manifest.json").read_text())["metrics"] for s in ("sft", "reward", "ppo"))
    for number in (sft["eval_loss"], reward["eval_accuracy"], ppo["final_score"]):
        assert f">{fmt(number)}<" in page
    name = exp.name
    assert f"{name}/sft" in page and f"{name}/ppo" in page and f"over-optimisation curve of {name}/ppo" in page
    assert "keys that differ from the defaults" in page and ">train.max_steps<" in page  # FAST_* changed it
