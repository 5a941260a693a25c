"""`rlhf sft`: fine-tune a pretrained causal LM on demonstrations (stage 1 of InstructGPT).

`run` reads top to bottom: set up (run directory, data, model, optimizer, resume), loop (`train_step`: one
optimizer step over micro-batches; `held_out_loss` at the evaluation cadence; logs and checkpoints when due), save
(samples, the policy artifact, a summary).

Loss: mean next-token cross-entropy over the supervised tokens of the whole optimizer step (completion tokens
only, unless train.completion_only=false), however the step is split into micro-batches and processes, so the
result does not depend on the world size.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.table import Table

from rlhf_cli import artifacts
from rlhf_cli.config.schemas import SFTConfig
from rlhf_cli.data import tasks
from rlhf_cli.data.sft import collate_sft, tokenize_sft
from rlhf_cli.data.text import render
from rlhf_cli.engine import batches, device as dev, dist, rundir, train
from rlhf_cli.engine.guard import Guard
from rlhf_cli.engine.logging import charts_row, console, metrics_text, progress_bar, summary_table
from rlhf_cli.errors import DataError
from rlhf_cli.models import lora
from rlhf_cli.models.loading import load_causal_lm, logits_at, packing_refusal
from rlhf_cli.rl import ppo as rl


def run(cfg: SFTConfig) -> dict:
    with train.process(cfg.train.device, cfg.train.precision, cfg.train.strategy) as (d, device):
        con, t = console(d.is_main), cfg.train
        # ---- set up: run directory, seeds, data rows (validated before anything heavy loads), model, tokens -----
        plan = rundir.prepare(cfg, d)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed + d.rank)
        train_rows, eval_rows, source = tasks.sft_rows(cfg.data, cfg.seed)
        data_sha256 = rundir.check_data(plan, cfg, d, train_rows, eval_rows)
        model, tokenizer, model_info = load_model(cfg, d, device)
        train_set, eval_set, truncated = tokenize(cfg, train_rows, eval_rows, tokenizer, source)
        steps = batches.step_plan(t, len(train_set), d.world_size)
        show_plan(con, cfg, model, model_info, device, f"data {source}: {len(train_set)} train / {len(eval_set)} "
                  f"held-out rows, {truncated[0]} truncated to {cfg.data.max_seq_len} tokens",
                  steps.describe(t, d.world_size))
        train_model = train.wrap_for_training(model, d, device, t)
        training = train.start(plan, cfg, {"model": model}, steps.total, d, restore_rng=d.is_main)
        loop = Counters.restore(training.resumed)
        pad_id = tokenizer.pad_token_id
        if loop.first_eval_loss is None and eval_set:
            loop.first_eval_loss = loop.eval_loss = held_out_loss(model, eval_set, pad_id, training.guard, 0, cfg, d,
                                                                  device)

        # ---- loop: one optimizer step over examples_per_step examples, evaluation, logs, checkpoints ----------
        tokens_seen, t_start = 0.0, time.perf_counter()
        with progress_bar(con, t.log_every) as bar:
            task = bar.add_task("sft", total=steps.total, completed=loop.step, metrics="")
            while loop.step < steps.total:
                t0 = time.perf_counter()
                examples = batches.step_examples(train_set, loop.step, t.examples_per_step, cfg.seed)
                loss, grad_norm, n_in = train_step(train_model, examples, pad_id, training, loop.step, cfg, d,
                                                   device)
                loop.step += 1
                tokens_seen += n_in
                loop.last = {"loss": loss, "grad_norm": grad_norm, "tokens_per_s": n_in / (time.perf_counter() - t0),
                             **training.step_metrics()}
                if eval_set and train.due(loop.step, t.eval_every, steps.total):
                    loop.eval_loss = loop.last["eval_loss"] = held_out_loss(model, eval_set, pad_id, training.guard,
                                                                            loop.step, cfg, d, device)
                if train.due(loop.step, t.log_every, steps.total) or "eval_loss" in loop.last:
                    training.log.log(loop.step, loop.last)
                bar.update(task, completed=loop.step, metrics=metrics_text(
                    {"loss": loss, "eval": loop.eval_loss, "lr": loop.last["lr"], "tok/s": loop.last["tokens_per_s"]}))
                if train.due(loop.step, t.checkpoint_every, steps.total):
                    train.save_checkpoint(d, plan.checkpoints, loop.step, {"model": model}, training, loop.state(),
                                          cfg, data_sha256, final=loop.step == steps.total)
        wall = time.perf_counter() - t_start

        # ---- save: samples, the artifact, a summary -----------------------------------------------------------
        metrics = final_metrics(loop, training.guard, tokens_seen, wall, len(train_set), sum(truncated))
        samples = sample_responses(model, tokenizer, cfg, eval_rows, device)  # every rank (FSDP gathers together)
        if (published := train.published(model, d)) is not None:             # the full weights, on rank 0 only
            publish(cfg, published, tokenizer, samples, metrics, {
                "source": str(source), "sha256": data_sha256, "train_rows": len(train_set),
                "eval_rows": len(eval_set), "truncated": truncated[0],
                "added_pad_token": model_info["added_pad_token"]}, plan.work_dir)
            pngs = train.record_end(training, "sft", Path(cfg.run_dir), metrics, "policy")
            show_summary(con, metrics, samples, cfg.train.num_samples, Path(cfg.run_dir), wall, pngs)
        dist.barrier(d)
        return metrics


# ---- set up -----------------------------------------------------------------------------------------------------

def load_model(cfg: SFTConfig, d: dist.Dist, device) -> tuple:
    """(model in training mode, with LoRA adapters when model.lora.r > 0, its tokenizer, load facts)."""
    model, tokenizer, info = train.main_first(d, load_causal_lm, cfg.model, train.load_device(device, cfg.train))
    info["packing"] = batches.decide_packing(cfg.data, lambda: packing_refusal(model, cfg.model.name_or_path))
    lora.add_adapters(model, cfg.model.lora, cfg.seed)
    model.train()
    return model, tokenizer, info


def tokenize(cfg: SFTConfig, train_rows: list[dict], eval_rows: list[dict], tokenizer, source) -> tuple:
    """(train examples, held-out examples, (train rows truncated, held-out rows truncated)); a DataError when
    nothing is left to supervise."""
    train_set, train_stats = tokenize_sft(train_rows, tokenizer, cfg.data.max_seq_len, cfg.train.completion_only,
                                         source=source)
    eval_set, eval_stats = tokenize_sft(eval_rows, tokenizer, cfg.data.max_seq_len, cfg.train.completion_only,
                                       source=f"{source} (held-out rows)")
    if train_stats["completion_tokens"] == 0:
        raise DataError(f"{source}: no supervised tokens after tokenization",
                        hint="check data.max_seq_len and that completions are not empty")
    return train_set, eval_set, (train_stats["truncated"], eval_stats["truncated"])


def show_plan(con, cfg: SFTConfig, model, model_info: dict, device, data: str, batch: str) -> None:
    con.print(f"[bold]rlhf sft[/bold] -> {cfg.run_dir}")
    con.print(f"model {model_info['path']} ({lora.describe(model)}) on {device}, {dev.precision(device)}; {data}")
    con.print(f"{batch}; {model_info['packing']}")


@dataclass
class Counters:
    """What the loop carries from one step to the next (and a checkpoint carries across a resume)."""
    step: int = 0                          # optimizer steps done
    first_eval_loss: float | None = None   # held-out loss before training
    eval_loss: float | None = None         # the latest held-out loss
    last: dict = field(default_factory=dict)

    @classmethod
    def restore(cls, state: dict) -> "Counters":
        """From a checkpoint's state ({} for a fresh run)."""
        return cls(state.get("step", 0), state.get("first_eval_loss"), state.get("eval_loss"), state.get("last", {}))

    def state(self) -> dict:
        return {"first_eval_loss": self.first_eval_loss, "eval_loss": self.eval_loss, "last": self.last}


