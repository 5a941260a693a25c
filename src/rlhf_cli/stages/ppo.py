"""`rlhf ppo`: optimise the SFT policy against the reward model with PPO (stage 3 of InstructGPT).

Reads top to bottom: set up (upstream artifacts, the four roles, prompts, optimizer, resume), loop (one iteration
= rollout, scoring, rewards and advantages, num_ppo_epochs of clipped updates over minibatches), save (the policy
artifact, a summary). The math lives in rl/ppo.py, one small pure function per formula; this file only wires it.

Roles: policy (trainable, from the SFT artifact), reference (frozen copy of it), reward model (frozen, from the
reward artifact) and value model (trainable, initialised from the reward model's backbone and head). Dropout is off
in all four. Each iteration reseeds from (seed, iteration, rank), so a resumed run samples what an uninterrupted
one would have.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import replace
from pathlib import Path

import torch

from rlhf_cli import artifacts
from rlhf_cli.config import ModelConfig, PPOConfig, to_dict
from rlhf_cli.data import toy
from rlhf_cli.data.loading import load_rows
from rlhf_cli.data.prompts import prompt_texts
from rlhf_cli.data.sft import encode_prompts
from rlhf_cli.engine import batches, checkpoint, device as dev, dist, rundir
from rlhf_cli.engine.guard import Guard
from rlhf_cli.engine.rollout import (policy_logits, response_logprobs, response_values, rollout, score_responses,
                                    value_slice)
from rlhf_cli.engine.logging import MetricsLog, append_jsonl, console, metrics_text, progress_bar, summary_table, \
    truncate_jsonl
from rlhf_cli.engine.optim import apply_hyperparameters, build_optimizer, build_scheduler, optimizer_step
from rlhf_cli.errors import ArtifactError, ConfigError
from rlhf_cli.models.loading import load_causal_lm, load_tokenizer
from rlhf_cli.models.reward import RewardModel
from rlhf_cli.rl import ppo as rl


def run(cfg: PPOConfig) -> dict:
    device = dev.pick(cfg.train.device, dist.local_rank_from_env())
    d = dist.init(device.type)
    try:
        return _run(cfg, d, device)
    finally:
        dist.close()


def _run(cfg: PPOConfig, d: dist.Dist, device: torch.device) -> dict:
    con = console(d.is_main)
    run_dir = Path(cfg.run_dir)
    p, t = cfg.ppo, cfg.train

    # ---- set up: upstream artifacts (checked before anything loads), run directory -------------------------
    check = cfg.artifact_check
    policy_path, sft_parent = artifacts.upstream(cfg.model.policy, cfg.root, cfg.experiment, "sft", "policy", check)
    reward_path, reward_parent = artifacts.upstream(cfg.model.reward, cfg.root, cfg.experiment, "reward",
                                                    "reward_model", check)
    value_path = reward_path
    if cfg.model.value is not None:
        value_path, _ = artifacts.upstream(cfg.model.value, cfg.root, cfg.experiment, "reward", "reward_model", check)
    plan = rundir.prepare(cfg, d)
    work_dir = plan.work_dir

    # ---- the four roles ------------------------------------------------------------------------------------
    policy_cfg = ModelConfig(name_or_path=policy_path, trust_remote_code=cfg.model.trust_remote_code)
    policy, tokenizer, policy_info = load_causal_lm(policy_cfg, device, dropout=False)
    reference, _, _ = load_causal_lm(policy_cfg, device, dropout=False)
    reference.eval().requires_grad_(False)
    reward_model = RewardModel.from_pretrained(reward_path, cfg.model.trust_remote_code).to(device)
    reward_model.eval().requires_grad_(False)
    reward_tokenizer = load_tokenizer(replace(policy_cfg, name_or_path=reward_path), reward_path)
    same_tokens = _same_tokenizer(tokenizer, reward_tokenizer)
    value_model = RewardModel.from_pretrained(value_path, cfg.model.trust_remote_code)
    value_init = "the reward model"
    if value_model.is_encoder or not _same_tokenizer(tokenizer, load_tokenizer(policy_cfg, value_path)):
        # a bidirectional value model would see the very tokens whose return it predicts
        value_init = "the policy with a fresh head (the reward model is not a causal LM on the policy's tokens)"
        value_model = RewardModel.from_backbone(policy_path, tokenizer, pooling="last")
    value_model.to(device).train()
    policy.train()
    if p.normalize_scores and not reward_model.score_stats.get("std"):
        raise ArtifactError(f"ppo.normalize_scores=true but {reward_path} records no score statistics",
                            hint="re-run `rlhf reward`, or set ppo.normalize_scores=false")

    # ---- prompts -------------------------------------------------------------------------------------------
    prompts, source = load_prompts(cfg, tokenizer)
    data_sha256 = rundir.fingerprint(prompts)
    rundir.check_data(plan, cfg, data_sha256, d)
    prompt_ids, prompts_cut = encode_prompts(prompts, tokenizer, cfg.data.max_seq_len - p.response_length)
    if p.prompts_per_rollout % d.world_size or (p.prompts_per_rollout // p.num_mini_batches) % (
            t.micro_batch_size * d.world_size):
        raise ConfigError(f"ppo.prompts_per_rollout={p.prompts_per_rollout} / num_mini_batches={p.num_mini_batches}"
                          f" is not micro_batch_size={t.micro_batch_size} x grad_accum_steps x "
                          f"world_size={d.world_size}", hint="adjust ppo.prompts_per_rollout or micro_batch_size")
    local_rollout = p.prompts_per_rollout // d.world_size
    local_minibatch = local_rollout // p.num_mini_batches
    grad_accum = local_minibatch // t.micro_batch_size
    optimizer_steps = t.max_steps * p.num_ppo_epochs * p.num_mini_batches
    con.print(f"[bold]rlhf ppo[/bold] -> {run_dir}")
    con.print(f"policy {policy_path} ({policy_info['parameters'] / 1e6:.2f}M), reward {reward_path} "
              f"({'same tokens' if same_tokens else 're-tokenised text'}), value model from {value_init}; {device}, "
              f"{dev.precision(device)}; prompts {source}: {len(prompts)} ({prompts_cut} cut to "
              f"{cfg.data.max_seq_len - p.response_length} tokens)")
    con.print(f"batch: prompts_per_rollout {p.prompts_per_rollout} = num_mini_batches {p.num_mini_batches} x "
              f"(micro_batch_size {t.micro_batch_size} x grad_accum_steps {grad_accum} x world_size "
              f"{d.world_size}); {p.num_ppo_epochs} epochs -> {p.num_ppo_epochs * p.num_mini_batches} optimizer "
              f"steps per iteration, {t.max_steps} iterations")

    # ---- optimizer, DDP, resume ----------------------------------------------------------------------------
    params = list(policy.parameters()) + list(value_model.parameters())
    optimizer = build_optimizer(params, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, optimizer_steps)
    step, kl_coef, first, last, skipped = 0, p.kl_coef, None, {}, 0
    if plan.resume_from is not None:
        state = checkpoint.load(plan.resume_from, {"policy": policy, "value": value_model}, optimizer, scheduler,
                                restore_rng=False)
        apply_hyperparameters(optimizer, scheduler, cfg.optim)
        step, kl_coef, first = state["step"], state["kl_coef"], state.get("first")
        last, skipped = state.get("last", {}), state.get("skipped_steps", 0)
        con.print(f"resumed from {plan.resume_from} (step {step}, kl_coef {kl_coef:.4g})")
        if d.is_main:  # those iterations run again: drop what they wrote
            truncate_jsonl(work_dir / "samples.jsonl", step)
    guard = Guard("ppo", plan.checkpoints, cfg.optim.lr, t.max_skipped_steps, skipped, unit="iteration")
    train_policy, train_value = policy, value_model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        train_policy, train_value = DDP(policy, device_ids=ids), DDP(value_model, device_ids=ids)
    log = MetricsLog(work_dir, d.is_main, cfg.logger, resume_step=step if plan.resume_from else None)
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id

    # ---- loop ----------------------------------------------------------------------------------------------
    with progress_bar(con) as bar:
        task = bar.add_task("ppo", total=t.max_steps, completed=step, metrics="")
        while step < t.max_steps:
            seed_everything(cfg.seed, step, d.rank)
            order = batches.step_indices(step, p.prompts_per_rollout, len(prompt_ids), cfg.seed)
            mine = batches.rank_slice(order, d.rank, d.world_size)

            # rollout: sample, then one forward pass per role (no pass computed twice)
            t0 = time.perf_counter()
            policy.eval()
            roll = rollout(policy, [prompt_ids[i] for i in mine], p.response_length, p.temperature,
                           t.rollout_micro_batch_size, pad_id, eos_id, device)
            with torch.inference_mode():
                roll["logprobs"] = response_logprobs(policy, roll, p.temperature, t.rollout_micro_batch_size)
                roll["ref_logprobs"] = response_logprobs(reference, roll, p.temperature,
                                                         t.rollout_micro_batch_size)
                roll["values"] = response_values(value_model, roll, t.rollout_micro_batch_size)
                raw = score_responses(reward_model, roll, tokenizer, reward_tokenizer, same_tokens,
                                      t.rollout_micro_batch_size, cfg.data.max_seq_len)
            # leave inference mode: the update reads these as ordinary constants
            roll = {k: v.clone() if torch.is_tensor(v) else v for k, v in roll.items()}
            raw = raw.clone()
            policy.train()
            rollout_seconds = time.perf_counter() - t0
            check_rollout(guard, step + 1, raw, roll, reward_path)

            # rewards and advantages
            mask = roll["mask"]
            scores = raw
            if p.normalize_scores:
                scores = rl.normalize_scores(scores, reward_model.score_stats["mean"], reward_model.score_stats["std"])
            if p.score_clip is not None:
                scores = scores.clamp(-p.score_clip, p.score_clip)
            scores = rl.apply_missing_eos_penalty(scores, roll["ended"], p.missing_eos_penalty)
            kl = rl.kl_per_token(roll["logprobs"], roll["ref_logprobs"], p.kl_estimator) * mask
            rewards = rl.per_token_rewards(scores, kl, mask, kl_coef)
            if p.whiten_rewards:
                rewards = rl.masked_whiten(rewards, mask, shift_mean=False)
            advantages, returns = rl.gae(rewards, roll["values"], mask, p.gamma, p.lam)
            advantages = rl.masked_whiten(advantages, mask)

            # update: num_ppo_epochs passes, num_mini_batches optimizer steps each
            t1 = time.perf_counter()
            stats = []
            for epoch in range(p.num_ppo_epochs):
                g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 101 + epoch)
                perm = torch.randperm(local_rollout, generator=g)
                for mb in range(p.num_mini_batches):
                    mb_idx = perm[mb * local_minibatch:(mb + 1) * local_minibatch]
                    mb_loss = torch.zeros((), device=device)
                    for k in range(grad_accum):
                        idx = mb_idx[k * t.micro_batch_size:(k + 1) * t.micro_batch_size]
                        sync = k == grad_accum - 1 or not d.enabled
                        with contextlib.ExitStack() as stack:
                            if not sync:
                                stack.enter_context(train_policy.no_sync())
                                stack.enter_context(train_value.no_sync())
                            stack.enter_context(dev.autocast(device))
                            loss, s = ppo_loss(train_policy, train_value, roll, idx, advantages, returns, p)
                            (loss / grad_accum).backward()
                        stats.append(s)
                        mb_loss += loss.detach() / grad_accum
                    mb_loss = dist.all_sum(d, [float(mb_loss)], device)[0] / d.world_size
                    optimizer_step(params, optimizer, scheduler, cfg.optim.max_grad_norm, guard, step + 1, mb_loss)
            update_seconds = time.perf_counter() - t1

            # metrics (over all ranks), KL controller, logs, samples, checkpoint
            step += 1
            seq_kl = (kl * mask).sum(1)
            gold = ([toy.gold_score(pr, rs) for pr, rs in zip(roll["prompt_text"], roll["response_text"])]
                    if cfg.data.path is None else None)
            n_tokens = float(mask.sum())
            sums = [float(len(mine)), float(raw.sum()), float(scores.sum()), float(seq_kl.sum()),
                    float((scores - kl_coef * seq_kl).sum()), float(mask.sum(1).sum()), float(roll["ended"].sum()),
                    float(sum(gold)) if gold else 0.0, n_tokens]
            n, raw_sum, score_sum, kl_sum, rlhf_sum, len_sum, ended_sum, gold_sum, tok_sum = dist.all_sum(
                d, sums, device)
            means = {k: float(torch.stack([s_[k] for s_ in stats]).mean()) for k in stats[0]}
            means = dict(zip(means, dist.all_sum(d, list(means.values()), device)))
            means = {k: v / d.world_size for k, v in means.items()}
            last = {"score": raw_sum / n, "score_penalised": score_sum / n, "kl": kl_sum / n,
                    "rlhf_reward": rlhf_sum / n, "response_length": len_sum / n, "stop_rate": ended_sum / n,
                    "kl_coef": kl_coef, **means,
                    "explained_variance": float(rl.explained_variance(roll["values"], returns, mask)),
                    "rollout_tokens_per_s": tok_sum / rollout_seconds,
                    "update_tokens_per_s": tok_sum * p.num_ppo_epochs / update_seconds,
                    "lr": scheduler.get_last_lr()[0], **({"skipped_steps": guard.skipped} if guard.skipped else {})}
            if gold:
                last["gold"] = gold_sum / n
            first = first or dict(last)
            if p.adaptive_kl:
                kl_coef = rl.adaptive_kl_update(kl_coef, last["kl"], p.kl_target, p.kl_horizon, p.prompts_per_rollout)
            if step % t.log_every == 0 or step == t.max_steps:
                log.log(step, last)
            if d.is_main and (step % t.sample_every == 0 or step == 1 or step == t.max_steps):
                write_samples(work_dir, step, roll, raw, gold)
            bar.update(task, completed=step, metrics=metrics_text(
                {"score": last["score"], "kl": last["kl"], **({"gold": last["gold"]} if gold else {}),
                 "len": last["response_length"], "approx_kl": last["approx_kl"], "clip": last["clipfrac"]}))
            if step % t.checkpoint_every == 0 or step == t.max_steps:
                if d.is_main:
                    checkpoint.save(plan.checkpoints, step, {"policy": policy, "value": value_model},
                                    optimizer, scheduler,
                                    {"step": step, "kl_coef": kl_coef, "first": first, "last": last,
                                     "skipped_steps": guard.skipped, "config": to_dict(cfg),
                                     "data_sha256": data_sha256}, t.keep_checkpoints, cfg.artifact_check)
                dist.barrier(d)
    log.close()

    # ---- save: the policy artifact and a summary -----------------------------------------------------------
    metrics = {"iterations": step, "skipped_steps": guard.skipped, **{f"final_{k}": v for k, v in last.items()},
               **{f"first_{k}": first[k] for k in ("score", "kl", "gold", "response_length", "stop_rate")
                  if first and k in first}}
    if d.is_main:
        parents = [x for x in (sft_parent, reward_parent) if x]
        manifest = artifacts.build_manifest(
            stage="ppo", kind="policy", config=to_dict(cfg), base_model=policy_path, tokenizer=tokenizer,
            metrics=metrics, parents=parents,
            extra={"ppo": {"reward_model": reward_path, "same_tokenizer_as_reward": same_tokens,
                           "final_kl_coef": kl_coef},
                   "data": {"source": str(source), "sha256": data_sha256, "prompts": len(prompts)}})

        def save(tmp: Path) -> None:
            policy.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)

        artifacts.publish(work_dir, save, manifest, run_dir)
        _show_summary(con, first or {}, last, run_dir)
    dist.barrier(d)
    return metrics


# ---- the pieces of an iteration ---------------------------------------------------------------------------------

def seed_everything(seed: int, step: int, rank: int) -> None:
    """Every iteration's randomness (sampling) is a function of (seed, iteration, rank): resumable exactly."""
    s = seed * 1_000_003 + step * 7919 + rank
    torch.manual_seed(s)
    random.seed(s)


