"""`rlhf sft`: fine-tune a pretrained causal LM on demonstrations (stage 1 of InstructGPT).

Reads top to bottom: set up (run directory, device, model, data, optimizer, resume), loop (gradient accumulation,
clipping, periodic held-out evaluation and checkpoints), save (samples, the policy artifact, a summary).

Loss: mean next-token cross-entropy over the supervised tokens of the whole optimizer step (completion tokens
only, unless train.completion_only=false), however the step is split into micro-batches and processes, so the
result does not depend on the world size.
"""

from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.table import Table

from rlhf_cli import artifacts
from rlhf_cli.config import SFTConfig, to_dict
from rlhf_cli.data import toy
from rlhf_cli.data.loading import load_rows
from rlhf_cli.data.sft import collate_sft, normalize_sft_rows, render, tokenize_sft
from rlhf_cli.data.splits import holdout
from rlhf_cli.engine import batches, checkpoint, device as dev, dist, rundir
from rlhf_cli.engine.guard import Guard
from rlhf_cli.engine.logging import MetricsLog, console, metrics_text, progress_bar, summary_table
from rlhf_cli.engine.optim import apply_hyperparameters, build_optimizer, build_scheduler, optimizer_step
from rlhf_cli.errors import DataError
from rlhf_cli.models.loading import load_causal_lm


def run(cfg: SFTConfig) -> dict:
    device = dev.pick(cfg.train.device, dist.local_rank_from_env())
    d = dist.init(device.type)
    try:
        return _run(cfg, d, device)
    finally:
        dist.close()


