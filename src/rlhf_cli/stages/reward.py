"""`rlhf reward`: train a reward model on ranked pairs (stage 2 of InstructGPT).

Reads top to bottom: set up (run directory, the upstream SFT artifact as backbone, pairs, optimizer, resume), loop
(chosen and rejected through the model in one forward pass, the ranking loss, accumulation, clipping, held-out
evaluation, checkpoints), save (the reward model with its held-out score statistics, a summary).

Loss per pair: -log σ(r_chosen - r_rejected - margin) + center_coef · (r_chosen + r_rejected)², averaged over the
pairs of the whole optimizer step however it is split into micro-batches and processes.
"""

from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path

import torch

from rlhf_cli import artifacts
from rlhf_cli.config import RewardConfig, to_dict
from rlhf_cli.data import toy
from rlhf_cli.data.loading import load_rows
from rlhf_cli.data.preference import collate_pairs, normalize_preference_rows, tokenize_pairs
from rlhf_cli.data.splits import holdout
from rlhf_cli.engine import batches, checkpoint, device as dev, dist, rundir
from rlhf_cli.engine.guard import Guard
from rlhf_cli.engine.logging import MetricsLog, console, metrics_text, progress_bar, summary_table
from rlhf_cli.engine.optim import apply_hyperparameters, build_optimizer, build_scheduler, optimizer_step
from rlhf_cli.models.loading import ensure_pad_token, load_tokenizer, quiet_transformers, resolve
from rlhf_cli.models.reward import RewardModel
from rlhf_cli.rl.reward import pairwise_loss

TRAIN_ACCURACY_PAIRS = 1000  # the final train accuracy is measured on at most this many training pairs


def run(cfg: RewardConfig) -> dict:
    device = dev.pick(cfg.train.device, dist.local_rank_from_env())
    d = dist.init(device.type)
    try:
        return _run(cfg, d, device)
    finally:
        dist.close()


