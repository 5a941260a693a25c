"""`rlhf dpo`: Direct Preference Optimisation of the SFT policy on ranked pairs (Rafailov et al. 2023).

`run` reads top to bottom: set up (the SFT artifact as policy and reference, run directory, pairs, the
reference's log-probs of every pair computed once when dpo.precompute_reference, optimizer, resume), loop
(`train_step`: chosen and rejected through the policy in one forward pass, the loss of dpo.loss over
micro-batches, one optimizer step; `held_out` when due: the held-out pairs, and the KL to the reference and the
gold score of responses sampled on held-out prompts; logs and checkpoints), save (the policy artifact, a summary
with warnings).

Per pair, with log-probs summed over the response tokens (rl.ppo.sequence_logprobs):
    h = (log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))
    loss = LOSSES[dpo.loss](h, β, ε) + nll_coef · NLL(y_c) per token          (rl/dpo.py)
    implicit rewards r = β (log π − log π_ref): accuracy = share of r_c > r_r, margin = r_c − r_r
averaged over the pairs of the whole optimizer step however it is split into micro-batches and processes. Dropout
is off (as in TRL's DPOTrainer): the same pair gives the same log-probs in training and evaluation.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rlhf_cli import artifacts
from rlhf_cli.config import DPOConfig, ModelConfig
from rlhf_cli.data import tasks
from rlhf_cli.data.preference import collate_pairs, render_pair, tokenize_pairs
from rlhf_cli.data.prompts import encode_prompts
from rlhf_cli.engine import batches, device as dev, dist, rundir, train
from rlhf_cli.engine.logging import charts_row, console, metrics_text, progress_bar, summary_table
from rlhf_cli.engine.rollout import decode, response_logprobs, sample
from rlhf_cli.models import lora
from rlhf_cli.models.loading import check_source, load_causal_lm, load_frozen_lm, logits_at, packing_refusal
from rlhf_cli.rl import dpo as rl_dpo, ppo as rl


def run(cfg: DPOConfig) -> dict:
    with train.process(cfg.train.device, cfg.train.precision, cfg.train.strategy) as (d, device):
        con, t, p = console(d.is_main), cfg.train, cfg.dpo
        # ---- set up: upstream artifacts, run directory, pairs (validated before anything heavy loads) ----------
        paths = find_upstream(cfg)
        plan = rundir.prepare(cfg, d)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        train_rows, eval_rows, source, data_stats = tasks.preference_pairs(cfg.data, cfg.seed)
        data_sha256 = rundir.check_data(plan, cfg, d, train_rows, eval_rows)
        policy, tokenizer, packing = load_policy(cfg, paths, d, device)
        train_set, eval_set, truncated = tokenize(cfg, train_rows, eval_rows, tokenizer, source)
        prompts = held_out_prompts(cfg, eval_rows, tokenizer)
        reference = Reference(cfg, paths.reference, policy, device, d).prepared(train_set + eval_set,
                                                                                 tokenizer.pad_token_id)
        steps = batches.step_plan(t, len(train_set), d.world_size)
        show_plan(con, cfg, paths, policy, reference, device, f"data {source}: {len(train_set)} train / "
                  f"{len(eval_set)} held-out pairs, {truncated} truncated to {cfg.data.max_seq_len} tokens",
                  f"{steps.describe(t, d.world_size, ' pairs')}; {packing}")
        train_policy = train.wrap_for_training(policy, d, device, t)
        training = train.start(plan, cfg, {"policy": policy}, steps.total, d, restore_rng=d.is_main)
        loop = Counters.restore(training.resumed)
        if loop.start is None:  # the diagnostics before training, the baseline of the summary's warnings
            loop.start = loop.held = held_out(policy, reference, eval_set, prompts, tokenizer, cfg, 0, d, device)

        # ---- loop: one optimizer step over examples_per_step pairs, held-out diagnostics, logs, checkpoints ---
        tokens_seen, t_start = 0.0, time.perf_counter()
        with progress_bar(con, t.log_every) as bar:
            task = bar.add_task("dpo", total=steps.total, completed=loop.step, metrics="")
            while loop.step < steps.total:
                t0 = time.perf_counter()
                examples = batches.step_examples(train_set, loop.step, t.examples_per_step, cfg.seed)
                step_metrics, n_tokens = train_step(train_policy, reference, examples, tokenizer.pad_token_id,
                                                    training, loop.step, cfg, d, device)
                loop.step += 1
                tokens_seen += n_tokens
                loop.last = {**step_metrics, "tokens_per_s": n_tokens / (time.perf_counter() - t0),
                             **training.step_metrics()}
                if train.due(loop.step, t.eval_every, steps.total):
                    loop.held = held_out(policy, reference, eval_set, prompts, tokenizer, cfg, loop.step, d, device)
                    training.guard.require_finite(loop.step, "held-out loss", loop.held.get("loss", 0.0))
                    loop.last.update(diagnostics(loop.held))
                if train.due(loop.step, t.log_every, steps.total) or train.due(loop.step, t.eval_every, steps.total):
                    training.log.log(loop.step, loop.last)
                bar.update(task, completed=loop.step, metrics=progress_text(loop))
                if train.due(loop.step, t.checkpoint_every, steps.total):
                    train.save_checkpoint(d, plan.checkpoints, loop.step, {"policy": policy}, training, loop.state(),
                                          cfg, data_sha256, final=loop.step == steps.total)
        wall = time.perf_counter() - t_start

        # ---- save: the policy artifact, a summary with warnings -----------------------------------------------
        metrics = final_metrics(loop, training.guard, tokens_seen, wall, len(train_set), len(eval_set), truncated, p)
        published = train.published(policy, d)  # the full weights, on rank 0
        if d.is_main:
            publish(cfg, paths, published, tokenizer, metrics, loop.held.get("samples", []),
                    {"source": str(source), "sha256": data_sha256, **data_stats, "truncated": truncated},
                    plan.work_dir)
            pngs = train.record_end(training, "dpo", Path(cfg.run_dir), metrics, "policy")
            show_summary(con, metrics, warnings(loop, cfg), wall, Path(cfg.run_dir), pngs)
        dist.barrier(d)
        return metrics


# ---- set up -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Upstream:
    """Where the policy and the reference come from, and the parent artifact the manifest records."""
    policy: str
    reference: str
    parents: list


def find_upstream(cfg: DPOConfig) -> Upstream:
    """The SFT policy (model.name_or_path, else this experiment's SFT artifact) and the reference (model.reference,
    else the same), checked before anything loads."""
    policy, parent = artifacts.upstream(cfg.model.name_or_path, cfg.root, cfg.experiment, "sft", "policy",
                                        cfg.artifact_check)
    check_source(policy, "model.name_or_path")
    reference = policy
    if cfg.model.reference is not None:
        reference, _ = artifacts.upstream(cfg.model.reference, cfg.root, cfg.experiment, "sft", "policy",
                                          cfg.artifact_check, key="model.reference")
        check_source(reference, "model.reference")
    return Upstream(policy, reference, [parent] if parent else [])


def load_policy(cfg: DPOConfig, paths: Upstream, d: dist.Dist, device) -> tuple:
    """(the policy in training mode, dropout off, LoRA adapters when model.lora.r > 0; its tokenizer; how
    data.packing was settled)."""
    model_cfg = ModelConfig(name_or_path=paths.policy, revision=cfg.model.revision,
                            trust_remote_code=cfg.model.trust_remote_code, tiny=cfg.model.tiny)
    policy, tokenizer, _ = train.main_first(d, load_causal_lm, model_cfg, train.load_device(device, cfg.train),
                                            False)
    packing = batches.decide_packing(cfg.data, lambda: packing_refusal(policy, paths.policy))
    lora.add_adapters(policy, cfg.model.lora, cfg.seed)
    policy.train()
    return policy, tokenizer, packing


def tokenize(cfg: DPOConfig, train_rows: list[dict], eval_rows: list[dict], tokenizer, source) -> tuple:
    """(train pairs, held-out pairs, pairs truncated): `[bos] prompt response [eos]` per side, with where each
    response starts (the log-probs are summed from there)."""
    train_set, train_stats = tokenize_pairs(train_rows, tokenizer, cfg.data.max_seq_len, False, source=source)
    eval_set, eval_stats = tokenize_pairs(eval_rows, tokenizer, cfg.data.max_seq_len, False,
                                          source=f"{source} (held-out rows)")
    return train_set, eval_set, train_stats["truncated"] + eval_stats["truncated"]


def held_out_prompts(cfg: DPOConfig, eval_rows: list[dict], tokenizer) -> list[list[int]]:
    """The ids of up to dpo.kl_prompts distinct held-out prompts, for sampling."""
    texts = list(dict.fromkeys(render_pair(row, tokenizer)[0] for row in eval_rows))[:cfg.dpo.kl_prompts]
    return encode_prompts(texts, tokenizer, cfg.data.max_seq_len - cfg.dpo.response_length)[0] if texts else []


class Reference:
    """The frozen reference: its log-probs of every pair precomputed once (dpo.precompute_reference; the model is
    then loaded again only for the held-out KL), or a model held for the whole run. With LoRA the reference is the
    policy with its adapters off, whatever the setting: no second copy."""

    def __init__(self, cfg: DPOConfig, path: str, policy, device, d: dist.Dist):
        self.cfg, self.path, self.device, self.d = cfg, path, device, d
        own = lora.has_adapters(policy) and cfg.model.reference is None  # the policy's own base is the reference
        self.view = lora.BaseView(policy) if own else None
        self.held = None if own or cfg.dpo.precompute_reference else self.load()
        self.precomputed = False

    def load(self):
        """The reference model, frozen, held as the training strategy says."""
        frozen = dev.frozen_dtype("auto", self.device)
        model = load_frozen_lm(self.path, train.load_device(self.device, self.cfg.train), frozen,
                               self.cfg.model.trust_remote_code, "model.reference")[0]
        return train.hold_frozen(model, self.d, self.device, self.cfg.train)

    def model(self):
        """The reference to run now: the adapters-off view, the held model, or one loaded for this use."""
        return self.view or self.held or self.load()

    def describe(self) -> str:
        if self.view is not None:
            return "the policy with its adapters off"
        return f"{self.path} ({'log-probs precomputed, not held' if self.precomputed else 'held'})"

    def prepared(self, examples: list[dict], pad_id: int) -> "Reference":
        """Itself, with every pair's log-probs precomputed when dpo.precompute_reference (one pass over every
        pair, after which the reference model is let go)."""
        if self.cfg.dpo.precompute_reference:
            self.precompute(examples, pad_id)
        return self

    def precompute(self, examples: list[dict], pad_id: int) -> None:
        """Each example's `ref_chosen` / `ref_rejected`: the reference's summed log-probs, one pass in micro-batches
        of train.micro_batch_size (every rank scores every pair: cheap next to training, and no gather)."""
        model, micro = self.model(), self.cfg.train.micro_batch_size
        with torch.no_grad(), dev.autocast(self.device):
            for i in range(0, len(examples), micro):
                part = examples[i:i + micro]
                logps, _ = pair_logps(model, part, pad_id, self.device, self.cfg.data.packing)
                for j, ex in enumerate(part):
                    ex["ref_chosen"], ex["ref_rejected"] = float(logps[j]), float(logps[len(part) + j])
        self.precomputed = True

    def logps(self, examples: list[dict], pad_id: int) -> torch.Tensor:
        """[2B] the reference's log-probs of a micro-batch of pairs (chosen rows, then rejected)."""
        if self.precomputed:
            values = [ex["ref_chosen"] for ex in examples] + [ex["ref_rejected"] for ex in examples]
            return torch.tensor(values, dtype=torch.float32, device=self.device)
        with torch.no_grad():
            return pair_logps(self.model(), examples, pad_id, self.device, self.cfg.data.packing)[0].float()


