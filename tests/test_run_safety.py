"""Nothing lost, nothing silent, in-process on the tiny model: a finished artifact survives every refusal and failed
replacement; a diverging run stops before a NaN reaches the weights or a file; a resumed run publishes exactly what
an uninterrupted one does (weights and metrics), and refuses to continue on another config, other data or a damaged
checkpoint."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import EXPERIMENT, FAST_PPO, FAST_REWARD, FAST_SFT, compose_stage
from rlhf_cli import artifacts
from rlhf_cli.errors import ArtifactError, ConfigError, DataError, DivergedError
from rlhf_cli.stages import ppo, reward, sft

STAGES = {"sft": sft, "reward": reward, "ppo": ppo}
FAST = {"sft": FAST_SFT, "reward": [*FAST_REWARD, "model.name_or_path=builtin:tiny"], "ppo": FAST_PPO}
TIMING = ("time", "wall_seconds")  # and every *_per_s key: how fast, not what was computed


def _run(stage: str, root: Path, experiment: str, *overrides: str) -> dict:
    cfg = compose_stage(stage, [*FAST[stage], f"experiment={experiment}", f"root={root}", *overrides],
                        root / experiment / stage)
    return STAGES[stage].run(cfg)


def _snapshot(run_dir: Path) -> dict:
    """Every file of an artifact (a replacement in progress aside) with its bytes."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and artifacts.STAGING not in p.relative_to(run_dir).parts}


def _weights(run_dir: Path) -> dict:
    model = run_dir / "model"
    return {**load_file(model / "model.safetensors"),
            **({f"head.{k}": v for k, v in load_file(model / "reward_head.safetensors").items()}
               if (model / "reward_head.safetensors").exists() else {})}


def _what_was_computed(value):
    """A metrics dict (or list of rows) without its timing entries."""
    if isinstance(value, list):
        return [_what_was_computed(v) for v in value]
    return {k: v for k, v in value.items() if k not in TIMING and not k.endswith("_per_s")}


def _interrupt(src: Path, dst: Path, keep_steps: int | None = None) -> None:
    """dst = src as a kill would have left it after its checkpoint `keep_steps` (default: the last one, i.e. killed
    while publishing): no manifest, a half-renamed model, the later checkpoints gone."""
    shutil.copytree(src, dst)
    (dst / "manifest.json").unlink()
    (dst / "model").rename(dst / ".model.tmp-99999")
    if keep_steps is not None:
        for ckpt in (dst / "checkpoints").glob("step-*"):
            if int(ckpt.name.split("-")[1]) > keep_steps:
                shutil.rmtree(ckpt)


@pytest.fixture(scope="module")
def reward_dir(trained_experiment) -> Path:
    """A finished reward artifact (the shared experiment's), for PPO."""
    return trained_experiment / "demo" / "reward"


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """A finished sft run with FAST_SFT (checkpoints at steps 12 and 24), to copy: the uninterrupted run that
    killed, replaced and resumed copies are compared with."""
    root = tmp_path_factory.mktemp("straight")
    _run("sft", root, "straight")
    return root / "straight" / "sft"


def _ppo_args(reward_dir: Path) -> list[str]:
    return ["model.policy=builtin:tiny", f"model.reward={reward_dir}"]


# ---- 1. overwrite=true never destroys a finished artifact before its replacement is published --------------------

