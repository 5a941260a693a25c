"""`rlhf dpo` end to end on the shared experiment's SFT policy: the held-out implicit-reward accuracy rises and the
artifact loads with transformers; a precomputed reference gives the numbers a held one does; LoRA trains adapters
against the policy's own base; a resumed run ends bit for bit where an uninterrupted one does; eval and the
pipeline take it in; bad settings are refused before anything loads."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import FAST_REWARD, compose_stage
from rlhf_cli.errors import ArtifactError, ConfigError
from rlhf_cli.stages import dpo

pytestmark = pytest.mark.slow

# a few seconds of DPO: 16 pairs a step, held-out diagnostics every 6 steps on 16 prompts
FAST_DPO = [*FAST_REWARD, "train.max_steps=12", "train.eval_every=6", "train.checkpoint_every=6", "optim.lr=1e-3",
            "optim.warmup_steps=0", "dpo.kl_prompts=16", "dpo.response_length=8"]


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run(root, run_dir, *extra):
    return dpo.run(compose_stage("dpo", [*FAST_DPO, "experiment=demo", f"root={root}", *extra], run_dir))


def test_dpo_learns_the_pairs_and_writes_a_policy(trained_experiment, tmp_path, capsys):
    """64 pairs seen 6 times each: the loss falls from log 2 and the implicit reward ranks them; the chosen
    responses' log-prob falls too (a known DPO effect on a weak SFT policy), which the summary warns about."""
    run_dir = tmp_path / "dpo"
    metrics = _run(trained_experiment, run_dir, "data.toy.num_train=64", "train.max_steps=24", "train.eval_every=12",
                   "train.checkpoint_every=12", "train.log_every=1")
    rows = _rows(run_dir)
    assert rows[0]["step"] == 1 and rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # starts as its reference
    assert rows[-1]["loss"] < 0.65 and sum(r["accuracy"] for r in rows[-3:]) / 3 >= 0.6
    assert metrics["kl"] > 0 and metrics["gold"] is not None and metrics["reference_precomputed"] is True
    assert metrics["eval_logp_chosen"] < metrics["eval_logp_chosen_start"] - 1
    assert "warning: the held-out chosen responses' log-prob fell" in " ".join(capsys.readouterr().out.split())
    assert {"eval_logp_chosen", "eval_logp_rejected", "kl", "gold"} <= set(rows[-1])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["kind"] == "policy" and manifest["parents"][0]["stage"] == "sft"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert torch.isfinite(model.lm_head.weight).all()
    assert {p.name for p in (run_dir / "charts").glob("*.png")} >= {"loss.png", "accuracy.png", "logps.png",
                                                                     "kl.png"}
    assert json.loads((run_dir / "samples.jsonl").read_text().splitlines()[0])["step"] == 24


def test_a_precomputed_reference_gives_the_numbers_a_held_one_does(trained_experiment, tmp_path):
    out = {}
    for precompute in ("true", "false"):
        run_dir = tmp_path / precompute
        _run(trained_experiment, run_dir, "train.max_steps=6", f"dpo.precompute_reference={precompute}")
        out[precompute] = (_rows(run_dir)[-1], load_file(run_dir / "model" / "model.safetensors"))
    (a, wa), (b, wb) = out["true"], out["false"]
    for key in ("loss", "accuracy", "margin", "eval_loss", "kl"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    # the reference scored pairs in other micro-batches (summation order): the same updates up to float rounding
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)


def test_lora_dpo_trains_adapters_against_the_policy_s_own_base(trained_experiment, tmp_path, capsys):
    run_dir = tmp_path / "lora"
    _run(trained_experiment, run_dir, "model.lora.r=4", "train.max_steps=6")
    assert "reference the policy with its adapters off" in capsys.readouterr().out
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    merged = load_file(run_dir / "model" / "model.safetensors")
    sft = load_file(trained_experiment / "demo" / "sft" / "model" / "model.safetensors")
    assert any(not torch.equal(merged[k], sft[k]) for k in sft)


def test_a_resumed_dpo_run_ends_where_an_uninterrupted_one_does(trained_experiment, tmp_path):
    straight = tmp_path / "straight"
    _run(trained_experiment, straight)
    cut = tmp_path / "cut"
    shutil.copytree(straight, cut)
    for finished in ("manifest.json", "model", "samples.jsonl", "checkpoints/step-12"):
        path = cut / finished
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    _run(trained_experiment, cut, "resume=true")
    a, b = (load_file(d / "model" / "model.safetensors") for d in (straight, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)

    def numbers(run_dir):  # what was computed, not when or how fast
        return [{k: v for k, v in r.items() if k != "time" and not k.endswith("per_s")} for r in _rows(run_dir)]

    assert numbers(straight) == numbers(cut)


def test_eval_takes_the_dpo_policy_and_its_curve(experiment_copy, tmp_path):
    from rlhf_cli.stages import eval as eval_stage

    _run(experiment_copy, experiment_copy / "demo" / "dpo")
    report = eval_stage.run(compose_stage("eval", ["experiment=demo", f"root={experiment_copy}", "num_prompts=16",
                                                   "response_length=8"], tmp_path / "eval"))
    assert [p["stage"] for p in report["policies"]] == ["sft", "ppo", "dpo"]
    assert [p["step"] for p in report["curves"]["demo/dpo"]] == [0, 6, 12]


def test_bad_settings_and_a_missing_sft_are_refused_before_anything_loads(tmp_path):
    with pytest.raises(ConfigError, match="dpo.loss=robust needs dpo.label_smoothing < 0.5"):
        compose_stage("dpo", ["dpo.loss=robust", "dpo.label_smoothing=0.5"], tmp_path)
    with pytest.raises(ConfigError, match="dpo.loss='kto' is not one of sigmoid, ipo, hinge, robust"):
        compose_stage("dpo", ["dpo.loss=kto"], tmp_path)
    with pytest.raises(ArtifactError, match="run `rlhf sft experiment=none`"):
        dpo.run(compose_stage("dpo", ["experiment=none", f"root={tmp_path}"], tmp_path / "none" / "dpo"))
    assert not (tmp_path / "none" / "dpo").exists()


def test_the_pipeline_runs_dpo_only_when_asked():
    from rlhf_cli.stages.pipeline import split_overrides

    assert split_overrides([])[0] == ["sft", "reward", "ppo", "eval"]
    stages, routed = split_overrides(["stages=sft,dpo,eval", "dpo.beta=0.3", "model.lora.r=8"])
    assert stages == ["sft", "dpo", "eval"] and "dpo.beta=0.3" in routed["dpo"] and "model.lora.r=8" in routed["dpo"]
