"""`rlhf reward`: train a reward model on ranked pairs (stage 2 of InstructGPT).

`run` reads top to bottom: set up (the upstream SFT artifact as backbone, run directory, pairs, model, optimizer,
resume), loop (`train_step`: chosen and rejected through the model in one forward pass, the ranking loss over
micro-batches, one optimizer step; `evaluate` on the held-out pairs when due; logs and checkpoints), save (the
reward model with its held-out score statistics, a summary).

Loss per pair: -log σ(r_chosen - r_rejected - margin) + center_coef · (r_chosen + r_rejected)², averaged over the
pairs of the whole optimizer step however it is split into micro-batches and processes.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rlhf_cli import artifacts
from rlhf_cli.config import RewardConfig
from rlhf_cli.data import tasks
from rlhf_cli.data.preference import collate_pairs, tokenize_pairs
from rlhf_cli.engine import batches, device as dev, dist, rundir, train
from rlhf_cli.engine.logging import charts_row, console, metrics_text, progress_bar, summary_table
from rlhf_cli.errors import ConfigError
from rlhf_cli.models import lora
from rlhf_cli.models.loading import (packing_refusal, ensure_pad_token, load_tokenizer, quiet_transformers, resolve,
                                     same_tokenizer)
from rlhf_cli.models.reward import RewardModel, score_pairs
from rlhf_cli.rl.reward import pairwise_loss

TRAIN_ACCURACY_PAIRS = 1000  # the final train accuracy is measured on at most this many training pairs


def run(cfg: RewardConfig) -> dict:
    with train.process(cfg.train.device, cfg.train.precision, cfg.train.strategy) as (d, device):
        con, t = console(d.is_main), cfg.train
        # ---- set up: upstream artifact, run directory, seeds, pairs (validated before anything heavy loads) ---
        backbone, parent = artifacts.upstream(cfg.model.name_or_path, cfg.root, cfg.experiment, "sft", "policy",
                                              cfg.artifact_check)
        plan = rundir.prepare(cfg, d)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # the head's initialisation must match on every rank
        train_rows, eval_rows, source, data_stats = tasks.preference_pairs(cfg.data, cfg.seed)
        data_sha256 = rundir.check_data(plan, cfg, d, train_rows, eval_rows)
        model, tokenizer, backbone, packing = load_model(cfg, backbone, parent, device)
        train_set, eval_set, truncated = tokenize(cfg, train_rows, eval_rows, tokenizer, model.is_encoder, source)
        eval_gold = tasks.gold_preferences(cfg.data, eval_rows)
        steps = batches.step_plan(t, len(train_set), d.world_size)
        show_plan(con, cfg, model, backbone, device, f"data {source}: {len(train_set)} train / {len(eval_set)} "
                  f"held-out pairs, {truncated} truncated to {cfg.data.max_seq_len} tokens",
                  f"{steps.describe(t, d.world_size, ' pairs')}; {packing}")
        train_model = train.wrap_for_training(model, d, device, t)
        training = train.start(plan, cfg, {"model": model}, steps.total, d, restore_rng=d.is_main)
        loop = Counters.restore(training.resumed)

        # ---- loop: one optimizer step over examples_per_step pairs, evaluation, logs, checkpoints ------------
        pairs_seen, t_start = 0, time.perf_counter()
        with progress_bar(con, t.log_every) as bar:
            task = bar.add_task("reward", total=steps.total, completed=loop.step, metrics="")
            while loop.step < steps.total:
                t0 = time.perf_counter()
                examples = batches.step_examples(train_set, loop.step, t.examples_per_step, cfg.seed)
                step_metrics = train_step(train_model, examples, tokenizer.pad_token_id, training, loop.step, cfg,
                                          d, device)
                loop.step += 1
                pairs_seen += t.examples_per_step
                loop.last = {**step_metrics, "pairs_per_s": t.examples_per_step / (time.perf_counter() - t0),
                             **training.step_metrics()}
                if train.due(loop.step, t.eval_every, steps.total):
                    loop.held = evaluate(model, eval_set, tokenizer.pad_token_id, cfg, d, device, eval_gold)
                    training.guard.require_finite(loop.step, "held-out loss", loop.held.get("loss", 0.0))
                    loop.last.update({f"eval_{k}": v for k, v in loop.held.items()})
                if train.due(loop.step, t.log_every, steps.total) or train.due(loop.step, t.eval_every, steps.total):
                    training.log.log(loop.step, loop.last)
                bar.update(task, completed=loop.step, metrics=progress_text(loop))
                if train.due(loop.step, t.checkpoint_every, steps.total):
                    train.save_checkpoint(d, plan.checkpoints, loop.step, {"model": model}, training, loop.state(),
                                          cfg, data_sha256, final=loop.step == steps.total)
        wall = time.perf_counter() - t_start

        # ---- save: final accuracies, score statistics, the artifact, a summary --------------------------------
        metrics = final_metrics(model, train_set, eval_set, eval_gold, loop, cfg, d, device) | {
            "pairs_per_s": pairs_seen / wall if wall > 0 and pairs_seen else None, "truncated_pairs": truncated,
            "skipped_steps": training.guard.skipped, **tasks.label_noise_ceiling(cfg.data)}
        published = train.published(model, d)  # the full weights (and score statistics), on rank 0
        if d.is_main:
            publish(cfg, published, tokenizer, parent, metrics, {"source": str(source), "sha256": data_sha256,
                                                             **data_stats, "truncated": truncated}, plan.work_dir)
            pngs = train.record_end(training, "reward", Path(cfg.run_dir), metrics, "reward_model")
            show_summary(con, metrics, wall, Path(cfg.run_dir), pngs)
        dist.barrier(d)
        return metrics


# ---- set up -----------------------------------------------------------------------------------------------------

def load_model(cfg: RewardConfig, backbone: str, parent: dict | None, device) -> tuple[RewardModel, object, str, str]:
    """The reward model (backbone + a fresh scalar head, in training mode; LoRA adapters on the backbone when
    model.lora.r > 0), its tokenizer with a pad token, where the backbone came from: the SFT artifact (`parent`), or
    model.name_or_path (the built-in tiny model is built if asked for), and how data.packing was settled."""
    from_artifact = parent is not None
    backbone = backbone if from_artifact else resolve(cfg.model)
    quiet_transformers()
    tokenizer = load_tokenizer(cfg.model, backbone)
    ensure_pad_token(tokenizer, require_eos=False)  # causal backbones append EOS: tokenize_pairs checks
    model = RewardModel.from_backbone(backbone, tokenizer, pooling=cfg.model.pooling,
                                      revision=None if from_artifact else cfg.model.revision,
                                      trust_remote_code=cfg.model.trust_remote_code).to(train.load_device(device,
                                                                                                        cfg.train))
    packing = batches.decide_packing(cfg.data, lambda: why_not_packable(model, backbone))
    lora.add_adapters(model, cfg.model.lora, cfg.seed)  # on the backbone; the head trains in full
    model.train()
    return model, tokenizer, backbone, packing


def why_not_packable(model: RewardModel, backbone: str) -> str | None:
    """Why the reward model cannot score packed rows (data.packing), or None: it must be causal, read at each
    sequence's last token, and its body must keep packed sequences apart (models.loading.packing_refusal)."""
    if not model.packable:
        kind = "an encoder" if model.is_encoder else "not read at its last token"
        return f"the reward model on {backbone} is {kind}: packed sequences would see each other or be read elsewhere"
    return packing_refusal(model.backbone, backbone)


