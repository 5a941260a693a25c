"""`rlhf reward`: train a reward model on ranked pairs (stage 2 of InstructGPT).

`run` reads top to bottom: set up (the upstream SFT artifact as backbone, run directory, pairs, model, optimizer,
resume), loop (`train_step`: chosen and rejected through the model in one forward pass, the ranking loss over
micro-batches, one optimizer step; `evaluate` on the held-out pairs when due; logs and checkpoints), save (the
reward model with its held-out score statistics, a summary).

Loss per pair: -log σ(r_chosen - r_rejected - margin) + center_coef · (r_chosen + r_rejected)², averaged over the
pairs of the whole optimizer step however it is split into micro-batches and processes.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from rlhf_cli import artifacts
from rlhf_cli.config import RewardConfig
from rlhf_cli.data import tasks
from rlhf_cli.data.preference import collate_pairs, tokenize_pairs
from rlhf_cli.engine import batches, device as dev, dist, rundir, train
from rlhf_cli.engine.logging import charts_row, console, metrics_text, progress_bar, summary_table
from rlhf_cli.models import lora
from rlhf_cli.models.loading import (packing_refusal, ensure_pad_token, load_tokenizer, quiet_transformers, resolve,
                                     same_tokenizer)
from rlhf_cli.engine.recording import MetricsLog
from rlhf_cli.models.reward import ADAPTER_DIR, HEAD_FILE, RewardModel, score_pairs, write_ensemble
from rlhf_cli.rl.reward import ENSEMBLE, pairwise_loss, standardize_members

TRAIN_ACCURACY_PAIRS = 1000  # the final train accuracy is measured on at most this many training pairs


def run(cfg: RewardConfig) -> dict:
    with train.process(cfg.train.device, cfg.train.precision, cfg.train.strategy) as (d, device):
        con, t = console(d.is_main), cfg.train
        # ---- set up: upstream artifact, run directory, pairs (validated before anything heavy loads), model ----
        backbone, parent = artifacts.upstream(cfg.model.name_or_path, cfg.root, cfg.experiment, "sft", "policy",
                                              cfg.artifact_check)
        plan = rundir.prepare(cfg, d)
        random.seed(cfg.seed)
        train_rows, eval_rows, source, data_stats = tasks.preference_pairs(cfg.data, cfg.seed)
        data_sha256 = rundir.check_data(plan, cfg, d, train_rows, eval_rows)
        first = first_member(plan, cfg.reward.ensemble)
        model, tokenizer, backbone, packing = load_model(cfg, backbone, parent, device, first)
        train_set, eval_set, truncated = tokenize(cfg, train_rows, eval_rows, tokenizer, model.is_encoder, source)
        pairs = Pairs(train_set, eval_set, tasks.gold_preferences(cfg.data, eval_rows), tokenizer.pad_token_id)
        steps = batches.step_plan(t, len(train_set), d.world_size)
        show_plan(con, cfg, model, backbone, device, f"data {source}: {len(train_set)} train / {len(eval_set)} "
                  f"held-out pairs, {truncated} truncated to {cfg.data.max_seq_len} tokens",
                  f"{steps.describe(t, d.world_size, ' pairs')}; {packing}")

        # ---- loop: each member (one unless reward.ensemble > 1) trains, then is measured and kept --------------
        t_start = time.perf_counter()
        held = [model]
        del model  # train_members holds it: no second reference keeps it alive while later members train
        model, loop, training, pairs_seen = train_members(held, first, lambda k: load_model(
            cfg, backbone, parent, device, k)[0], pairs, plan, steps, data_sha256, cfg, d, device)
        wall = time.perf_counter() - t_start

        # ---- save: final accuracies, score statistics, the artifact (one model or the ensemble), a summary -----
        extra = {"pairs_per_s": pairs_seen / wall if wall > 0 and pairs_seen else None, "truncated_pairs": truncated,
                 **tasks.label_noise_ceiling(cfg.data)}
        if model is not None:  # one reward model
            metrics = final_metrics(model, pairs, loop, cfg, d, device) | {"skipped_steps": training.guard.skipped}
            published, members = train.published(model, d), None
        else:
            published, metrics, members = combine_members(cfg, plan.work_dir, pairs, d, device)
        metrics |= extra
        if d.is_main:
            publish(cfg, published, tokenizer, parent, metrics, {"source": str(source), "sha256": data_sha256,
                                                             **data_stats, "truncated": truncated}, plan.work_dir,
                    members)
            pngs = train.record_end(training, "reward", Path(cfg.run_dir), metrics, "reward_model")
            show_summary(con, metrics, wall, Path(cfg.run_dir), pngs)
        dist.barrier(d)
        return metrics


# ---- set up -----------------------------------------------------------------------------------------------------

def load_model(cfg: RewardConfig, backbone: str, parent: dict | None, device,
               k: int = 0) -> tuple[RewardModel, object, str, str]:
    """The reward model of member k (backbone + a fresh scalar head, in training mode; LoRA adapters on the
    backbone when model.lora.r > 0), its tokenizer with a pad token, where the backbone came from: the SFT artifact
    (`parent`), or model.name_or_path (the built-in tiny model is built if asked for), and how data.packing was
    settled. The head and the adapters are drawn from `member_seed` (the head from `seed` alone under
    reward.ensemble_merge, which averages heads that must start alike), the same on every rank."""
    from_artifact = parent is not None
    backbone = backbone if from_artifact else resolve(cfg.model)
    quiet_transformers()
    tokenizer = load_tokenizer(cfg.model, backbone)
    ensure_pad_token(tokenizer, require_eos=False)  # causal backbones append EOS: tokenize_pairs checks
    torch.manual_seed(cfg.seed if cfg.reward.ensemble_merge != "none" else member_seed(cfg, k))
    model = RewardModel.from_backbone(backbone, tokenizer, pooling=cfg.model.pooling,
                                      revision=None if from_artifact else cfg.model.revision,
                                      trust_remote_code=cfg.model.trust_remote_code).to(train.load_device(device,
                                                                                                        cfg.train))
    packing = batches.decide_packing(cfg.data, lambda: why_not_packable(model, backbone))
    lora.add_adapters(model, cfg.model.lora, member_seed(cfg, k))  # on the backbone; the head trains in full
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


@dataclass(frozen=True)
class Pairs:
    """The tokenized pairs every member trains and is measured on."""
    train: list[dict]
    eval: list[dict]                 # held-out pairs
    gold: list[bool] | None          # each held-out pair's gold preference (the built-in task), else None
    pad_id: int


@dataclass
class Counters:
    """What the loop carries from one step to the next (and a checkpoint carries across a resume)."""
    step: int = 0                                   # optimizer steps done (by this member)
    held: dict = field(default_factory=dict)        # the latest held-out numbers (`evaluate`)
    last: dict = field(default_factory=dict)
    start: int = 0                                  # the step this process started from

    @classmethod
    def restore(cls, state: dict, offset: int = 0) -> "Counters":
        """From a checkpoint's state ({} for a fresh run); `offset`: the steps of the members before this one."""
        step = state.get("step", offset) - offset
        return cls(step, state.get("held", {}), state.get("last", {}), step)

    def state(self) -> dict:
        return {"last": self.last, "held": self.held}


