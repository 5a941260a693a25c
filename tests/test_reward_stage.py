"""`rlhf reward` in-process: accuracy rises, the artifact hands over to PPO, upstream and data mistakes are clear."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from helpers import FAST_REWARD, compose_stage
from rlhf_cli import artifacts
from rlhf_cli.data.preference import collate_pairs, tokenize_pairs
from rlhf_cli.errors import ArtifactError, DataError
from rlhf_cli.models.reward import RewardModel
from rlhf_cli.stages import reward


@pytest.fixture(scope="module")
def root(trained_experiment):
    """An experiment `demo` with a finished SFT artifact; reward runs of the tests' own go under tmp_path."""
    return trained_experiment


@pytest.fixture(scope="module")
def trained(root, tmp_path_factory):
    # no label noise: accuracy can climb far above chance within a few seconds of training
    run_dir = tmp_path_factory.mktemp("reward") / "reward"
    cfg = compose_stage("reward", [*FAST_REWARD, "experiment=demo", f"root={root}", "data.toy.label_noise=0",
                                   "data.toy.num_train=2000", "data.toy.num_eval=200", "train.max_steps=150",
                                   "train.eval_every=75", "train.examples_per_step=32", "train.micro_batch_size=16"],
                        run_dir)
    return reward.run(cfg), run_dir


def test_heldout_accuracy_rises_well_above_chance(trained):
    metrics, run_dir = trained
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    assert last["eval_accuracy"] >= 0.7 and metrics["eval_gold_accuracy"] >= 0.7
    assert metrics["train_accuracy"] >= 0.7
    assert last["loss"] < first["loss"] and last["eval_loss"] < 0.6931  # below the loss of a constant reward


def test_artifact_names_its_parent_and_loads_with_one_call(trained, root):
    metrics, run_dir = trained
    manifest = artifacts.read_manifest(run_dir)
    assert manifest["kind"] == "reward_model" and manifest["stage"] == "reward"
    sft_manifest = artifacts.read_manifest(root / "demo" / "sft")
    assert manifest["parents"] == [{"stage": "sft", "kind": "policy", "path": str(root / "demo" / "sft"),
                                    "model_sha256": sft_manifest["model_sha256"]}]
    assert manifest["policy_tokenizer"]["same_tokenizer"] is True
    assert manifest["reward"]["pooling"] == "last"
    stats = manifest["reward"]["score_stats"]
    assert stats["n"] == 400 and stats["std"] > 0

    model = RewardModel.from_pretrained(run_dir / "model").eval()
    assert model.score_stats == stats
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    from rlhf_cli.data import toy

    pairs, _ = tokenize_pairs(toy.preference_rows(200, 0, "eval", 0.0), tokenizer, 512, encoder=False)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        scores = model(batch["input_ids"], batch["attention_mask"])
    # the saved statistics are those of the held-out scores this very model gives
    assert scores.mean().item() == pytest.approx(stats["mean"], abs=1e-4)
    assert scores.std(unbiased=False).item() == pytest.approx(stats["std"], abs=1e-3)


def test_missing_sft_artifact_names_the_command(tmp_path):
    cfg = compose_stage("reward", [*FAST_REWARD, "experiment=nosft", f"root={tmp_path}"], tmp_path / "nosft" / "reward")
    with pytest.raises(ArtifactError) as err:
        reward.run(cfg)
    assert "rlhf sft experiment=nosft" in err.value.hint
    assert not (tmp_path / "nosft" / "reward" / "manifest.json").exists()


def test_wrong_kind_of_upstream_artifact(trained, tmp_path):
    _, run_dir = trained
    cfg = compose_stage("reward", [*FAST_REWARD, f"model.name_or_path={run_dir}"], tmp_path / "r")
    with pytest.raises(ArtifactError, match="reward_model artifact, but a policy is needed"):
        reward.run(cfg)


def test_encoder_backbone_is_recorded_as_a_different_tokenizer(root, tiny_bert_dir, tmp_path):
    cfg = compose_stage("reward", [*FAST_REWARD, "experiment=demo", f"root={root}",
                                   f"model.name_or_path={tiny_bert_dir}", "train.max_steps=4"],
                        tmp_path / "reward_bert")
    reward.run(cfg)
    manifest = artifacts.read_manifest(tmp_path / "reward_bert")
    assert manifest["reward"] == {**manifest["reward"], "pooling": "first", "is_encoder": True}
    assert manifest["policy_tokenizer"] == {"policy": str(root / "demo" / "sft"), "same_tokenizer": False}
    assert manifest["parents"] == []


@pytest.mark.slow
def test_hh_pairs_on_the_shared_file(hh_file, tiny_bert_dir, tmp_path):
    cfg = compose_stage("reward", [*FAST_REWARD, "data=hh_pref", f"data.path={hh_file}", "data.max_rows=96",
                                   "data.max_seq_len=64", f"model.name_or_path={tiny_bert_dir}", "train.max_steps=3"],
                        tmp_path / "hh")
    metrics = reward.run(cfg)
    assert metrics["steps"] == 3 and metrics["truncated_pairs"] > 0
    assert metrics["train_pairs"] + metrics["eval_pairs"] == 96


@pytest.mark.parametrize("rows,needles", [
    ([{"prompt": "p", "chosen": "a", "rejected": "a"}], ["line 1", "identical", "data.skip_invalid=true"]),
    ([{"prompt": "p", "chosen": "a"}], ["line 1", "rejected"]),
    ([{"prompt": "p", "chosen": 3, "rejected": "b"}], ["line 1", "chosen"]),
    ([{"prompt": "p", "chosen": " ", "rejected": ""}], ["line 1", "empty"]),
])
def test_bad_pairs_name_file_row_and_field(rows, needles, tmp_path, tiny_bert_dir):
    path = tmp_path / "pairs.jsonl"
    good = [{"prompt": f"p{i}", "chosen": "yes", "rejected": "no"} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + good))
    cfg = compose_stage("reward", [*FAST_REWARD, f"data.path={path}", f"model.name_or_path={tiny_bert_dir}"],
                        tmp_path / "r")
    with pytest.raises(DataError) as err:
        reward.run(cfg)
    for needle in ["pairs.jsonl", *needles]:
        assert needle in str(err.value), str(err.value)


def test_skip_invalid_drops_and_counts(tmp_path, tiny_bert_dir):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "p", "chosen": "a", "rejected": "a"}] + \
        [{"prompt": f"give {i % 4 + 1} fruit :", "chosen": " fig", "rejected": " cat"} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose_stage("reward", [*FAST_REWARD, f"data.path={path}", f"model.name_or_path={tiny_bert_dir}",
                                   "data.skip_invalid=true", "train.max_steps=2"], tmp_path / "r")
    reward.run(cfg)
    data = artifacts.read_manifest(tmp_path / "r")["data"]
    assert data["dropped_identical"] == 1 and data["rows"] == 40