def ppo_loss(policy, value_model, roll: dict, idx, advantages, returns, p) -> tuple[torch.Tensor, dict]:
    """L = L_clip(policy) + vf_coef * L_clip(value) - entropy_coef * entropy, on micro-batch rows `idx`."""
    mask = roll["mask"][idx]
    logits = policy_logits(policy, roll, idx)
    logp = rl.logprobs_from_logits(logits, roll["response"][idx], p.temperature)
    pg_loss, pg = rl.policy_loss(logp, roll["logprobs"][idx], advantages[idx], mask, p.cliprange)
    values = value_slice(value_model, roll, idx)
    vf_loss, vf = rl.value_loss(values, roll["values"][idx], returns[idx], mask, p.cliprange_value)
    entropy = rl.masked_mean(rl.entropy_from_logits(logits / p.temperature), mask)
    loss = pg_loss + p.vf_coef * vf_loss - p.entropy_coef * entropy
    return loss, {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(), "entropy": entropy.detach(),
                  "approx_kl": pg["approx_kl"].detach(), "clipfrac": pg["clipfrac"].detach(),
                  "vf_clipfrac": vf["vf_clipfrac"].detach()}


def load_prompts(cfg: PPOConfig, tokenizer) -> tuple[list[str], str]:
    """Training prompts: the built-in task's train prompts, or the prompts of a file / hub dataset."""
    if cfg.data.path is None:
        return [r["prompt"] for r in toy.prompt_rows(cfg.data.toy.num_train, cfg.data.toy.seed, "train")], \
            "built-in task"
    rows, source = load_rows(cfg.data.path, cfg.data.split, cfg.data.max_rows)
    return prompt_texts(rows, source, tokenizer), source