# ---- the loop ---------------------------------------------------------------------------------------------------

def train_step(train_model, examples: list[dict], pad_id: int, training: train.Training, step: int, cfg: SFTConfig,
               d: dist.Dist, device) -> tuple[float, float | None, float]:
    """One optimizer step on this step's examples (this rank's share, in micro-batches): (loss = mean over the
    step's supervised tokens on all ranks, gradient norm (None when skipped), input tokens on all ranks). The
    micro-batches queue their work without waiting for the device: one sync per step, for the loss."""
    n_sup = sum(sum(1 for x in ex["labels"][1:] if x != -100) for ex in examples)
    loss_sum, n_in = torch.zeros((), device=device), 0
    for micro, last in train.micro_batches(batches.rank_slice(examples, d.rank, d.world_size),
                                           batches.micro_batch(cfg.train, d.world_size)):
        batch = collate_sft(micro, pad_id, cfg.data.packing)
        n_in += sum(len(ex["input_ids"]) for ex in micro)
        with train.micro_step([train_model], last, device):
            s = token_loss_sum(train_model, batches.to_device(batch, device), supervised_positions(batch))
            # DDP averages gradients over ranks: scale so the total is the mean over the global step
            (s * d.world_size / max(n_sup, 1)).backward()
        loss_sum += s.detach()
    loss_sum, n_in = dist.all_sum(d, [float(loss_sum), float(n_in)], device)
    loss = loss_sum / max(n_sup, 1)
    return loss, train.take_step(training, step + 1, loss), n_in


def held_out_loss(model, eval_set: list[dict], pad_id: int, guard: Guard, step: int, cfg: SFTConfig, d: dist.Dist,
                  device) -> float:
    """Mean next-token cross-entropy over the supervised tokens of the held-out examples, all ranks; the stage
    stops (DivergedError) when it is not finite."""
    micro = cfg.train.micro_batch_size
    model.eval()
    loss_sum, n_tok = torch.zeros((), device=device), 0.0
    with torch.no_grad(), dev.autocast(device):
        for part, real in batches.rank_micro_batches(eval_set, d.rank, d.world_size, micro):
            batch = collate_sft(part, pad_id, cfg.data.packing)
            s = token_loss_sum(model, batches.to_device(batch, device), supervised_positions(batch))
            if real:
                loss_sum += s
                n_tok += int((batch["labels"][:, 1:] != -100).sum())
    loss_sum, n_tok = dist.all_sum(d, [float(loss_sum), n_tok], device)
    model.train()
    loss = loss_sum / max(n_tok, 1.0)
    guard.require_finite(step, "held-out loss", loss, hint=None if step else "the model gives non-finite outputs "
                         "before any training: check model.name_or_path")
    return loss