def _run(cfg: SFTConfig, d: dist.Dist, device: torch.device) -> dict:
    con = console(d.is_main)
    run_dir = Path(cfg.run_dir)

    # ---- set up: the run directory (refused, resumed, replaced or fresh), seeds ----------------------------
    plan = rundir.prepare(cfg, d)
    work_dir, ckpt_dir = plan.work_dir, plan.checkpoints
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed + d.rank)

    # ---- data rows (validated before anything heavy loads), then model and tokens --------------------------
    train_rows, eval_rows, source = load_sft_rows(cfg)
    data_sha256 = rundir.fingerprint(train_rows, eval_rows)
    rundir.check_data(plan, cfg, data_sha256, d)
    if d.is_main:  # rank 0 builds/caches the built-in model first; the others then load it
        model, tokenizer, model_info = load_causal_lm(cfg.model, device)
    dist.barrier(d)
    if not d.is_main:
        model, tokenizer, model_info = load_causal_lm(cfg.model, device)
    train_set, train_stats = tokenize_sft(train_rows, tokenizer, cfg.data.max_seq_len, cfg.train.completion_only,
                                         source=source)
    eval_set, eval_stats = tokenize_sft(eval_rows, tokenizer, cfg.data.max_seq_len, cfg.train.completion_only,
                                       source=f"{source} (held-out rows)")
    if train_stats["completion_tokens"] == 0:
        raise DataError(f"{source}: no supervised tokens after tokenization",
                        hint="check data.max_seq_len and that completions are not empty")

    # ---- batch arithmetic ----------------------------------------------------------------------------------
    t = cfg.train
    grad_accum = batches.grad_accum_steps(t.examples_per_step, t.micro_batch_size, d.world_size)
    total_steps, steps_per_epoch = batches.total_steps(t, len(train_set))
    con.print(f"[bold]rlhf sft[/bold] -> {run_dir}")
    con.print(f"model {model_info['path']} ({model_info['parameters'] / 1e6:.2f}M parameters) on {device}, "
              f"{dev.precision(device)}; data {source}: {len(train_set)} train / {len(eval_set)} held-out rows, "
              f"{train_stats['truncated']} truncated to {cfg.data.max_seq_len} tokens")
    con.print(f"batch: examples_per_step {t.examples_per_step} = micro_batch_size {t.micro_batch_size} x "
              f"grad_accum_steps {grad_accum} x world_size {d.world_size}; {total_steps} steps = "
              f"{total_steps / steps_per_epoch:.2f} epochs of {steps_per_epoch} steps")

    # ---- optimizer, DDP, resume ----------------------------------------------------------------------------
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    step, first_eval, last, eval_loss, skipped = 0, None, {}, None, 0
    if plan.resume_from is not None:
        state = checkpoint.load(plan.resume_from, {"model": model}, optimizer, scheduler, restore_rng=d.is_main)
        apply_hyperparameters(optimizer, scheduler, cfg.optim)
        step, first_eval = state["step"], state.get("first_eval_loss")
        last, eval_loss, skipped = state.get("last", {}), state.get("eval_loss"), state.get("skipped_steps", 0)
        con.print(f"resumed from {plan.resume_from} (step {step})")
    guard = Guard("sft", ckpt_dir, cfg.optim.lr, t.max_skipped_steps, skipped)
    train_model = model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    log = MetricsLog(work_dir, d.is_main, cfg.logger, resume_step=step if plan.resume_from else None)
    pad_id = tokenizer.pad_token_id

    def evaluate() -> float:
        model.eval()
        loss_sum, n_tok = 0.0, 0.0
        with torch.no_grad(), dev.autocast(device):
            mine = eval_set[d.rank::d.world_size]
            for i in range(0, len(mine), t.micro_batch_size):
                batch = batches.to_device(collate_sft(mine[i:i + t.micro_batch_size], pad_id), device)
                s, n = token_loss_sum(model, batch)
                loss_sum, n_tok = loss_sum + s.item(), n_tok + n
        loss_sum, n_tok = dist.all_sum(d, [loss_sum, n_tok], device)
        model.train()
        return loss_sum / max(n_tok, 1.0)

    if first_eval is None and eval_set:
        first_eval = evaluate()
        guard.require_finite(0, "held-out loss", first_eval, hint="the model gives non-finite outputs before any "
                             "training: check model.name_or_path")
    eval_loss = first_eval if eval_loss is None else eval_loss
    model.train()

    # ---- loop ----------------------------------------------------------------------------------------------
    tokens_seen, t_start = 0.0, time.perf_counter()
    with progress_bar(con) as bar:
        task = bar.add_task("sft", total=total_steps, completed=step, metrics="")
        while step < total_steps:
            t0 = time.perf_counter()
            batch_ids = batches.step_indices(step, t.examples_per_step, len(train_set), cfg.seed)
            examples = [train_set[i] for i in batch_ids]
            n_sup = sum(sum(1 for x in ex["labels"][1:] if x != -100) for ex in examples)
            mine = batches.rank_slice(examples, d.rank, d.world_size)
            loss_total, n_in = 0.0, 0
            for k in range(grad_accum):
                batch = batches.to_device(collate_sft(mine[k * t.micro_batch_size:(k + 1) * t.micro_batch_size], pad_id), device)
                sync = k == grad_accum - 1 or not d.enabled
                with (contextlib.nullcontext() if sync else train_model.no_sync()), dev.autocast(device):
                    s, _ = token_loss_sum(train_model, batch)
                    # DDP averages gradients over ranks: scale so the total is the mean over the global step
                    (s * d.world_size / max(n_sup, 1)).backward()
                loss_total += s.item()
                n_in += int(batch["attention_mask"].sum())
            loss_total, n_in = dist.all_sum(d, [loss_total, float(n_in)], device)
            grad_norm = optimizer_step(model.parameters(), optimizer, scheduler, cfg.optim.max_grad_norm, guard,
                                       step + 1, loss_total / max(n_sup, 1))
            step += 1
            dt = time.perf_counter() - t0
            tokens_seen += n_in
            last = {"loss": loss_total / max(n_sup, 1), "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                    "tokens_per_s": n_in / dt, **({"skipped_steps": guard.skipped} if guard.skipped else {})}
            if eval_set and (step % t.eval_every == 0 or step == total_steps):
                eval_loss = last["eval_loss"] = evaluate()
                guard.require_finite(step, "held-out loss", eval_loss)
            if step % t.log_every == 0 or "eval_loss" in last or step == total_steps:
                log.log(step, last)
            bar.update(task, completed=step, metrics=metrics_text(
                {"loss": last["loss"], "eval": eval_loss, "lr": last["lr"], "tok/s": last["tokens_per_s"]}))
            if step % t.checkpoint_every == 0 or step == total_steps:
                if d.is_main:
                    checkpoint.save(ckpt_dir, step, {"model": model}, optimizer, scheduler,
                                    {"step": step, "first_eval_loss": first_eval, "eval_loss": eval_loss, "last": last,
                                     "skipped_steps": guard.skipped, "config": to_dict(cfg),
                                     "data_sha256": data_sha256}, t.keep_checkpoints, cfg.artifact_check)
                dist.barrier(d)
    wall = time.perf_counter() - t_start
    log.close()

    # ---- save: samples, the artifact, a summary ------------------------------------------------------------
    metrics = {"steps": step, "train_loss": last.get("loss"), "eval_loss_start": first_eval, "eval_loss": eval_loss,
               "tokens_per_s": tokens_seen / wall if wall > 0 and tokens_seen else None,
               "train_rows": len(train_set), "truncated_rows": train_stats["truncated"] + eval_stats["truncated"],
               "skipped_steps": guard.skipped}
    if d.is_main:
        samples = sample_responses(model, tokenizer, cfg, eval_rows, device)
        if cfg.data.path is None:
            metrics["gold_score"] = sum(s["gold"] for s in samples) / len(samples) if samples else None
        artifacts.write_text_atomic(work_dir / "samples.jsonl", "".join(artifacts.dumps(s) + "\n" for s in samples))
        manifest = artifacts.build_manifest(
            stage="sft", kind="policy", config=to_dict(cfg), base_model=cfg.model.name_or_path,
            tokenizer=tokenizer, metrics=metrics,
            extra={"data": {"source": str(source), "sha256": data_sha256, "train_rows": len(train_set),
                            "eval_rows": len(eval_set), "truncated": train_stats["truncated"],
                            "added_pad_token": model_info["added_pad_token"]}})

        def save(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)

        artifacts.publish(work_dir, save, manifest, run_dir)
        _show_summary(con, metrics, samples, cfg.train.num_samples, run_dir, wall)
    dist.barrier(d)
    return metrics


# ---- helpers: small and pure where they can be -----------------------------------------------------------------

def load_sft_rows(cfg: SFTConfig) -> tuple[list[dict], list[dict], str]:
    """Train and held-out rows: the built-in task, or a file / hub dataset split by data.eval_fraction."""
    data = cfg.data
    if data.path is None:
        return (toy.sft_rows(data.toy.num_train, data.toy.seed, "train"),
                toy.sft_rows(data.toy.num_eval, data.toy.seed, "eval"), "built-in task")
    rows, source = load_rows(data.path, data.split, data.max_rows)
    rows = normalize_sft_rows(rows, source, data.format)
    if data.eval_path:
        eval_rows, eval_source = load_rows(data.eval_path, data.split)
        return rows, normalize_sft_rows(eval_rows, eval_source, data.format), source
    train, held = holdout(rows, data.eval_fraction, data.max_eval_rows, cfg.seed)
    return train, held, source


def token_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over supervised positions (labels != -100), and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())