def _same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id and a.pad_token_id == b.pad_token_id


def check_rollout(guard: Guard, iteration: int, scores: torch.Tensor, roll: dict, reward_path: str) -> None:
    """Stop before a non-finite score, log-prob or value turns into rewards, advantages and an update."""
    guard.require_finite(iteration, "reward model's score", scores,
                         hint=f"the reward model ({reward_path}) gives NaN/inf scores for these responses: check it, or "
                              f"re-train it (`rlhf reward ... overwrite=true`)")
    guard.require_finite(iteration, "reference log-prob", roll["ref_logprobs"],
                         hint="the reference (the SFT policy) gives non-finite log-probs: check the SFT artifact")
    guard.require_finite(iteration, "policy log-prob (and so the KL)", roll["logprobs"])
    guard.require_finite(iteration, "value model's estimate", roll["values"])


def write_samples(run_dir: Path, step: int, roll: dict, scores: torch.Tensor, gold: list[float] | None,
                  k: int = 4) -> None:
    rows = []
    for i in range(min(k, len(roll["response_text"]))):
        row = {"step": step, "prompt": roll["prompt_text"][i], "response": roll["response_text"][i],
               "score": float(scores[i])}
        if gold:
            row["gold"] = gold[i]
        rows.append(row)
    append_jsonl(run_dir / "samples.jsonl", rows)