def supervised_positions(batch: dict) -> torch.Tensor:
    """The positions whose logits predict a supervised token in some row (labels[:, i + 1] != -100), from the
    batch as collated on the host: computing them costs no device sync."""
    return torch.nonzero((batch["labels"][:, 1:] != -100).any(0)).squeeze(-1)


def token_loss_sum(model, batch: dict, positions: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over the supervised targets (labels[:, 1:] != -100): the LM head runs only
    at `positions` (supervised_positions: a prompt's logits are never computed) and log-probs are upcast to fp32
    a few rows at a time (rl.ppo.logprobs_from_logits), never the whole [B, L, V] tensor."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    positions = positions.to(batch["input_ids"].device)
    logits = logits_at(model, positions, **inputs)
    targets = batch["labels"][:, positions + 1]
    logp = rl.logprobs_from_logits(logits, targets.clamp_min(0), 1.0)
    return -torch.where(targets != -100, logp, torch.zeros((), device=logp.device, dtype=logp.dtype)).sum()


@torch.no_grad()
def sample_responses(model, tokenizer, cfg: SFTConfig, eval_rows: list[dict], device) -> list[dict]:
    """Sample (temperature 1, no top-k/top-p) for up to 64 held-out prompts; gold scores on the built-in task.
    Every rank samples the same (a sharded model decodes on all of them together); rank 0 keeps them."""
    prompts = [render(r, tokenizer)[0] for r in eval_rows[:64]]
    if not prompts or cfg.train.num_samples <= 0:
        return []
    model.eval()
    torch.manual_seed(cfg.seed)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    tokenizer.padding_side = side
    with train.generating(model):
        out = model.generate(**enc, max_new_tokens=cfg.train.sample_max_new_tokens, do_sample=True,
                             temperature=1.0, top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    responses = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    gold = tasks.gold_scorer(cfg.data)
    model.train()
    return [{"prompt": prompt, "response": response, **({"gold": gold(prompt, response)} if gold else {})}
            for prompt, response in zip(prompts, responses)]


def final_metrics(loop: Counters, guard: Guard, tokens_seen: float, wall: float, train_rows: int,
                  truncated_rows: int) -> dict:
    return {"steps": loop.step, "train_loss": loop.last.get("loss"), "eval_loss_start": loop.first_eval_loss,
            "eval_loss": loop.eval_loss, "tokens_per_s": tokens_seen / wall if wall > 0 and tokens_seen else None,
            "train_rows": train_rows, "truncated_rows": truncated_rows, "skipped_steps": guard.skipped}


def publish(cfg: SFTConfig, model, tokenizer, samples: list[dict], metrics: dict, data: dict, work_dir: Path) -> None:
    """samples.jsonl, then the policy artifact (the built-in task adds the samples' mean gold score to metrics);
    with LoRA, model/ holds the adapters merged into the base and adapter/ the adapters alone."""
    if tasks.gold_scorer(cfg.data):
        metrics["gold_score"] = sum(s["gold"] for s in samples) / len(samples) if samples else None
    artifacts.write_text_atomic(work_dir / "samples.jsonl", "".join(artifacts.dumps(s) + "\n" for s in samples))
    manifest = artifacts.build_manifest(stage="sft", kind="policy", config=asdict(cfg),
                                        base_model=cfg.model.name_or_path, tokenizer=tokenizer, metrics=metrics,
                                        extra={"data": data})

    def save(tmp: Path) -> None:  # with LoRA: the adapters merged into the base, a plain causal LM
        lora.merged(model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    artifacts.publish(work_dir, save, manifest, Path(cfg.run_dir), save_adapter=lora.adapter_writer(model))


def show_summary(con, metrics: dict, samples: list[dict], num_shown: int, run_dir: Path, wall: float,
                 pngs: list[Path]) -> None:
    shown = {k: v for k, v in metrics.items() if v is not None}
    shown["wall_seconds"] = wall
    shown["artifact"] = str(run_dir / "model")
    con.print(summary_table("sft summary", {**shown, **charts_row(pngs, run_dir)}))
    if samples:
        table = Table(title="samples (held-out prompts)", title_justify="left")
        table.add_column("prompt", overflow="fold")
        table.add_column("response", overflow="fold")
        if "gold" in samples[0]:
            table.add_column("gold", justify="right")
        for s in samples[:num_shown]:
            cells = [s["prompt"][-80:], s["response"][:120]]
            if "gold" in s:
                cells.append(f"{s['gold']:.2f}")
            table.add_row(*cells)
        con.print(table)