def _run(cfg: RewardConfig, d: dist.Dist, device: torch.device) -> dict:
    con = console(d.is_main)
    run_dir = Path(cfg.run_dir)

    # ---- set up: upstream artifact, run directory (refused, resumed, replaced or fresh), seeds -------------
    backbone_path, parent = artifacts.upstream(cfg.model.name_or_path, cfg.root, cfg.experiment, "sft", "policy",
                                               cfg.artifact_check)
    plan = rundir.prepare(cfg, d)
    work_dir, ckpt_dir = plan.work_dir, plan.checkpoints
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # the head's initialisation must match on every rank

    # ---- data rows (validated before anything heavy loads), then tokenizer, model, tokens -----------------
    train_rows, eval_rows, source, data_stats = load_pairs(cfg)
    data_sha256 = rundir.fingerprint(train_rows, eval_rows)
    rundir.check_data(plan, cfg, data_sha256, d)
    quiet_transformers()
    model_cfg = cfg.model
    if parent is None:
        model_cfg.name_or_path = backbone_path
        backbone_path = resolve(model_cfg)  # builds the built-in tiny model if asked for
    tokenizer = load_tokenizer(model_cfg, backbone_path)
    ensure_pad_token(tokenizer, require_eos=False)  # causal backbones append EOS: tokenize_pairs checks
    model = RewardModel.from_backbone(backbone_path, tokenizer, pooling=cfg.model.pooling,
                                      revision=None if parent else cfg.model.revision,
                                      trust_remote_code=cfg.model.trust_remote_code).to(device)
    model.train()
    train_set, train_stats = tokenize_pairs(train_rows, tokenizer, cfg.data.max_seq_len, model.is_encoder,
                                            source=source)
    eval_set, eval_stats = tokenize_pairs(eval_rows, tokenizer, cfg.data.max_seq_len, model.is_encoder,
                                          source=f"{source} (held-out rows)")
    eval_gold = [toy.gold_score(r["prompt"], r["chosen"]) > toy.gold_score(r["prompt"], r["rejected"])
                 for r in eval_rows] if cfg.data.path is None else None

    # ---- batch arithmetic ----------------------------------------------------------------------------------
    t = cfg.train
    grad_accum = batches.grad_accum_steps(t.examples_per_step, t.micro_batch_size, d.world_size)
    total_steps, steps_per_epoch = batches.total_steps(t, len(train_set))
    con.print(f"[bold]rlhf reward[/bold] -> {run_dir}")
    con.print(f"backbone {backbone_path} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"pooling {model.pooling}) on {device}, {dev.precision(device)}; data {source}: {len(train_set)} "
              f"train / {len(eval_set)} held-out pairs, {train_stats['truncated'] + eval_stats['truncated']} "
              f"truncated to {cfg.data.max_seq_len} tokens")
    con.print(f"batch: examples_per_step {t.examples_per_step} pairs = micro_batch_size {t.micro_batch_size} x "
              f"grad_accum_steps {grad_accum} x world_size {d.world_size}; {total_steps} steps = "
              f"{total_steps / steps_per_epoch:.2f} epochs of {steps_per_epoch} steps")

    # ---- optimizer, DDP, resume ----------------------------------------------------------------------------
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    step, last, held, skipped = 0, {}, {}, 0
    if plan.resume_from is not None:
        state = checkpoint.load(plan.resume_from, {"model": model}, optimizer, scheduler, restore_rng=d.is_main)
        apply_hyperparameters(optimizer, scheduler, cfg.optim)
        step, last, held, skipped = state["step"], state.get("last", {}), state.get("held", {}), state.get(
            "skipped_steps", 0)
        con.print(f"resumed from {plan.resume_from} (step {step})")
    guard = Guard("reward", ckpt_dir, cfg.optim.lr, t.max_skipped_steps, skipped)
    train_model = model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    log = MetricsLog(work_dir, d.is_main, cfg.logger, resume_step=step if plan.resume_from else None)
    pad_id = tokenizer.pad_token_id
    margin_on = cfg.reward.use_margin

    def scores(batch_examples: list[dict], net) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = batches.to_device(collate_pairs(batch_examples, pad_id), device)
        r = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).float()
        n = len(batch_examples)
        return r[:n], r[n:], batch["margin"]

    def evaluate(examples: list[dict], gold: list[bool] | None = None) -> dict:
        """Pairwise accuracy, mean margin, reward mean/std (and gold accuracy) over examples, all ranks."""
        model.eval()
        idx = list(range(d.rank, len(examples), d.world_size))
        acc = torch.zeros(7, dtype=torch.float64)  # n, correct, loss, margin, r, r², gold-correct
        with torch.no_grad(), dev.autocast(device):
            for i in range(0, len(idx), t.micro_batch_size):
                part = idx[i:i + t.micro_batch_size]
                rc, rr, m = scores([examples[j] for j in part], model)
                loss = pairwise_loss(rc, rr, m if margin_on else None, cfg.reward.center_coef, reduction="sum")
                both = torch.cat([rc, rr])
                gold_hits = ((rc > rr).cpu() == torch.tensor([gold[j] for j in part])).sum() if gold else 0
                acc += torch.tensor([len(part), float((rc > rr).sum()), float(loss), float((rc - rr).sum()),
                                     float(both.sum()), float((both ** 2).sum()), float(gold_hits)],
                                    dtype=torch.float64)
        n, correct, loss, margin, r_sum, r_sq, gold_correct = dist.all_sum(d, acc.tolist(), device)
        model.train()
        n_scores = 2 * n
        mean = r_sum / max(n_scores, 1)
        out = {"accuracy": correct / max(n, 1), "loss": loss / max(n, 1), "margin": margin / max(n, 1),
               "reward_mean": mean, "reward_std": max(r_sq / max(n_scores, 1) - mean ** 2, 0.0) ** 0.5}
        if gold:
            out["gold_accuracy"] = gold_correct / max(n, 1)
        return out

    # ---- loop ----------------------------------------------------------------------------------------------
    pairs_seen, t_start = 0, time.perf_counter()
    with progress_bar(con) as bar:
        task = bar.add_task("reward", total=total_steps, completed=step, metrics="")
        while step < total_steps:
            t0 = time.perf_counter()
            examples = [train_set[i] for i in
                        batches.step_indices(step, t.examples_per_step, len(train_set), cfg.seed)]
            mine = batches.rank_slice(examples, d.rank, d.world_size)
            sums = torch.zeros(3, dtype=torch.float64)  # loss, correct, margin
            for k in range(grad_accum):
                micro = mine[k * t.micro_batch_size:(k + 1) * t.micro_batch_size]
                sync = k == grad_accum - 1 or not d.enabled
                with (contextlib.nullcontext() if sync else train_model.no_sync()), dev.autocast(device):
                    rc, rr, m = scores(micro, train_model)
                    loss = pairwise_loss(rc, rr, m if margin_on else None, cfg.reward.center_coef, reduction="sum")
                    # DDP averages gradients over ranks: scale so the total is the mean over the global step
                    (loss * d.world_size / t.examples_per_step).backward()
                sums += torch.tensor([loss.item(), float((rc > rr).sum()), (rc - rr).sum().item()],
                                     dtype=torch.float64)
            loss_sum, correct, margin = dist.all_sum(d, sums.tolist(), device)
            n = t.examples_per_step
            grad_norm = optimizer_step(model.parameters(), optimizer, scheduler, cfg.optim.max_grad_norm, guard,
                                       step + 1, loss_sum / n)
            step += 1
            dt = time.perf_counter() - t0
            pairs_seen += t.examples_per_step
            last = {"loss": loss_sum / n, "accuracy": correct / n, "margin": margin / n,
                    "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, "pairs_per_s": n / dt,
                    **({"skipped_steps": guard.skipped} if guard.skipped else {})}
            if step % t.eval_every == 0 or step == total_steps:
                held = evaluate(eval_set, eval_gold) if eval_set else {}
                guard.require_finite(step, "held-out loss", held.get("loss", 0.0))
                last.update({f"eval_{k}": v for k, v in held.items()})
            if step % t.log_every == 0 or step % t.eval_every == 0 or step == total_steps:
                log.log(step, last)
            bar.update(task, completed=step, metrics=metrics_text(
                {"loss": last["loss"], "acc": last["accuracy"], "eval_acc": held.get("accuracy", float("nan")),
                 "lr": last["lr"], "pairs/s": last["pairs_per_s"]}))
            if step % t.checkpoint_every == 0 or step == total_steps:
                if d.is_main:
                    checkpoint.save(ckpt_dir, step, {"model": model}, optimizer, scheduler,
                                    {"step": step, "last": last, "held": held, "skipped_steps": guard.skipped,
                                     "config": to_dict(cfg), "data_sha256": data_sha256},
                                    t.keep_checkpoints, cfg.artifact_check)
                dist.barrier(d)
    wall = time.perf_counter() - t_start
    log.close()

    # ---- save: final accuracies, score statistics, the artifact, a summary --------------------------------
    if not held and eval_set:
        held = evaluate(eval_set, eval_gold)
    train_eval = evaluate(train_set[:TRAIN_ACCURACY_PAIRS])
    model.score_stats = {"mean": held.get("reward_mean", train_eval["reward_mean"]),
                         "std": held.get("reward_std", train_eval["reward_std"]),
                         "n": 2 * len(eval_set or train_set[:TRAIN_ACCURACY_PAIRS])}
    metrics = {"steps": step, "train_accuracy": train_eval["accuracy"], "eval_accuracy": held.get("accuracy"),
               "eval_gold_accuracy": held.get("gold_accuracy"), "eval_margin": held.get("margin"),
               "eval_loss": held.get("loss"), "reward_mean": model.score_stats["mean"],
               "reward_std": model.score_stats["std"],
               "pairs_per_s": pairs_seen / wall if wall > 0 and pairs_seen else None,
               "train_pairs": len(train_set), "eval_pairs": len(eval_set),
               "truncated_pairs": train_stats["truncated"] + eval_stats["truncated"], "skipped_steps": guard.skipped}
    if cfg.data.path is None:
        metrics["label_noise_ceiling"] = toy.label_noise_ceiling(cfg.data.toy.label_noise)
    if d.is_main:
        tokenizer_match = policy_tokenizer_match(parent, cfg, tokenizer)
        manifest = artifacts.build_manifest(
            stage="reward", kind="reward_model", config=to_dict(cfg),
            base_model=parent["path"] if parent else cfg.model.name_or_path, tokenizer=tokenizer,
            metrics=metrics, parents=[parent] if parent else [],
            extra={"reward": {"pooling": model.pooling, "is_encoder": model.is_encoder,
                              "score_stats": model.score_stats},
                   "policy_tokenizer": tokenizer_match,
                   "data": {"source": str(source), "sha256": data_sha256, **data_stats,
                            "truncated": metrics["truncated_pairs"]}})
        artifacts.publish(work_dir, lambda tmp: model.save_pretrained(tmp, tokenizer), manifest, run_dir)
        shown = {k: v for k, v in metrics.items() if v is not None}
        shown.update({"wall_seconds": wall, "artifact": str(run_dir / "model")})
        con.print(summary_table("reward summary", shown))
    dist.barrier(d)
    return metrics