# ---- the loop ---------------------------------------------------------------------------------------------------

def train_members(held: list, first: int, load, pairs: Pairs, plan: rundir.RunPlan, steps, data_sha256: str,
                  cfg: RewardConfig, d: dist.Dist, device) -> tuple[RewardModel | None, Counters, train.Training, int]:
    """Train member `first` (the model in `held`, taken from it so that nothing else keeps it alive), then each
    next one, `load(k)` building it (reward.ensemble > 1): one after another, so memory holds one model at a time.
    An ensemble's members are kept on disk as each finishes (`keep_member`). Returns (the trained model, or None
    for an ensemble, the last member's counters and training, pairs trained on in this process)."""
    log = MetricsLog(plan.work_dir, d.is_main, cfg, resume_step=plan.resumed["step"] if plan.resumed else None)
    model, ensemble, pairs_seen = held.pop(), cfg.reward.ensemble > 1, 0
    for k in range(first, cfg.reward.ensemble):
        model = model if k == first else load(k)
        loop, training = train_member(model, k, pairs, plan, steps, data_sha256, log, cfg, d, device)
        pairs_seen += (loop.step - loop.start) * cfg.train.examples_per_step
        if ensemble:
            metrics = final_metrics(model, pairs, loop, cfg, d, device) | {"skipped_steps": training.guard.skipped}
            keep_member(model, k, metrics, held_out_scores(model, pairs, cfg, d, device), plan.work_dir, cfg, d)
            model = None
    return model, loop, training, pairs_seen


