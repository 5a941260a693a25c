"""`rlhf sft` in-process: the loss falls, the artifact is complete and loads back with plain transformers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import FAST_SFT, compose_stage
from rlhf_cli import artifacts
from rlhf_cli.data import toy
from rlhf_cli.errors import ArtifactError, DataError
from rlhf_cli.stages import sft


@pytest.fixture(scope="module")
def trained(trained_experiment):
    """The shared experiment's SFT run: 150 steps, held-out loss at 75 and 150 (helpers.EXPERIMENT)."""
    run_dir = trained_experiment / "demo" / "sft"
    return artifacts.read_manifest(run_dir)["metrics"], run_dir


def test_heldout_loss_falls_clearly(trained):
    metrics, run_dir = trained
    assert metrics["eval_loss"] < 0.6 * metrics["eval_loss_start"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 2 and evals[-1] < evals[0]
    assert all(r["step"] > 0 and r["lr"] > 0 for r in rows)


def test_artifact_is_complete(trained):
    metrics, run_dir = trained
    manifest = artifacts.read_manifest(run_dir)
    assert manifest["stage"] == "sft" and manifest["kind"] == "policy"
    assert manifest["base_model"] == "builtin:tiny"
    tok = manifest["tokenizer"]
    assert tok["pad_token_id"] != tok["eos_token_id"] and tok["vocab_size"] > 100
    assert manifest["metrics"]["steps"] == 150
    assert manifest["config"]["train"]["max_steps"] == 150
    assert {"torch", "transformers", "rlhf_cli"} <= set(manifest["versions"])
    assert manifest["model_sha256"] == artifacts.content_hash(run_dir / "model")
    assert (run_dir / "config.yaml").is_file()
    assert list((run_dir / "model").glob("*.safetensors"))
    # checkpoint_every=12 and keep_checkpoints=2: the last two survive
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-144", "step-150"]
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["gold"] == toy.gold_score(s["prompt"], s["response"]) for s in samples)


def test_artifact_loads_with_plain_transformers_and_generates(trained):
    _, run_dir = trained
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    ids = tokenizer("give 2 fruit :", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    words = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split()
    # after 150 steps the policy already answers in the task's vocabulary
    vocab = {w for items in toy.CATEGORIES.values() for w in items} | {"!"}
    assert words and sum(w in vocab for w in words) >= len(words) / 2


def test_finished_artifact_is_not_overwritten(trained, tmp_path):
    run_dir = shutil.copytree(trained[1], tmp_path / "sft")
    cfg = compose_stage("sft", FAST_SFT, run_dir)
    with pytest.raises(ArtifactError, match="overwrite=true"):
        sft.run(cfg)


def test_completion_only_masks_the_prompt(tmp_path):
    from rlhf_cli.data.sft import tokenize_sft

    tokenizer = AutoTokenizer.from_pretrained(sft.load_causal_lm.__globals__["resolve"](
        compose_stage("sft", [], tmp_path).model))
    rows = [{"prompt": "give 1 fruit :", "completion": " fig !"}]
    only, _ = tokenize_sft(rows, tokenizer, 64, completion_only=True)
    every, _ = tokenize_sft(rows, tokenizer, 64, completion_only=False)
    n_prompt = len(tokenizer("give 1 fruit :", add_special_tokens=False).input_ids)
    assert only[0]["labels"][:n_prompt] == [-100] * n_prompt
    assert only[0]["labels"][n_prompt:] == only[0]["input_ids"][n_prompt:]
    assert every[0]["labels"] == every[0]["input_ids"]
    assert only[0]["input_ids"][-1] == tokenizer.eos_token_id


def test_token_loss_sum_matches_mean_cross_entropy():
    torch.manual_seed(0)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(7, 7)

        def forward(self, input_ids, attention_mask, position_ids):
            return type("Out", (), {"logits": self.emb(input_ids)})

    model = Toy()
    batch = {"input_ids": torch.tensor([[1, 2, 3, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0]]),
             "labels": torch.tensor([[-100, 2, 3, -100]]), "position_ids": torch.tensor([[0, 1, 2, 2]])}
    positions = sft.supervised_positions(batch)
    total = sft.token_loss_sum(model, batch, positions)
    logits = model.emb(batch["input_ids"])
    # position 0 predicts label at 1 (=2), position 1 predicts label at 2 (=3): only those two are read
    hand = -(torch.log_softmax(logits[0, 0], -1)[2] + torch.log_softmax(logits[0, 1], -1)[3])
    assert positions.tolist() == [0, 1] and torch.allclose(total, hand)


@pytest.mark.slow
def test_hh_sft_on_the_shared_file(hh_file, tmp_path):
    cfg = compose_stage("sft", [*FAST_SFT, "data=hh_sft", f"data.path={hh_file}", "data.max_rows=96",
                                "data.max_seq_len=128", "train.max_steps=4", "train.eval_every=4"],
                        tmp_path / "sft")
    metrics = sft.run(cfg)
    assert metrics["steps"] == 4 and metrics["truncated_rows"] > 0  # HH dialogues exceed 128 tokens
    manifest = artifacts.read_manifest(tmp_path / "sft")
    assert manifest["data"]["train_rows"] + manifest["data"]["eval_rows"] == 96


def test_bad_data_row_names_file_row_and_field(tmp_path):
    path = tmp_path / "demos.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": 3}\n')
    cfg = compose_stage("sft", [*FAST_SFT, f"data.path={path}"], tmp_path / "sft")
    with pytest.raises(DataError) as err:
        sft.run(cfg)
    assert "demos.jsonl" in str(err.value) and "line 2" in str(err.value) and "completion" in str(err.value)
    assert not artifacts.is_finished(tmp_path / "sft")


@pytest.mark.slow
def test_epochs_set_the_run_length(tmp_path):
    # 256 rows / 16 per step = 16 steps per epoch; 1.5 epochs -> 24 steps
    cfg = compose_stage("sft", [*FAST_SFT, "train.epochs=1.5", "train.max_steps=999"], tmp_path / "sft")
    assert sft.run(cfg)["steps"] == 24