def show_plan(con, cfg: DPOConfig, paths: Upstream, policy, reference: Reference, device, data: str,
              batch: str) -> None:
    p = cfg.dpo
    con.print(f"[bold]rlhf dpo[/bold] -> {cfg.run_dir}")
    con.print(f"policy {paths.policy} ({lora.describe(policy)}); reference {reference.describe()}; loss {p.loss}, "
              f"beta {p.beta:g}" + (f", label_smoothing {p.label_smoothing:g}" if p.label_smoothing else "") +
              (f", nll_coef {p.nll_coef:g}" if p.nll_coef else "") + f"; {device}, {dev.precision(device)}; {data}")
    con.print(batch)


@dataclass
class Counters:
    """What the loop carries from one step to the next (and a checkpoint carries across a resume)."""
    step: int = 0                                   # optimizer steps done
    start: dict | None = None                       # the held-out diagnostics before training
    held: dict = field(default_factory=dict)        # the latest held-out diagnostics (`held_out`)
    last: dict = field(default_factory=dict)

    @classmethod
    def restore(cls, state: dict) -> "Counters":
        """From a checkpoint's state ({} for a fresh run)."""
        return cls(state.get("step", 0), state.get("start"), state.get("held", {}), state.get("last", {}))

    def state(self) -> dict:
        return {"start": self.start, "held": self.held, "last": self.last}