def train_member(model: RewardModel, k: int, pairs: Pairs, plan: rundir.RunPlan, steps, data_sha256: str,
                 log: MetricsLog, cfg: RewardConfig, d: dist.Dist, device) -> tuple[Counters, train.Training]:
    """Member k's optimizer steps (steps.total of them; one member: the whole run), from its checkpoint when the
    run resumes inside it, on its own pairs (`member_pairs`) in its own order, evaluated, logged and
    checkpointed at the run's step (member k's step s is the run's step k x steps.total + s)."""
    t, offset, seed = cfg.train, k * steps.total, member_seed(cfg, k)
    resumes = plan.resumed is not None and plan.resumed.get("member", 0) == k
    train_model = train.wrap_for_training(model, d, device, t)
    training = train.start(plan if resumes else replace(plan, resume_from=None, resumed=None), cfg,
                           {"model": model}, steps.total, d, restore_rng=d.is_main, log=log)
    loop, mine = Counters.restore(training.resumed, offset), member_pairs(cfg, pairs.train, k)
    member = {"member": k} if cfg.reward.ensemble > 1 else {}
    with progress_bar(console(d.is_main), t.log_every) as bar:
        label = f"member {k + 1}/{cfg.reward.ensemble}" if member else "reward"
        task = bar.add_task(label, total=steps.total, completed=loop.step, metrics="")
        while loop.step < steps.total:
            t0 = time.perf_counter()
            examples = batches.step_examples(mine, loop.step, t.examples_per_step, seed)
            step_metrics = train_step(train_model, examples, pairs.pad_id, training, loop.step, cfg, d, device)
            loop.step += 1
            loop.last = {**step_metrics, "pairs_per_s": t.examples_per_step / (time.perf_counter() - t0),
                         **training.step_metrics(), **member}
            if train.due(loop.step, t.eval_every, steps.total):
                loop.held = evaluate(model, pairs.eval, pairs.pad_id, cfg, d, device, pairs.gold)
                training.guard.require_finite(offset + loop.step, "held-out loss", loop.held.get("loss", 0.0))
                loop.last.update({f"eval_{key}": v for key, v in loop.held.items()})
            if train.due(loop.step, t.log_every, steps.total) or train.due(loop.step, t.eval_every, steps.total):
                log.log(offset + loop.step, loop.last)
            bar.update(task, completed=loop.step, metrics=progress_text(loop))
            if train.due(loop.step, t.checkpoint_every, steps.total):
                train.save_checkpoint(d, plan.checkpoints, offset + loop.step, {"model": model}, training,
                                      {**loop.state(), "member": k}, cfg, data_sha256,
                                      final=loop.step == steps.total)
    return loop, training


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
             gold: list[bool] | None = None, scores: torch.Tensor | None = None) -> dict:
    """Pairwise accuracy (a tie counts as wrong), loss, mean margin, reward mean/std (and, given each pair's gold
    preference, the accuracy against it) over `examples`, all ranks; {} for no examples. `scores` ([N, 2]), when
    given, gets (r_chosen, r_rejected) of the pairs this rank scored."""
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
            if scores is not None:
                scores[part] = torch.stack([rc, rr], 1).to(scores.dtype).cpu()
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