# ---- helpers ----------------------------------------------------------------------------------------------------

def load_pairs(cfg: RewardConfig) -> tuple[list[dict], list[dict], str, dict]:
    """Train and held-out pairs: the built-in task's oracle-labelled pairs, or a file / hub dataset."""
    data = cfg.data
    if data.path is None:
        noise = data.toy.label_noise
        train = toy.preference_rows(data.toy.num_train, data.toy.seed, "train", noise)
        held = toy.preference_rows(data.toy.num_eval, data.toy.seed, "eval", noise)
        return train, held, "built-in task", {"rows": len(train) + len(held), "label_noise": noise}
    rows, source = load_rows(data.path, data.split, data.max_rows)
    rows, stats = normalize_preference_rows(rows, source, data.format, data.skip_invalid)
    if data.eval_path:
        eval_rows, eval_source = load_rows(data.eval_path, data.split)
        eval_rows, eval_stats = normalize_preference_rows(eval_rows, eval_source, data.format, data.skip_invalid)
        return rows, eval_rows, source, {"train": stats, "eval": eval_stats}
    train, held = holdout(rows, data.eval_fraction, data.max_eval_rows, cfg.seed)
    return train, held, source, stats


def policy_tokenizer_match(parent: dict | None, cfg: RewardConfig, tokenizer) -> dict:
    """Does the reward model read the policy's tokens? PPO passes ids straight through when it does and decodes
    and re-tokenises when it does not. The policy is the SFT artifact of this experiment, when there is one."""
    if parent is not None:
        return {"policy": parent["path"], "same_tokenizer": True}
    sft_dir = Path(cfg.root) / cfg.experiment / "sft"
    if not artifacts.is_finished(sft_dir):
        return {"policy": None, "same_tokenizer": None}
    from transformers import AutoTokenizer

    policy_tok = AutoTokenizer.from_pretrained(sft_dir / "model")
    same = (policy_tok.get_vocab() == tokenizer.get_vocab() and policy_tok.eos_token_id == tokenizer.eos_token_id
            and policy_tok.pad_token_id == tokenizer.pad_token_id)
    return {"policy": str(sft_dir), "same_tokenizer": same}