# ---- the loop ---------------------------------------------------------------------------------------------------

def pair_logps(model, examples: list[dict], pad_id: int, device, packing: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """([2B] summed log-probs of the responses, [2B] response tokens) of a micro-batch of pairs, chosen rows then
    rejected, in one forward pass (padded rows, or with `packing` one padding-free row); the LM head runs only at
    the positions that predict a response token (models.loading.logits_at)."""
    starts = [ex["chosen_start"] for ex in examples] + [ex["rejected_start"] for ex in examples]
    batch = collate_pairs(examples, pad_id, packing)
    if packing:  # one row: each sequence's response tokens, found from where it ends
        lengths = [len(ex["chosen_ids"]) for ex in examples] + [len(ex["rejected_ids"]) for ex in examples]
        targets = [(k, pos) for k, (end, n, s) in enumerate(zip(batch["ends"].tolist(), lengths, starts))
                   for pos in range(end - n + 1 + s, end + 1)]
        seq = torch.tensor([k for k, _ in targets], device=device)
        positions = torch.tensor([pos - 1 for _, pos in targets])
        inputs = batches.to_device({k: batch[k] for k in ("input_ids", "position_ids")}, device)
        logits = logits_at(model, positions.to(device), **inputs)
        logp = rl.logprobs_from_logits(logits, inputs["input_ids"][:, positions.to(device) + 1], 1.0)[0]
        out = torch.zeros(len(starts), dtype=logp.dtype, device=device).index_add_(0, seq, logp)
        return out, torch.bincount(seq, minlength=len(starts)).to(out.dtype)
    inputs = batches.to_device({k: batch[k] for k in ("input_ids", "attention_mask")}, device)
    width = batch["input_ids"].shape[1]
    target = torch.arange(1, width)
    mask = (target >= torch.tensor(starts)[:, None]) & (target < batch["attention_mask"].sum(1)[:, None])
    positions = torch.nonzero(mask.any(0)).squeeze(-1)  # predicting target positions + 1
    logits = logits_at(model, positions.to(device), **inputs)
    m = mask[:, positions].to(device=device, dtype=torch.float32)
    return rl.sequence_logprobs(logits, inputs["input_ids"][:, positions.to(device) + 1], m, 1.0), m.sum(1)


def pair_loss(policy, reference: Reference, examples: list[dict], pad_id: int, cfg: DPOConfig, device):
    """(per-pair losses [B], stats) of a micro-batch: the policy's log-probs (with gradients) against the
    reference's, through rl.dpo.dpo_loss."""
    p, b = cfg.dpo, len(examples)
    logp, n_tokens = pair_logps(policy, examples, pad_id, device, cfg.data.packing)
    ref = reference.logps(examples, pad_id)
    loss, stats = rl_dpo.dpo_loss(logp[:b], logp[b:], ref[:b], ref[b:], n_tokens[:b], p.loss, p.beta,
                                  p.label_smoothing, p.nll_coef)
    return loss, stats | {"logp_chosen": logp[:b].detach(), "logp_rejected": logp[b:].detach(),
                          "tokens": n_tokens.sum().detach()}


STAT_KEYS = ("loss", "accuracy", "margin", "logp_chosen", "logp_rejected")


def train_step(train_policy, reference: Reference, examples: list[dict], pad_id: int, training: train.Training,
               step: int, cfg: DPOConfig, d: dist.Dist, device) -> tuple[dict, float]:
    """One optimizer step on this step's pairs (this rank's share, in micro-batches): the means over the step's
    pairs on all ranks of the loss, implicit-reward accuracy and margin and the responses' log-probs, the
    gradient norm (None when skipped); and the tokens seen on all ranks. One device sync per step."""
    sums = torch.zeros(len(STAT_KEYS) + 1, device=device)
    for micro, last in train.micro_batches(batches.rank_slice(examples, d.rank, d.world_size),
                                           batches.micro_batch(cfg.train, d.world_size)):
        with train.micro_step([train_policy], last, device):
            loss, stats = pair_loss(train_policy, reference, micro, pad_id, cfg, device)
            # DDP averages gradients over ranks: scale so the total is the mean over the global step
            (loss.sum() * d.world_size / cfg.train.examples_per_step).backward()
        stats["loss"] = loss.detach()
        sums += torch.stack([*(stats[k].float().sum() for k in STAT_KEYS), stats["tokens"].float()])
    *totals, tokens = dist.all_sum(d, sums.tolist(), device)
    out = {k: v / cfg.train.examples_per_step for k, v in zip(STAT_KEYS, totals)}
    return out | {"grad_norm": train.take_step(training, step + 1, out["loss"])}, tokens


def held_out(policy, reference: Reference, eval_set: list[dict], prompts: list[list[int]], tokenizer,
             cfg: DPOConfig, step: int, d: dist.Dist, device) -> dict:
    """The held-out pairs' means (loss, accuracy, margin, log-probs), and on held-out prompts the KL to the
    reference of sampled responses and their gold score (built-in task), with a few samples."""
    policy.eval()
    sums = torch.zeros(len(STAT_KEYS) + 1, dtype=torch.float64)
    with torch.no_grad(), dev.autocast(device):
        for part, real in batches.rank_micro_batches(eval_set, d.rank, d.world_size, cfg.train.micro_batch_size):
            loss, stats = pair_loss(policy, reference, part, tokenizer.pad_token_id, cfg, device)
            if real:
                sums += torch.tensor([*(float(v.sum()) for v in (loss, *(stats[k] for k in STAT_KEYS[1:]))),
                                      len(part)], dtype=torch.float64)
    *totals, n = dist.all_sum(d, sums.tolist(), device)
    out = {k: v / max(n, 1) for k, v in zip(STAT_KEYS, totals)} if n else {}
    out |= sampled(policy, reference, prompts, tokenizer, cfg, step, d, device) if prompts else {}
    policy.train()
    return out


def sampled(policy, reference: Reference, prompts: list[list[int]], tokenizer, cfg: DPOConfig, step: int,
            d: dist.Dist, device) -> dict:
    """Responses sampled on the held-out prompts (temperature 1, at most dpo.response_length tokens, seeded from
    (seed, step, rank) without touching the training's random stream): the KL to the reference as eval measures
    it (Σ_t logp − logp_ref on the policy's own samples), the gold score on the built-in task, a few samples."""
    share, real = batches.padded_share(prompts, d.rank, d.world_size)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed * 1_000_003 + step * 7919 + d.rank)
        with train.generating(policy):
            samples = sample(policy, share, cfg.dpo.response_length, 1.0, cfg.train.micro_batch_size,
                             tokenizer.pad_token_id, tokenizer.eos_token_id, device)
    micro = cfg.train.micro_batch_size
    with torch.no_grad():
        kl = ((response_logprobs(policy, samples, 1.0, micro) -
               response_logprobs(reference.model(), samples, 1.0, micro)) * samples.mask).sum(1)[:real]
    prompt_text, response_text = decode(samples, tokenizer)
    gold = tasks.gold_scorer(cfg.data)
    golds = [gold(pr, rs) for pr, rs in zip(prompt_text[:real], response_text[:real])] if gold else []
    n, kl_sum, gold_sum = dist.all_sum(d, [float(real), float(kl.sum()), float(sum(golds))], device)
    shown = [{"step": step, "prompt": prompt_text[i], "response": response_text[i],
              **({"gold": golds[i]} if gold else {})} for i in range(min(4, real))]
    return {"kl": kl_sum / n, **({"gold": gold_sum / n} if gold else {}), "samples": shown}