def final_metrics(model: RewardModel, pairs: Pairs, loop: Counters, cfg: RewardConfig, d: dist.Dist,
                  device) -> dict:
    """Held-out and train accuracy, and the score statistics PPO normalises with (set on the model): over the
    held-out pairs, or over up to TRAIN_ACCURACY_PAIRS training pairs when there are none."""
    pad_id, some_train = model.pad_token_id, pairs.train[:TRAIN_ACCURACY_PAIRS]
    held = loop.held or evaluate(model, pairs.eval, pad_id, cfg, d, device, pairs.gold)
    train_eval = evaluate(model, some_train, pad_id, cfg, d, device)
    model.score_stats = {"mean": held.get("reward_mean", train_eval["reward_mean"]),
                         "std": held.get("reward_std", train_eval["reward_std"]),
                         "n": 2 * len(pairs.eval or some_train)}
    return {"steps": loop.step, "train_accuracy": train_eval["accuracy"], "eval_accuracy": held.get("accuracy"),
            "eval_gold_accuracy": held.get("gold_accuracy"), "eval_margin": held.get("margin"),
            "eval_loss": held.get("loss"), "reward_mean": model.score_stats["mean"],
            "reward_std": model.score_stats["std"], "train_pairs": len(pairs.train), "eval_pairs": len(pairs.eval)}


def publish(cfg: RewardConfig, model: RewardModel | None, tokenizer, parent: dict | None, metrics: dict, data: dict,
            work_dir: Path, ensemble: dict | None = None) -> None:
    """The artifact: one reward model (with LoRA: the adapters merged into the backbone, a plain reward model),
    or, for an ensemble (`model` None), model/ = ensemble.json and each member's directory as it was kept."""
    facts = ({"pooling": model.pooling, "is_encoder": model.is_encoder, "score_stats": model.score_stats} if model
             else {"pooling": ensemble["pooling"], "is_encoder": ensemble["is_encoder"]})
    manifest = artifacts.build_manifest(
        stage="reward", kind="reward_model", config=asdict(cfg),
        base_model=parent["path"] if parent else cfg.model.name_or_path, tokenizer=tokenizer,
        metrics=metrics, parents=[parent] if parent else [],
        extra={"reward": facts, **({"ensemble": ensemble} if ensemble else {}),
               "policy_tokenizer": policy_tokenizer_match(parent, cfg, tokenizer), "data": data})
    if model is not None:
        save = lambda tmp: lora.merged(model).save_pretrained(tmp, tokenizer)  # noqa: E731
    else:
        save = functools.partial(assemble_ensemble, work_dir / MEMBERS, ensemble, tokenizer)
    artifacts.publish(work_dir, save, manifest, Path(cfg.run_dir))
    shutil.rmtree(work_dir / MEMBERS, ignore_errors=True)  # published (or averaged): no longer needed


# ---- ensembles (reward.ensemble > 1) ---------------------------------------------------------------------------

MEMBERS = "members"  # work_dir/members/member-k/: each finished member, until the artifact is published


def member_seed(cfg: RewardConfig, k: int) -> int:
    """Member k's seed (its head, adapters and data order): seed + k, so member 0 is the single model of `seed`."""
    return cfg.seed + k


def member_pairs(cfg: RewardConfig, train_set: list, k: int) -> list:
    """The pairs member k trains on: all of them, or (reward.ensemble_bootstrap with an ensemble) a bootstrap
    resample, as many pairs drawn with replacement from member_seed's generator."""
    if cfg.reward.ensemble < 2 or not cfg.reward.ensemble_bootstrap:
        return train_set
    g = torch.Generator().manual_seed(member_seed(cfg, k))
    return [train_set[i] for i in torch.randint(len(train_set), (len(train_set),), generator=g).tolist()]


def first_member(plan: rundir.RunPlan, k_members: int) -> int:
    """The member this process trains first: 0, or on resume the member of the checkpoint, or the one after it
    when that member was already kept (its checkpoint was its last). The last member, kept, is taken again from its
    final checkpoint (no steps left; kept again), so the run ends as one that was not stopped."""
    if plan.resumed is None:
        return 0
    k = plan.resumed.get("member", 0)
    kept = k_members > 1 and (plan.work_dir / MEMBERS / f"member-{k}" / MEMBER_FILE).is_file()
    return min(k + 1, k_members - 1) if kept else k


MEMBER_FILE = "member.json"