def tokenize(cfg: RewardConfig, train_rows: list[dict], eval_rows: list[dict], tokenizer, is_encoder: bool,
             source) -> tuple[list[dict], list[dict], int]:
    """(train pairs, held-out pairs, pairs truncated to data.max_seq_len), tokenized as the model reads them."""
    train_set, train_stats = tokenize_pairs(train_rows, tokenizer, cfg.data.max_seq_len, is_encoder, source=source)
    eval_set, eval_stats = tokenize_pairs(eval_rows, tokenizer, cfg.data.max_seq_len, is_encoder,
                                          source=f"{source} (held-out rows)")
    return train_set, eval_set, train_stats["truncated"] + eval_stats["truncated"]


def show_plan(con, cfg: RewardConfig, model: RewardModel, backbone: str, device, data: str, batch: str) -> None:
    con.print(f"[bold]rlhf reward[/bold] -> {cfg.run_dir}")
    con.print(f"backbone {backbone} ({lora.describe(model)}, pooling {model.pooling}) on {device}, "
              f"{dev.precision(device)}; {data}")
    con.print(batch)


@dataclass
class Counters:
    """What the loop carries from one step to the next (and a checkpoint carries across a resume)."""
    step: int = 0                                   # optimizer steps done
    held: dict = field(default_factory=dict)        # the latest held-out numbers (`evaluate`)
    last: dict = field(default_factory=dict)

    @classmethod
    def restore(cls, state: dict) -> "Counters":
        """From a checkpoint's state ({} for a fresh run)."""
        return cls(state.get("step", 0), state.get("held", {}), state.get("last", {}))

    def state(self) -> dict:
        return {"last": self.last, "held": self.held}