@torch.no_grad()
def sample_responses(model, tokenizer, cfg: SFTConfig, eval_rows: list[dict], device) -> list[dict]:
    """Sample (temperature 1, no top-k/top-p) for up to 64 held-out prompts; gold scores on the built-in task."""
    prompts = [render(r, tokenizer)[0] for r in eval_rows[:64]]
    if not prompts or cfg.train.num_samples <= 0:
        return []
    model.eval()
    torch.manual_seed(cfg.seed)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    tokenizer.padding_side = side
    out = model.generate(**enc, max_new_tokens=cfg.train.sample_max_new_tokens, do_sample=True, temperature=1.0,
                         top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    responses = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    rows = []
    for prompt, response in zip(prompts, responses):
        row = {"prompt": prompt, "response": response}
        if cfg.data.path is None:
            row["gold"] = toy.gold_score(prompt, response)
        rows.append(row)
    model.train()
    return rows


def _show_summary(con, metrics: dict, samples: list[dict], num_shown: int, run_dir: Path, wall: float) -> None:
    shown = {k: v for k, v in metrics.items() if v is not None}
    shown["wall_seconds"] = wall
    shown["artifact"] = str(run_dir / "model")
    con.print(summary_table("sft summary", shown))
    if samples:
        table = Table(title="samples (held-out prompts)", title_justify="left")
        table.add_column("prompt")
        table.add_column("response")
        if "gold" in samples[0]:
            table.add_column("gold", justify="right")
        for s in samples[:num_shown]:
            cells = [s["prompt"][-80:], s["response"][:120]]
            if "gold" in s:
                cells.append(f"{s['gold']:.2f}")
            table.add_row(*cells)
        con.print(table)