def held_out_scores(model: RewardModel, pairs: Pairs, cfg: RewardConfig, d: dist.Dist, device) -> torch.Tensor:
    """[N, 2] float64: (r_chosen, r_rejected) of every held-out pair, each rank scoring its share, on all ranks."""
    out = torch.zeros(len(pairs.eval), 2, dtype=torch.float64)
    evaluate(model, pairs.eval, pairs.pad_id, cfg, d, device, scores=out)
    return torch.tensor(dist.all_sum(d, out.flatten().tolist(), device), dtype=torch.float64).reshape(-1, 2)


def keep_member(model: RewardModel, k: int, metrics: dict, scores: torch.Tensor, work_dir: Path, cfg: RewardConfig,
                d: dist.Dist) -> None:
    """Member k, finished, into work_dir/members/member-k/ (rank 0; written under a temporary name, then renamed):
    model/ (LoRA merged: a plain reward model, loadable on its own) and member.json (its seed, metrics, pooling and
    held-out scores, which the ensemble's accuracy is measured from)."""
    published = train.published(model, d)
    if d.is_main:
        final = work_dir / MEMBERS / f"member-{k}"
        tmp = final.with_name(f".member-{k}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        base = save_adapter(published, tmp / "model" / ADAPTER_DIR)
        lora.merged(published).save_pretrained(tmp / "model")
        info = {"member": k, "seed": member_seed(cfg, k), "metrics": metrics, "score_stats": published.score_stats,
                "pooling": published.pooling, "is_encoder": published.is_encoder, "adapter_base": base,
                "held_out_scores": scores.tolist()}
        (tmp / MEMBER_FILE).write_text(artifacts.dumps(info) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    dist.barrier(d)


def save_adapter(model: RewardModel, directory: Path) -> str | None:
    """A LoRA member's adapters (peft's files) and head alone into `directory`, so that an ensemble's members can
    share one copy of their base when scored (models.reward.LoraEnsemble); returns the base's path. None (nothing
    written) without adapters, for a whole encoder classifier, or when the base's embeddings were resized (a pad
    token added): that base is not the one on disk."""
    from transformers import AutoConfig

    write = lora.adapter_writer(model)
    if write is None or "classifier" in model._modules:
        return None
    base = model.backbone.config._name_or_path
    if AutoConfig.from_pretrained(base).vocab_size != model.backbone.config.vocab_size:
        return None
    write(directory)
    save_file({key: v.detach().contiguous().cpu() for key, v in model.head.state_dict().items()},
              str(directory / HEAD_FILE))
    return base


def combine_members(cfg: RewardConfig, work_dir: Path, pairs: Pairs, d: dist.Dist,
                    device) -> tuple[RewardModel | None, dict, dict]:
    """(the model to publish: None for an ensemble, the weight-averaged model under reward.ensemble_merge; the
    run's metrics; what the manifest records of the ensemble). The ensemble's held-out accuracy is that of its
    members' standardised scores combined as ppo.reward_aggregation would (ensemble_eval_accuracy: mean; _min,
    _uwo at λ = 0.5); eval_accuracy is the artifact's: the ensemble's mean, or the weight-averaged model's."""
    kept = [json.loads((work_dir / MEMBERS / f"member-{k}" / MEMBER_FILE).read_text())
            for k in range(cfg.reward.ensemble)]
    members = [{"member": m["member"], "seed": m["seed"], "score_stats": m["score_stats"],
                **{key: m["metrics"][key] for key in MEMBER_METRICS}} for m in kept]
    means = lambda key: statistics.fmean(m[key] for m in members) if members[0][key] is not None else None  # noqa
    bases = {m.get("adapter_base") for m in kept}
    info = {"size": len(kept), "bootstrap": cfg.reward.ensemble_bootstrap, "merge": cfg.reward.ensemble_merge,
            "pooling": kept[0]["pooling"], "is_encoder": kept[0]["is_encoder"],
            "shared_base": bases.pop() if len(bases) == 1 else None, "members": members}
    metrics = {"ensemble": len(kept), "steps": kept[0]["metrics"]["steps"], "train_accuracy": means("train_accuracy"),
               "member_eval_accuracy": means("eval_accuracy"), "member_eval_gold_accuracy": means("eval_gold_accuracy"),
               "train_pairs": len(pairs.train), "eval_pairs": len(pairs.eval),
               "skipped_steps": sum(m["metrics"]["skipped_steps"] for m in kept)}
    if pairs.eval:
        scores = torch.tensor([m["held_out_scores"] for m in kept], dtype=torch.float64)  # [K, N, 2]
        stats = torch.tensor([[m["score_stats"]["mean"], m["score_stats"]["std"]] for m in kept], dtype=torch.float64)
        info["accuracy"] = ensemble_accuracy(scores, stats, pairs.gold)
        combined = {"ensemble_eval_accuracy": info["accuracy"]["mean"]["accuracy"],
                    "ensemble_eval_gold_accuracy": info["accuracy"]["mean"].get("gold_accuracy"),
                    **{f"ensemble_eval_accuracy_{a}": info["accuracy"][a]["accuracy"] for a in ("min", "uwo")}}
        metrics |= combined | {"eval_accuracy": combined["ensemble_eval_accuracy"],
                               "eval_gold_accuracy": combined["ensemble_eval_gold_accuracy"]}
    if cfg.reward.ensemble_merge == "none":
        return None, metrics, info
    model = average_members([work_dir / MEMBERS / f"member-{k}" / "model" for k in range(len(kept))],
                            train.load_device(device, cfg.train))
    averaged = final_metrics(model, pairs, Counters(step=metrics["steps"]), cfg, d, device)
    metrics |= {key: averaged[key] for key in ("train_accuracy", "eval_accuracy", "eval_gold_accuracy", "eval_margin",
                                                "eval_loss", "reward_mean", "reward_std")}
    return model, metrics, info


MEMBER_METRICS = ("train_accuracy", "eval_accuracy", "eval_gold_accuracy", "eval_loss", "reward_mean", "reward_std")


def ensemble_accuracy(scores: torch.Tensor, stats: torch.Tensor, gold: list[bool] | None, uwo_coef: float = 0.5
                      ) -> dict:
    """{aggregation: {accuracy, gold_accuracy}} of K members' held-out scores [K, N, 2] (chosen, rejected), each
    standardised with its [K, 2] (mean, std) and combined by rl.reward.ENSEMBLE[aggregation]; a tie counts as
    wrong."""
    out = {}
    for name, combine in ENSEMBLE.items():
        chosen, rejected = (combine(standardize_members(scores[:, :, i], stats[:, 0], stats[:, 1]), uwo_coef)
                            for i in (0, 1))
        wins = chosen > rejected
        out[name] = {"accuracy": float(wins.double().mean())}
        if gold:
            out[name]["gold_accuracy"] = float((wins == torch.tensor(gold)).double().mean())
    return out


def average_members(directories: list[Path], device) -> RewardModel:
    """WARM (Ramé et al. 2024): one reward model whose every weight is the mean of the members' (each loaded in
    turn, so memory holds two models), in training mode as `evaluate` expects."""
    model, total = None, None
    for directory in directories:
        member = RewardModel.from_pretrained(directory, key="reward.ensemble_merge")
        state = {k: v.double() for k, v in member.state_dict().items()}
        total = state if total is None else {k: total[k] + v for k, v in state.items()}
        model = model or member
    model.load_state_dict({k: (v / len(directories)).to(model.state_dict()[k].dtype) for k, v in total.items()})
    return model.to(device).train()


def assemble_ensemble(members_dir: Path, ensemble: dict, tokenizer, tmp: Path) -> None:
    """The ensemble artifact's model/: each member's model directory (hard links where the file system allows,
    else copies), its tokenizer beside it, and ensemble.json listing the members with their numbers."""
    names = []
    for member in ensemble["members"]:
        name = f"member-{member['member']}"
        shutil.copytree(members_dir / name / "model", tmp / name, copy_function=link_or_copy)
        tokenizer.save_pretrained(tmp / name)
        names.append(name)
    write_ensemble(tmp, names, {key: v for key, v in ensemble.items() if key != "members"} | {
        "score_stats": [m["score_stats"] for m in ensemble["members"]]})
    tokenizer.save_pretrained(tmp)


def link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


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