# ---- the loop ---------------------------------------------------------------------------------------------------

def pair_scores(net, examples: list[dict], pad_id: int, device,
                packing: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected, margin) of a micro-batch of pairs, chosen and rejected in one forward pass (padded
    rows, or with `packing` one padding-free row)."""
    batch = batches.to_device(collate_pairs(examples, pad_id, packing), device)
    return *score_pairs(net, batch), batch["margin"]


def train_step(train_model, examples: list[dict], pad_id: int, training: train.Training, step: int,
               cfg: RewardConfig, d: dist.Dist, device) -> dict:
    """One optimizer step on this step's pairs (this rank's share, in micro-batches): loss, accuracy (a tie counts
    as wrong) and margin, means over the step's pairs on all ranks, and the gradient norm (None when skipped). The
    micro-batches do not wait for the device: one sync per step."""
    sums = torch.zeros(3, device=device)  # loss, correct, margin: summed on the device, read once per step
    for micro, last in train.micro_batches(batches.rank_slice(examples, d.rank, d.world_size),
                                           batches.micro_batch(cfg.train, d.world_size)):
        with train.micro_step([train_model], last, device):
            rc, rr, m = pair_scores(train_model, micro, pad_id, device, cfg.data.packing)
            loss = pairwise_loss(rc, rr, m if cfg.reward.use_margin else None, cfg.reward.center_coef,
                                 reduction="sum")
            # DDP averages gradients over ranks: scale so the total is the mean over the global step
            (loss * d.world_size / cfg.train.examples_per_step).backward()
        sums += torch.stack([loss.detach(), (rc > rr).sum().float(), (rc - rr).detach().sum()])
    loss_sum, correct, margin = dist.all_sum(d, sums.tolist(), device)
    n = cfg.train.examples_per_step
    return {"loss": loss_sum / n, "accuracy": correct / n, "margin": margin / n,
            "grad_norm": train.take_step(training, step + 1, loss_sum / n)}


def progress_text(loop: Counters) -> str:
    return metrics_text({"loss": loop.last["loss"], "acc": loop.last["accuracy"],
                         "eval_acc": loop.held.get("accuracy", float("nan")), "lr": loop.last["lr"],
                         "pairs/s": loop.last["pairs_per_s"]})


def evaluate(model, examples: list[dict], pad_id: int, cfg: RewardConfig, d: dist.Dist, device,
             gold: list[bool] | None = None) -> dict:
    """Pairwise accuracy (a tie counts as wrong), loss, mean margin, reward mean/std (and, given each pair's gold
    preference, the accuracy against it) over `examples`, all ranks; {} for no examples."""
    if not examples:
        return {}
    model.eval()
    acc = torch.zeros(7, dtype=torch.float64)  # n, correct, loss, margin, r, r², gold-correct
    with torch.no_grad(), dev.autocast(device):
        for part, real in batches.rank_micro_batches(list(range(len(examples))), d.rank, d.world_size,
                                                     cfg.train.micro_batch_size):
            rc, rr, m = pair_scores(model, [examples[j] for j in part], pad_id, device, cfg.data.packing)
            if not real:
                continue
            loss = pairwise_loss(rc, rr, m if cfg.reward.use_margin else None, cfg.reward.center_coef,
                                 reduction="sum")
            both = torch.cat([rc, rr])
            gold_hits = ((rc > rr).cpu() == torch.tensor([gold[j] for j in part])).sum() if gold else 0
            acc += torch.tensor([len(part), float((rc > rr).sum()), float(loss), float((rc - rr).sum()),
                                 float(both.sum()), float((both ** 2).sum()), float(gold_hits)], dtype=torch.float64)
    n, correct, loss, margin, r_sum, r_sq, gold_correct = dist.all_sum(d, acc.tolist(), device)
    model.train()
    n_scores = 2 * n
    mean = r_sum / max(n_scores, 1)
    out = {"accuracy": correct / max(n, 1), "loss": loss / max(n, 1), "margin": margin / max(n, 1),
           "reward_mean": mean, "reward_std": max(r_sq / max(n_scores, 1) - mean ** 2, 0.0) ** 0.5}
    if gold:
        out["gold_accuracy"] = gold_correct / max(n, 1)
    return out


# ---- save -------------------------------------------------------------------------------------------------------

def final_metrics(model: RewardModel, train_set: list, eval_set: list, eval_gold, loop: Counters, cfg: RewardConfig,
                  d: dist.Dist, device) -> dict:
    """Held-out and train accuracy, and the score statistics PPO normalises with (set on the model): over the
    held-out pairs, or over up to TRAIN_ACCURACY_PAIRS training pairs when there are none."""
    pad_id = model.pad_token_id
    held = loop.held or evaluate(model, eval_set, pad_id, cfg, d, device, eval_gold)
    train_eval = evaluate(model, train_set[:TRAIN_ACCURACY_PAIRS], pad_id, cfg, d, device)
    model.score_stats = {"mean": held.get("reward_mean", train_eval["reward_mean"]),
                         "std": held.get("reward_std", train_eval["reward_std"]),
                         "n": 2 * len(eval_set or train_set[:TRAIN_ACCURACY_PAIRS])}
    return {"steps": loop.step, "train_accuracy": train_eval["accuracy"], "eval_accuracy": held.get("accuracy"),
            "eval_gold_accuracy": held.get("gold_accuracy"), "eval_margin": held.get("margin"),
            "eval_loss": held.get("loss"), "reward_mean": model.score_stats["mean"],
            "reward_std": model.score_stats["std"], "train_pairs": len(train_set), "eval_pairs": len(eval_set)}


def publish(cfg: RewardConfig, model: RewardModel, tokenizer, parent: dict | None, metrics: dict, data: dict,
            work_dir: Path) -> None:
    manifest = artifacts.build_manifest(
        stage="reward", kind="reward_model", config=asdict(cfg),
        base_model=parent["path"] if parent else cfg.model.name_or_path, tokenizer=tokenizer,
        metrics=metrics, parents=[parent] if parent else [],
        extra={"reward": {"pooling": model.pooling, "is_encoder": model.is_encoder, "score_stats": model.score_stats},
               "policy_tokenizer": policy_tokenizer_match(parent, cfg, tokenizer), "data": data})
    # with LoRA: the adapters merged into the backbone, a plain reward model
    artifacts.publish(work_dir, lambda tmp: lora.merged(model).save_pretrained(tmp, tokenizer), manifest,
                      Path(cfg.run_dir))


def policy_tokenizer_match(parent: dict | None, cfg: RewardConfig, tokenizer) -> dict:
    """Does the reward model read the policy's tokens? PPO passes ids straight through when it does and decodes
    and re-tokenises when it does not. The policy is the SFT artifact of this experiment, when there is one."""
    if parent is not None:
        return {"policy": parent["path"], "same_tokenizer": True}
    sft_dir = Path(cfg.root) / cfg.experiment / "sft"
    if not artifacts.is_finished(sft_dir):
        return {"policy": None, "same_tokenizer": None}
    from transformers import AutoTokenizer

    return {"policy": str(sft_dir), "same_tokenizer": same_tokenizer(AutoTokenizer.from_pretrained(sft_dir / "model"),
                                                                     tokenizer)}


def show_summary(con, metrics: dict, wall: float, run_dir: Path, pngs: list[Path]) -> None:
    shown = {k: v for k, v in metrics.items() if v is not None}
    con.print(summary_table("reward summary", {**shown, "wall_seconds": wall, "artifact": str(run_dir / "model"),
                                               **charts_row(pngs, run_dir)}))