def _show_summary(con, first: dict, last: dict, run_dir: Path) -> None:
    from rich.table import Table

    table = Table(title="ppo summary (training rollouts)", title_justify="left")
    for col in ("metric", "first iteration", "last iteration"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    for key in ("score", "gold", "kl", "rlhf_reward", "response_length", "stop_rate", "entropy", "approx_kl",
                "clipfrac", "value_loss", "explained_variance", "rollout_tokens_per_s", "update_tokens_per_s"):
        if key in last:
            table.add_row(key, f"{first.get(key, float('nan')):.4g}", f"{last[key]:.4g}")
    con.print(table)
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()[-4:]]
    if samples:
        shown = Table(title=f"samples (iteration {samples[-1]['step']})", title_justify="left")
        for col in ("prompt", "response", "score", *(["gold"] if "gold" in samples[0] else [])):
            shown.add_column(col, justify="right" if col in ("score", "gold") else "left")
        for row in samples:
            cells = [row["prompt"][-60:], row["response"][:80], f"{row['score']:.3g}"]
            shown.add_row(*cells, *([f"{row['gold']:.3g}"] if "gold" in row else []))
        con.print(shown)
    con.print(summary_table("artifact", {"policy": str(run_dir / "model"), "samples": str(run_dir / "samples.jsonl")}))