def diagnostics(held: dict) -> dict:
    """The held-out numbers as metrics.jsonl logs them: eval_<pair means>, kl, gold."""
    return {**{f"eval_{k}": held[k] for k in STAT_KEYS if k in held}, **{k: held[k] for k in ("kl", "gold")
                                                                       if k in held}}


def progress_text(loop: Counters) -> str:
    return metrics_text({"loss": loop.last["loss"], "acc": loop.last["accuracy"],
                         "eval_acc": loop.held.get("accuracy", float("nan")), "kl": loop.held.get("kl", float("nan")),
                         "lr": loop.last["lr"]})


# ---- save -------------------------------------------------------------------------------------------------------

def final_metrics(loop: Counters, guard, tokens_seen: float, wall: float, train_pairs: int, eval_pairs: int,
                  truncated: int, p) -> dict:
    held, start = loop.held, loop.start or {}
    return {"steps": loop.step, "train_loss": loop.last.get("loss"), "train_accuracy": loop.last.get("accuracy"),
            **{f"eval_{k}": held.get(k) for k in ("loss", "accuracy", "margin", "logp_chosen", "logp_rejected")},
            "eval_logp_chosen_start": start.get("logp_chosen"), "kl": held.get("kl"),
            **({"gold": held["gold"], "gold_start": start.get("gold")} if "gold" in held else {}),
            "tokens_per_s": tokens_seen / wall if wall > 0 and tokens_seen else None, "train_pairs": train_pairs,
            "eval_pairs": eval_pairs, "truncated_pairs": truncated, "skipped_steps": guard.skipped,
            "reference_precomputed": p.precompute_reference}