@pytest.mark.slow
def test_overwrite_keeps_the_finished_artifact_until_the_replacement_is_published(straight, tmp_path):
    run_dir = shutil.copytree(straight, tmp_path / "x" / "sft")
    before = _snapshot(run_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(DataError, match="completion"):
        _run("sft", tmp_path, "x", "overwrite=true", f"data.path={bad}")
    assert _snapshot(run_dir) == before
    with pytest.raises(DivergedError):
        _run("sft", tmp_path, "x", "overwrite=true", "optim.lr=1e6")
    assert _snapshot(run_dir) == before
    model_dir, parent = artifacts.upstream(None, str(tmp_path), "x", "sft", "policy")  # still usable downstream
    assert parent["model_sha256"] == json.loads(before["manifest.json"])["model_sha256"]

    metrics = _run("sft", tmp_path, "x", "overwrite=true", "train.max_steps=12")
    assert metrics["steps"] == 12 and artifacts.read_manifest(run_dir)["metrics"]["steps"] == 12
    assert not (run_dir / artifacts.STAGING).exists() and not (run_dir / artifacts.RETIRED).exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-12"]
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [4, 8, 12]
    artifacts.upstream(None, str(tmp_path), "x", "sft", "policy")  # the new one matches its own manifest


@pytest.mark.slow
def test_an_interrupted_replacement_continues_with_overwrite_and_resume(straight, tmp_path):
    _run("sft", tmp_path, "x", "train.max_steps=12")
    run_dir = tmp_path / "x" / "sft"
    old = _snapshot(run_dir)
    _interrupt(straight, run_dir / artifacts.STAGING, keep_steps=12)  # a replacement killed after step 12 of 24
    with pytest.raises(ArtifactError, match="overwrite=true resume=true"):
        _run("sft", tmp_path, "x")
    assert _snapshot(run_dir) == old
    _run("sft", tmp_path, "x", "overwrite=true", "resume=true")
    assert not (run_dir / artifacts.STAGING).exists()
    new, replaced = _weights(run_dir), _weights(straight)  # what the replacement would have published
    assert all(torch.equal(new[k], replaced[k]) for k in replaced)


# ---- 2. a diverging run stops cleanly ------------------------------------------------------------------------------

def test_diverging_sft_stops_before_a_nan_reaches_weights_or_files(tmp_path):
    with pytest.raises(DivergedError) as err:
        _run("sft", tmp_path, "x", "optim.lr=1e6", "train.checkpoint_every=1", "train.log_every=1",
             "train.keep_checkpoints=100")
    run_dir = tmp_path / "x" / "sft"
    last = max((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    assert f"last good checkpoint is {last}" in err.value.message and "optim.lr" in err.value.hint
    assert not artifacts.is_finished(run_dir) and not (run_dir / "model").exists()
    for ckpt in (run_dir / "checkpoints").iterdir():  # every checkpoint written holds finite weights
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "model.safetensors").values())

    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    rows = [json.loads(x, parse_constant=refuse) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["grad_norm"] is not None for r in rows)


def test_skipped_steps_are_bounded_counted_and_logged(tmp_path):
    with pytest.raises(DivergedError, match="after 2 skipped steps"):
        _run("sft", tmp_path, "x", "optim.lr=1e6", "train.max_skipped_steps=2", "train.log_every=1")
    rows = [json.loads(x) for x in (tmp_path / "x" / "sft" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if r["grad_norm"] is None]
    assert [r["skipped_steps"] for r in skipped] == [1, 2]


def test_diverging_reward_and_ppo_stop(tmp_path, reward_dir):
    with pytest.raises(DivergedError, match="reward: the"):
        _run("reward", tmp_path, "x", "optim.lr=1e6")
    with pytest.raises(DivergedError, match="ppo: the .* at iteration"):
        _run("ppo", tmp_path, "x", "optim.lr=1e6", *_ppo_args(reward_dir))
    assert not artifacts.is_finished(tmp_path / "x" / "ppo")


def test_ppo_stops_on_a_reward_model_that_scores_nan(tmp_path, reward_dir):
    broken = tmp_path / "broken"
    shutil.copytree(reward_dir, broken)
    weights = broken / "model" / "model.safetensors"  # a sequence classifier: the head is `score.weight`
    tensors = load_file(weights)
    tensors["score.weight"] = torch.full_like(tensors["score.weight"], float("nan"))
    save_file(tensors, weights, metadata={"format": "pt"})
    manifest = json.loads((broken / "manifest.json").read_text())  # a consistent artifact that scores NaN
    manifest.update(model_files=artifacts.file_sizes(broken / "model"),
                    model_sha256=artifacts.content_hash(broken / "model"))
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DivergedError, match="the reward model's score is nan for 16 of 16 at iteration 1") as err:
        _run("ppo", tmp_path, "x", "model.policy=builtin:tiny", f"model.reward={broken}", "model.value=" + str(reward_dir))
    assert str(broken) in err.value.hint
    assert not (tmp_path / "x" / "ppo" / "checkpoints").exists()


# ---- 3. a resumed run publishes what an uninterrupted one does -----------------------------------------------------

@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
def test_resume_after_a_kill_while_publishing_gives_the_same_artifact(stage, trained_experiment, experiment_copy):
    """The shared experiment's runs, each copied as a kill while publishing leaves it (ppo's upstream copied too)."""
    a, b = trained_experiment / "demo" / stage, experiment_copy / "demo" / stage
    shutil.rmtree(b)
    _interrupt(a, b)
    resumed = STAGES[stage].run(compose_stage(stage, [*EXPERIMENT[stage], "experiment=demo", f"root={experiment_copy}",
                                                      "resume=true"], b))
    assert _what_was_computed(resumed) == _what_was_computed(artifacts.read_manifest(a)["metrics"])
    assert _what_was_computed(artifacts.read_manifest(b)["metrics"]) == \
        _what_was_computed(artifacts.read_manifest(a)["metrics"])
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
    assert _what_was_computed(rows[1]) == _what_was_computed(rows[0])
    if (a / "samples.jsonl").exists():
        assert (a / "samples.jsonl").read_text() == (b / "samples.jsonl").read_text()
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not list(b.glob(".*.tmp-*"))  # the killed publish's leftover is gone


@pytest.mark.slow
def test_resume_at_an_epoch_boundary(tmp_path):
    # 256 rows / 16 per step: epoch 2 starts at step 16
    extra = ["train.checkpoint_every=8", "train.keep_checkpoints=10"]
    straight = _run("sft", tmp_path, "straight", *extra)
    _interrupt(tmp_path / "straight" / "sft", tmp_path / "killed" / "sft", keep_steps=16)
    resumed = _run("sft", tmp_path, "killed", "resume=true", *extra)
    assert _what_was_computed(resumed) == _what_was_computed(straight)
    wa, wb = _weights(tmp_path / "straight" / "sft"), _weights(tmp_path / "killed" / "sft")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ---- 9. resume checks what it resumes ------------------------------------------------------------------------------

@pytest.fixture
def unfinished(straight, tmp_path) -> Path:
    """An sft run killed after its checkpoint at step 12 of 24."""
    _interrupt(straight, tmp_path / "x" / "sft", keep_steps=12)
    return tmp_path / "x" / "sft"


@pytest.mark.slow
def test_resume_refuses_a_changed_config_unless_forced(unfinished, straight):
    root = str(unfinished.parents[1])
    with pytest.raises(ConfigError, match=r"optim.lr 0.001 -> 0.0005, train.max_steps 24 -> 36") as err:
        _run("sft", Path(root), "x", "resume=true", "optim.lr=5e-4", "train.max_steps=36")
    assert "force_resume=true" in err.value.hint
    _run("sft", Path(root), "x", "resume=true", "train.log_every=1", "train.micro_batch_size=16")  # how, not what
    shutil.rmtree(unfinished)
    _interrupt(straight, unfinished, keep_steps=12)
    metrics = _run("sft", Path(root), "x", "resume=true", "force_resume=true", "optim.lr=5e-4", "optim.schedule=constant")
    rows = [json.loads(x) for x in (unfinished / "metrics.jsonl").read_text().splitlines()]
    assert metrics["steps"] == 24 and rows[-1]["lr"] == pytest.approx(5e-4)  # the new value, not the checkpoint's


@pytest.mark.slow
def test_resume_refuses_changed_data(tmp_path):
    from rlhf_cli.data import toy

    data = tmp_path / "demos.jsonl"
    rows = toy.sft_rows(300, 0, "train")
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _run("sft", tmp_path, "straight", f"data.path={data}")
    _interrupt(tmp_path / "straight" / "sft", tmp_path / "x" / "sft", keep_steps=12)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))  # one row fewer: another data order
    with pytest.raises(DataError, match=r"training data changed .*\(data.path=" + re.escape(str(data))):
        _run("sft", tmp_path, "x", "resume=true", f"data.path={data}")
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _run("sft", tmp_path, "x", "resume=true", f"data.path={data}")
    wa, wb = _weights(tmp_path / "straight" / "sft"), _weights(tmp_path / "x" / "sft")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_resume_refuses_a_damaged_checkpoint(unfinished):
    weights = unfinished / "checkpoints" / "step-12" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="step-12 is damaged") as err:
        _run("sft", unfinished.parents[1], "x", "resume=true")
    assert "overwrite=true" in err.value.hint


# ---- 7. the next stage checks its upstream model --------------------------------------------------------------------

@pytest.mark.slow
def test_reward_names_the_stage_to_rerun_when_the_sft_model_was_deleted(straight, tmp_path):
    shutil.copytree(straight, tmp_path / "x" / "sft")
    shutil.rmtree(tmp_path / "x" / "sft" / "model")
    with pytest.raises(ArtifactError, match="model/ is missing") as err:
        reward.run(compose_stage("reward", [*FAST_REWARD, "experiment=x", f"root={tmp_path}"],
                                 tmp_path / "x" / "reward"))
    assert "rlhf sft experiment=x overwrite=true" in err.value.hint
    assert not (tmp_path / "x" / "reward").exists()