def warnings(loop: Counters, cfg: DPOConfig) -> list[str]:
    """What the summary warns about: the chosen responses' log-prob fell by more than dpo.warn_chosen_drop (both
    sides pushed down: the policy moves mass to responses in neither), held-out accuracy at 1.0 (overfitting)."""
    out, held, start = [], loop.held, loop.start or {}
    if "logp_chosen" in held and "logp_chosen" in start and \
            start["logp_chosen"] - held["logp_chosen"] > cfg.dpo.warn_chosen_drop:
        out.append(f"the held-out chosen responses' log-prob fell from {start['logp_chosen']:.3g} to "
                   f"{held['logp_chosen']:.3g} nats (more than dpo.warn_chosen_drop={cfg.dpo.warn_chosen_drop:g}): "
                   f"the policy pushes both sides down; dpo.nll_coef > 0 (RPO) keeps the chosen up")
    if held.get("accuracy") == 1.0:
        out.append("held-out implicit-reward accuracy reached 1.0: DPO is likely overfitting the pairs (raise "
                   "dpo.beta, lower optim.lr or train.max_steps; check the KL and the gold score)")
    return out


def publish(cfg: DPOConfig, paths: Upstream, policy, tokenizer, metrics: dict, samples: list[dict], data: dict,
            work_dir: Path) -> None:
    """samples.jsonl, then the policy artifact; with LoRA, model/ holds the adapters merged into the SFT weights
    and adapter/ the adapters alone."""
    artifacts.write_text_atomic(work_dir / "samples.jsonl", "".join(artifacts.dumps(s) + "\n" for s in samples))
    manifest = artifacts.build_manifest(
        stage="dpo", kind="policy", config=asdict(cfg), base_model=paths.policy, tokenizer=tokenizer,
        metrics=metrics, parents=paths.parents, extra={"dpo": {"reference": paths.reference}, "data": data})

    def save(tmp: Path) -> None:
        policy_cfg = ModelConfig(name_or_path=paths.policy, trust_remote_code=cfg.model.trust_remote_code)
        plain = lora.merged(policy, reload=lambda: load_causal_lm(policy_cfg, torch.device("cpu"), dropout=False)[0])
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    artifacts.publish(work_dir, save, manifest, Path(cfg.run_dir), save_adapter=lora.adapter_writer(policy))


def show_summary(con, metrics: dict, warned: list[str], wall: float, run_dir: Path, pngs: list[Path]) -> None:
    shown = {k: v for k, v in metrics.items() if v is not None}
    con.print(summary_table("dpo summary", {**shown, "wall_seconds": wall, "artifact": str(run_dir / "model"),
                                            **charts_row(pngs, run_dir)}))
    for line in warned:
        con.print(f"[bold yellow]warning:[/bold yellow] {line}")
