"""`rlhf ppo`: optimise the SFT policy against the reward model with PPO (stage 3 of InstructGPT).

`run` reads top to bottom: set up (upstream artifacts, the four roles, prompts, optimizer, resume), loop (one
iteration = `collect_rollout`, `shape_rewards`, `ppo_update`, `iteration_metrics`), save (the policy artifact, a
summary). The math lives in rl/ppo.py, one small pure function per formula; this file only wires it.

Roles: policy (trainable, from the SFT artifact), reference (frozen copy of it), reward model (frozen, from the
reward artifact; none with reward functions alone) and, for ppo.advantage=gae only, a value model (trainable,
initialised from the reward model's backbone and head, else from the policy with a fresh head); the critic-free
estimators (rl/advantages.py) load none, and ppo.kl_coef=0 (without the adaptive controller) loads no reference.
A response's score is the weighted sum of its reward components (`reward.*`: the reward model and the reward
functions, engine/reward_functions.py). Dropout is off in all of them. Each iteration reseeds from (seed,
iteration, rank), so a resumed run samples what an uninterrupted one would have.
"""

from __future__ import annotations

import functools
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from rich.table import Table

from rlhf_cli import artifacts
from rlhf_cli.config import ModelConfig, PPOAlgoConfig, PPOConfig
from rlhf_cli.data import tasks
from rlhf_cli.data.prompts import encode_prompts
from rlhf_cli.engine import batches, checkpoint, device as dev, dist, reward_functions as rf, rundir, train
from rlhf_cli.engine.guard import Guard
from rlhf_cli.engine.logging import charts_row, console, metrics_text, progress_bar, summary_table
from rlhf_cli.engine.recording import MetricsLog, append_jsonl, truncate_jsonl
from rlhf_cli.engine.rollout import (Rollout, Scorer, constants, decode, policy_logits, response_logprobs,
                                    response_values, rollout, value_slice)
from rlhf_cli.errors import ArtifactError, ConfigError
from rlhf_cli.models import lora
from rlhf_cli.models.loading import (check_source, load_causal_lm, load_frozen_lm, load_tokenizer, resolve,
                                    same_tokenizer)
from rlhf_cli.models.reward import RewardModel, ensemble_members, load_frozen_reward_model
from rlhf_cli.rl import advantages as adv, ppo as rl, reward as rl_reward


def run(cfg: PPOConfig) -> dict:
    with train.process(cfg.train.device, cfg.train.precision, cfg.train.strategy) as (d, device):
        con, p, t = console(d.is_main), cfg.ppo, cfg.train
        # ---- set up: upstream artifacts (checked before anything loads), run directory, roles, prompts -------
        paths = find_upstream(cfg)
        functions = rf.load_all(cfg.reward.functions)  # the user's code imports before any model loads
        plan = rundir.prepare(cfg, d)
        shape = batch_shape(cfg, d.world_size)
        roles = load_roles(cfg, paths, device, functions)
        wrapped = hold_roles(roles, d, device, t)
        prompts, columns, source = tasks.train_prompts(cfg.data, roles.tokenizer)
        data_sha256 = rundir.check_data(plan, cfg, d, prompts)
        prompt_ids, cut = encode_prompts(prompts, roles.tokenizer, cfg.data.max_seq_len - p.response_length)
        show_plan(con, cfg, paths, roles, f"prompts {source}: {len(prompts)} ({cut} cut to "
                  f"{cfg.data.max_seq_len - p.response_length} tokens)", shape, d, device)
        training = train.start(plan, cfg, roles.trained(), shape.optimizer_steps, d, restore_rng=False,
                               unit="iteration")
        loop = Counters.restore(training.resumed, p.kl_coef)
        if training.resumed and d.is_main:  # those iterations run again: drop what they wrote
            truncate_jsonl(plan.work_dir / "samples.jsonl", loop.step)
        gold = tasks.gold_scorer(cfg.data)

        # ---- loop: rollout, rewards and advantages, clipped updates, metrics ---------------------------------
        with progress_bar(con, t.log_every) as bar:
            task = bar.add_task("ppo", total=t.max_steps, completed=loop.step, metrics="")
            while loop.step < t.max_steps:
                seed_everything(cfg.seed, loop.step, d.rank)
                t0 = time.perf_counter()
                rows = rollout_prompts(len(prompt_ids), loop.step, cfg, d)
                roll = collect_rollout(roles, [prompt_ids[i] for i in rows], cfg, device, [columns[i] for i in rows],
                                       functools.partial(stopped_at, loop.step + 1, plan.checkpoints))
                check_rollout(training.guard, loop.step + 1, roll, paths.reward)
                shaped = shape_rewards(roll, loop.kl_coef, p, roles.rewards)
                t1 = time.perf_counter()
                stats = ppo_update(wrapped, roll, shaped, training, loop.step, cfg, shape, d, device)
                seconds = {"rollout": t1 - t0, "update": time.perf_counter() - t1}
                loop.step += 1
                loop.last = iteration_metrics(roll, shaped, stats, loop.kl_coef, gold, seconds, p, d, device) | \
                    training.step_metrics()
                loop.first = loop.first or dict(loop.last)
                if p.adaptive_kl:
                    loop.kl_coef = rl.adaptive_kl_update(loop.kl_coef, loop.last["kl"], p.kl_target, p.kl_horizon,
                                                         p.prompts_per_rollout * p.samples_per_prompt)
                record(loop, roll, gold, training.log, cfg, plan.work_dir, d)
                bar.update(task, completed=loop.step, metrics=progress_text(loop.last))
                if train.due(loop.step, t.checkpoint_every, t.max_steps):
                    train.save_checkpoint(d, plan.checkpoints, loop.step, roles.trained(), training, loop.state(), cfg,
                                          data_sha256, final=loop.step == t.max_steps)

        # ---- save: the policy artifact and a summary ---------------------------------------------------------
        metrics = final_metrics(loop, training.guard)
        policy = train.published(roles.policy, d)  # the full weights, on rank 0
        if d.is_main:
            publish(cfg, paths, roles, policy, metrics, loop.kl_coef, {"source": str(source), "sha256": data_sha256,
                                                               "prompts": len(prompts)}, plan.work_dir)
            pngs = train.record_end(training, "ppo", Path(cfg.run_dir), metrics, "policy")
            show_summary(con, loop.first or {}, loop.last, Path(cfg.run_dir), pngs)
        dist.barrier(d)
        return metrics


# ---- set up -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Upstream:
    """Where each role comes from (checked artifacts or models) and the parent artifacts the manifest records."""
    policy: str
    reward: list[str]                # the reward models' directories: one, an ensemble's members, or none
                                     # (reward functions alone)
    value: str | None                # None: the value model starts from the policy with a fresh head
    parents: list


def find_upstream(cfg: PPOConfig) -> Upstream:
    """The SFT policy and the reward model (unless reward functions alone score: model.reward=none, or no reward
    artifact in the experiment), and a separate value model if given, checked before anything loads."""
    check = cfg.artifact_check
    policy, sft_parent = artifacts.upstream(cfg.model.policy, cfg.root, cfg.experiment, "sft", "policy", check,
                                            key="model.policy")
    check_source(policy, "model.policy")   # a model directory or hub id given instead must be there
    reward, reward_parents = [], []
    if rf.wants_reward_model(cfg.model.reward, cfg.reward.functions, cfg.root, cfg.experiment):
        reward, reward_parents = rf.find_reward_models(cfg.model.reward, cfg.root, cfg.experiment, check,
                                                       "model.reward", together=cfg.train.strategy != "fsdp")
    value = (ensemble_members(reward[0]) or reward)[0] if reward else None   # an ensemble's first member
    if cfg.model.value is not None:
        value, _ = artifacts.upstream(cfg.model.value, cfg.root, cfg.experiment, "reward", "reward_model", check,
                                      key="model.value")
        check_source(value, "model.value")
    return Upstream(policy, reward, value, [x for x in (sft_parent, *reward_parents) if x])


@dataclass(frozen=True)
class BatchShape:
    """This rank's share of an iteration: rollout rows, minibatch rows, micro-batches per optimizer step."""
    local_rollout: int
    local_minibatch: int
    grad_accum: int
    optimizer_steps: int        # over the whole run (the schedule's length)
    micro: int                  # rows per micro-batch (at most train.micro_batch_size)


def batch_shape(cfg: PPOConfig, world_size: int) -> BatchShape:
    """prompts_per_rollout = num_mini_batches x micro-batch x grad_accum_steps x world_size, the micro-batch the
    largest up to train.micro_batch_size that splits a process's share of a minibatch evenly (engine.batches), or
    a ConfigError when a minibatch does not split evenly over the processes."""
    p, t = cfg.ppo, cfg.train
    minibatch = p.prompts_per_rollout * p.samples_per_prompt // p.num_mini_batches  # whole: checked at compose time
    if minibatch % world_size:
        raise ConfigError(f"a minibatch of {minibatch} sequences (ppo.prompts_per_rollout={p.prompts_per_rollout} x "
                          f"samples_per_prompt={p.samples_per_prompt} / num_mini_batches={p.num_mini_batches}) does "
                          f"not split evenly over world_size={world_size} processes",
                          hint="make prompts_per_rollout x samples_per_prompt / num_mini_batches a multiple of the "
                               "number of processes")
    if p.prompts_per_rollout % world_size:  # a prompt's k responses stay together on one process
        raise ConfigError(f"ppo.prompts_per_rollout={p.prompts_per_rollout} prompts do not split evenly over "
                          f"world_size={world_size} processes", hint="make prompts_per_rollout a multiple of the "
                                                                       "number of processes")
    micro, grad_accum = batches.split_step(minibatch, world_size, t.micro_batch_size)
    local_minibatch = minibatch // world_size
    return BatchShape(local_minibatch * p.num_mini_batches, local_minibatch, grad_accum,
                      t.max_steps * p.num_ppo_epochs * p.num_mini_batches, micro)


@dataclass
class Roles:
    """The models of PPO (four with a value model, three without) and the tokenizers between them."""
    policy: torch.nn.Module          # trained; from the SFT artifact
    reference: object                # the frozen SFT policy, the KL baseline: a copy, or the policy's base
                                     # with its adapters off (models.lora.BaseView); None when no KL is asked
    value: RewardModel | None        # trained; per-token values (ppo.advantage=gae only)
    rewards: rf.Rewards              # what scores a response: the frozen reward model (or none) and the functions
    tokenizer: object                # the policy's (and reference's)
    value_init: str                  # what the value model started from, as shown

    @property
    def reward_models(self) -> list[RewardModel]:
        """The frozen reward models: one, an ensemble's members, or none."""
        return [scorer.model for scorer in self.rewards.scorers]

    def trained(self) -> dict:
        """The trained models by checkpoint name."""
        return {"policy": self.policy, **({"value": self.value} if self.value is not None else {})}


def load_roles(cfg: PPOConfig, paths: Upstream, device: torch.device,
               functions: list[rf.RewardFunction] | None = None) -> Roles:
    """Policy and reference from the SFT artifact, the reward model (if any) beside the reward functions, and the
    value model: the reward model when it is a causal LM on the policy's tokens, else the policy with a fresh head.
    Dropout off in all four. With
    model.lora.r > 0 the policy and the value model train adapters on frozen bases held in model.dtype, and the
    reference is the policy with its adapters off. Loaded where engine.train.load_device says (the host under
    fsdp: `hold_roles` then shards them onto `device`)."""
    policy_cfg = ModelConfig(name_or_path=paths.policy, trust_remote_code=cfg.model.trust_remote_code)
    frozen, at = dev.frozen_dtype(cfg.model.dtype, device), train.load_device(device, cfg.train)
    policy, tokenizer, _ = load_causal_lm(policy_cfg, at, dropout=False, key="model.policy")
    lora.add_adapters(policy, cfg.model.lora, cfg.seed, base_dtype=frozen)
    reference = None
    if needs_reference(cfg.ppo):
        reference = lora.frozen_base(policy, lambda: load_frozen_lm(paths.policy, at, frozen,
                                                                    cfg.model.trust_remote_code, "model.policy")[0])
    scorers = []
    for path in paths.reward:
        reward, reward_tokenizer = load_frozen_reward_model(path, at, frozen, cfg.model.trust_remote_code)
        scorers.append(Scorer(reward, reward_tokenizer, same_tokenizer(tokenizer, reward_tokenizer),
                              cfg.data.max_seq_len))
    rf.check_ensemble_stats(scorers, paths.reward)
    rewards = rf.make_rewards(scorers, cfg.reward.functions, cfg.reward.weights, cfg.reward.aggregation, functions,
                              cfg.ppo.reward_aggregation, cfg.ppo.uwo_coef)
    value, value_init = None, "none (critic-free)"
    if adv.ESTIMATORS[cfg.ppo.advantage].needs_value:
        value, value_init = load_value_model(cfg, paths, policy_cfg, tokenizer, at, frozen)
    policy.train()
    check_normalisation(cfg.ppo, paths, rewards.scorer)
    return Roles(policy, reference, value, rewards, tokenizer, value_init)


def check_normalisation(p: PPOAlgoConfig, paths: Upstream, scorer: Scorer | None) -> None:
    """ppo.normalize_scores scales the reward model's score by its held-out statistics: it needs both."""
    if not p.normalize_scores:
        return
    if scorer is None:
        raise ConfigError("ppo.normalize_scores=true normalises the reward model's score, but no reward model is "
                          "used (reward functions alone)", hint="set ppo.normalize_scores=false")
    if not scorer.model.score_stats.get("std"):
        raise ArtifactError(f"ppo.normalize_scores=true but {paths.reward[0]} records no score statistics",
                            hint="re-run `rlhf reward`, or set ppo.normalize_scores=false")


def needs_reference(p: PPOAlgoConfig) -> bool:
    """Whether the KL to the reference is asked for: a KL coefficient, or the controller that adapts it."""
    return p.kl_coef > 0 or p.adaptive_kl


def load_value_model(cfg: PPOConfig, paths: Upstream, policy_cfg: ModelConfig, tokenizer, at, frozen):
    """(the value model, what it started from): the reward model when it is a causal LM on the policy's tokens,
    else the policy with a fresh head; trained (LoRA on the backbone with model.lora.r > 0, the head in full)."""
    value = value_init = None
    policy_path = resolve(policy_cfg, "model.policy")  # builtin:tiny -> its directory
    if paths.value is not None:
        value = RewardModel.from_pretrained(paths.value, cfg.model.trust_remote_code, "model.value")
        value_init = "the reward model"
    if value is None:
        value_init = "the policy with a fresh head (no reward model)"
        value = RewardModel.from_backbone(policy_path, tokenizer, pooling="last", key="model.policy")
    elif not value.gives_values or not same_tokenizer(tokenizer, load_tokenizer(policy_cfg, paths.value)):
        # a bidirectional value model would see the very tokens whose return it predicts
        value_init = "the policy with a fresh head (the reward model is not a causal LM on the policy's tokens)"
        value = RewardModel.from_backbone(policy_path, tokenizer, pooling="last", key="model.policy")
    value.add_head_bias().to(at).train()
    lora.add_adapters(value, cfg.model.lora, cfg.seed + 1, base_dtype=frozen)  # on the backbone; the head trains in full
    return value, value_init


def hold_roles(roles: Roles, d: dist.Dist, device: torch.device, t) -> list:
    """The trained roles as the update runs them (engine.train.wrap_for_training) and the frozen ones held alike
    (sharded under train.strategy=fsdp): [policy, value model (gae only)] to train through."""
    wrapped = [train.wrap_for_training(m, d, device, t) for m in roles.trained().values()]
    for frozen in (roles.reference, *roles.reward_models):
        if frozen is not None:
            train.hold_frozen(frozen, d, device, t)
    return wrapped


def show_plan(con, cfg: PPOConfig, paths: Upstream, roles: Roles, prompts: str, shape: BatchShape, d, device) -> None:
    p, t = cfg.ppo, cfg.train
    reference = ("none (ppo.kl_coef=0: no KL to penalise or measure)" if roles.reference is None else
                 "the policy with its adapters off" if isinstance(roles.reference, lora.BaseView) else
                 f"a frozen copy ({lora.counts(roles.reference)[1] / 1e6:.2f}M parameters)")
    con.print(f"[bold]rlhf ppo[/bold] -> {cfg.run_dir}")
    scorer = roles.rewards.scorer
    n = roles.rewards.members
    members = (f"an ensemble of {n} ({', '.join(paths.reward)}), each " if len(paths.reward) > 1 else
               f"an ensemble of {n} LoRA members on one base ({paths.reward[0]}), scored together: " if n > 1 else
               f"{paths.reward[0]} (" if paths.reward else "")
    reward = ("none (reward functions alone)" if scorer is None else
              f"{members}{lora.counts(scorer.model)[1] / 1e6:.2f}M parameters, frozen, "
              f"{'same tokens' if scorer.same_tokens else 're-tokenised text'})")
    con.print(f"policy {paths.policy} ({lora.describe(roles.policy)}); reference: {reference}; reward model {reward}; "
              f"value model: {roles.value_init}"
              f"{f' ({lora.describe(roles.value)})' if roles.value is not None else ''}; "
              f"advantage {p.advantage}; {device}, {dev.precision(device)}, frozen weights "
              f"in {str(dev.frozen_dtype(cfg.model.dtype, device)).removeprefix('torch.')}; {prompts}")
    con.print(f"score = {roles.rewards.describe()}" + "".join(
        f"; {f.name} = {f.spec}" for f in roles.rewards.functions))
    con.print(f"batch: prompts_per_rollout {p.prompts_per_rollout} x samples_per_prompt {p.samples_per_prompt} = "
              f"num_mini_batches {p.num_mini_batches} x "
              f"({batches.describe_micro(shape.micro, t.micro_batch_size)} x grad_accum_steps {shape.grad_accum} x "
              f"world_size {d.world_size}); {p.num_ppo_epochs} epochs -> {p.num_ppo_epochs * p.num_mini_batches} "
              f"optimizer steps per iteration, {t.max_steps} iterations")


@dataclass
class Counters:
    """What the loop carries from one iteration to the next (and a checkpoint carries across a resume)."""
    step: int = 0                    # iterations done
    kl_coef: float = 0.0             # β, adapted after every iteration when ppo.adaptive_kl
    first: dict | None = None        # the first iteration's metrics (the summary's baseline)
    last: dict = field(default_factory=dict)

    @classmethod
    def restore(cls, state: dict, kl_coef: float) -> "Counters":
        """From a checkpoint's state ({} for a fresh run: β = ppo.kl_coef)."""
        return cls(state.get("step", 0), state.get("kl_coef", kl_coef), state.get("first"), state.get("last", {}))

    def state(self) -> dict:
        return {"kl_coef": self.kl_coef, "first": self.first, "last": self.last}


# ---- the phases of an iteration ---------------------------------------------------------------------------------

def seed_everything(seed: int, step: int, rank: int) -> None:
    """Every iteration's randomness (sampling) is a function of (seed, iteration, rank): resumable exactly."""
    s = seed * 1_000_003 + step * 7919 + rank
    torch.manual_seed(s)
    random.seed(s)


def rollout_prompts(num_prompts: int, step: int, cfg: PPOConfig, d: dist.Dist) -> list[int]:
    """The indices of this rank's prompts of iteration `step`: a seeded permutation per epoch over the prompts, as
    in training, each repeated ppo.samples_per_prompt times in a row (a group stays on one process)."""
    prompts = batches.step_examples(range(num_prompts), step, cfg.ppo.prompts_per_rollout, cfg.seed)
    return [i for i in batches.rank_slice(prompts, d.rank, d.world_size) for _ in range(cfg.ppo.samples_per_prompt)]


def stopped_at(iteration: int, checkpoints: Path) -> str:
    """How a reward function's error ends: where the run stopped and what is safe (nothing of this iteration was
    written)."""
    last = checkpoint.latest(checkpoints)
    return (f", at iteration {iteration}; stopped before the update, nothing of this iteration written (" +
            (f"the last good checkpoint is {last}: fix the function and continue with resume=true)" if last else
             "no checkpoint yet: fix the function and run again)"))


def collect_rollout(roles: Roles, prompts: list[list[int]], cfg: PPOConfig, device: torch.device,
                    columns: list[dict] | None = None, where: str | Callable[[], str] = "") -> Rollout:
    """Sample one response per prompt, then one forward pass per role (none computed twice), under the training
    forward's precision, and each reward component (the reward functions get the prompt rows' other fields,
    `columns`). The policy's log-probs are computed in the update's micro-batch shape: under bf16 they are then the
    very numbers the first minibatch recomputes (ratio 1, approx-KL 0)."""
    p, t, tok = cfg.ppo, cfg.train, roles.tokenizer
    micro = t.rollout_micro_batch_size
    roles.policy.eval()
    with dev.autocast(device):
        samples = rollout(roles.policy, prompts, p.response_length, p.temperature, micro, tok.pad_token_id,
                          tok.eos_token_id, device, p.rollout_backend)
        prompt_text, response_text = decode(samples, tok)
        with torch.no_grad():  # not inference mode: sharded (FSDP) weights gathered in it could not train after
            rewards = roles.rewards
            raw = rewards.model_scores(samples, prompt_text, response_text, micro) if rewards.scorers else None
            components = rewards.components(samples, prompt_text, response_text, columns or [{} for _ in prompts],
                                            micro, where, model_scores=raw)
            roll = Rollout(**vars(samples),
                           logprobs=response_logprobs(roles.policy, samples, p.temperature, t.micro_batch_size),
                           ref_logprobs=(response_logprobs(roles.reference, samples, p.temperature, micro)
                                         if roles.reference is not None else None),
                           values=response_values(roles.value, samples, micro) if roles.value is not None else None,
                           scores=rl_reward.weighted_sum(components, roles.rewards.weights),
                           prompt_text=prompt_text, response_text=response_text, components=components,
                           members=rewards.standardised(raw) if rewards.is_ensemble else None)
    roles.policy.train()
    return constants(roll)


def check_rollout(guard: Guard, iteration: int, roll: Rollout, reward_paths: list[str]) -> None:
    """Stop before a non-finite score, log-prob or value turns into rewards, advantages and an update (the reward
    functions' values were checked as they returned)."""
    if rf.REWARD_MODEL in roll.components:
        guard.require_finite(iteration, "reward model's score", roll.components[rf.REWARD_MODEL],
                             hint=f"the reward model ({', '.join(reward_paths)}) gives NaN/inf scores for these "
                                  f"responses: check it, or re-train it (`rlhf reward ... overwrite=true`)")
    if roll.ref_logprobs is not None:
        guard.require_finite(iteration, "reference log-prob", roll.ref_logprobs,
                             hint="the reference (the SFT policy) gives non-finite log-probs: check the SFT artifact")
    guard.require_finite(iteration, "policy log-prob (and so the KL)", roll.logprobs)
    if roll.values is not None:
        guard.require_finite(iteration, "value model's estimate", roll.values)


@dataclass
class Shaped:
    """What the update optimises, derived from a rollout."""
    scores: torch.Tensor             # [B] the score maximised: normalised, clipped, missing-EOS penalty applied
    kl: torch.Tensor | None          # [B, R] per-token KL estimate to the reference, 0 on padding (None: no reference)
    advantages: torch.Tensor         # [B, R] from ppo.advantage's estimator (GAE: whitened over the rollout)
    returns: torch.Tensor | None     # [B, R] the value targets (GAE only: advantages + values, before whitening)
    zero_std: torch.Tensor | None    # [B] bool: the row's group of k scored all alike (None: k = 1)
    keep: torch.Tensor | None        # [B] float: 1 on the rows the update uses (None: all of them): not the
                                     # left-out zero-std groups, not the rows no reward component applied to
    kl_loss_coef: float              # β of the KL loss term (ppo.kl_penalty=loss), else 0


def shape_rewards(roll: Rollout, kl_coef: float, p: PPOAlgoConfig, rewards: rf.Rewards) -> Shaped:
    """Reward components -> the score (the reward model's normalised with its held-out statistics when
    ppo.normalize_scores, then reward.aggregation: a weighted sum by default), clipped, the missing-EOS penalty ->
    the advantages of ppo.advantage's estimator (rl/advantages.py), with the KL penalty in the reward (−β·KL per
    token) or kept for the loss (ppo.kl_penalty); zero-std groups counted, and left out when asked; rows no
    component applies to left out."""
    components = dict(roll.components)
    if p.normalize_scores and not rewards.is_ensemble:  # an ensemble's members are standardised already
        stats = rewards.scorer.model.score_stats
        components[rf.REWARD_MODEL] = rl.normalize_scores(components[rf.REWARD_MODEL], stats["mean"], stats["std"])
    scores = rl_reward.COMBINE[rewards.aggregation](components, rewards.weights, p.samples_per_prompt)
    if p.score_clip is not None:
        scores = scores.clamp(-p.score_clip, p.score_clip)
    scores = rl.apply_missing_eos_penalty(scores, roll.ended, p.missing_eos_penalty)
    kl = None if roll.ref_logprobs is None else rl.kl_per_token(roll.logprobs, roll.ref_logprobs,
                                                                 p.kl_estimator) * roll.mask
    in_reward = p.kl_penalty == "reward" and kl is not None
    advantages, returns = adv.ESTIMATORS[p.advantage].fn(adv.Inputs(
        scores, kl if kl is not None else torch.zeros_like(roll.mask), roll.mask, kl_coef if in_reward else 0.0,
        p.samples_per_prompt, roll.values, p.gamma, p.lam, p.whiten_rewards, p.scale_rewards))
    zero_std = adv.zero_std_groups(scores, p.samples_per_prompt) if p.samples_per_prompt > 1 else None
    keep = ~zero_std if p.skip_zero_std_groups else None
    if rewards.functions:  # only a function can leave a row unscored (None); the reward model scores every row
        unscored = rl_reward.unscored(components)
        keep = ~unscored if keep is None else keep & ~unscored
    return Shaped(scores, kl, advantages, returns, zero_std, None if keep is None else keep.to(roll.mask.dtype),
                  0.0 if in_reward else kl_coef)


def ppo_update(wrapped: list, roll: Rollout, shaped: Shaped, training: train.Training, step: int, cfg: PPOConfig,
               shape: BatchShape, d: dist.Dist, device: torch.device) -> list[dict]:
    """num_ppo_epochs passes over the rollout in a seeded order, one optimizer step per minibatch (accumulated over
    micro-batches); returns every micro-batch's statistics."""
    p, stats = cfg.ppo, []
    train_policy, train_value = wrapped[0], (wrapped[1] if len(wrapped) > 1 else None)
    mask = roll.mask if shaped.keep is None else roll.mask * shaped.keep.unsqueeze(-1)
    for epoch in range(p.num_ppo_epochs):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 101 + epoch)
        perm = torch.randperm(shape.local_rollout, generator=g)
        for mb in range(p.num_mini_batches):
            mb_loss = torch.zeros((), device=device)
            rows = perm[mb * shape.local_minibatch:(mb + 1) * shape.local_minibatch]
            reduce = step_reduce(mask[rows], p, d, device)
            for idx, last in train.micro_batches(rows, shape.micro):
                with train.micro_step(wrapped, last, device):
                    loss, s = ppo_loss(train_policy, train_value, roll, idx, mask[idx], shaped, p, reduce)
                    loss.backward()
                stats.append(s)
                mb_loss += loss.detach()
            mb_loss = dist.all_sum(d, [float(mb_loss)], device)[0] / d.world_size
            train.take_step(training, step + 1, mb_loss)
    return stats


def step_reduce(mask: torch.Tensor, p: PPOAlgoConfig, d: dist.Dist, device: torch.device):
    """reduce(per_token, mask) for the micro-batches of one optimizer step whose rows' masks are `mask`: rl.aggregate
    with ppo.loss_aggregation, normalised over the whole step (every micro-batch, every process), so the summed
    micro-batch losses give one gradient however the step is split."""
    norm = dist.all_sum(d, [rl.loss_normaliser(mask, p.loss_aggregation)], device)[0]
    norm = max(norm, 1.0) / d.world_size  # the processes' gradients are averaged: each holds 1/world of the sum
    return lambda x, m: rl.aggregate(x, m, p.loss_aggregation, norm, p.response_length)


def ppo_loss(policy, value_model, roll: Rollout, idx, mask: torch.Tensor, shaped: Shaped, p: PPOAlgoConfig,
             reduce) -> tuple[torch.Tensor, dict]:
    """L = L_clip(policy) + vf_coef * L_clip(value) - entropy_coef * entropy (+ β_loss * KL), on micro-batch rows
    `idx` (their `mask`), each term reduced over the optimizer step by `reduce`; no value term without a value model,
    no KL term unless ppo.kl_penalty=loss."""
    logp, token_entropy = rl.logprobs_and_entropy(policy_logits(policy, roll, idx), roll.response[idx], p.temperature)
    pg_loss, pg = rl.policy_loss(logp, roll.logprobs[idx], shaped.advantages[idx], mask, p.cliprange,
                                 p.cliprange_high, reduce)
    entropy_term = p.entropy_coef * reduce(token_entropy, mask)
    stats = {"policy_loss": pg_loss.detach(), "entropy": rl.masked_mean(token_entropy, mask).detach(),
             "approx_kl": pg["approx_kl"].detach(), "clipfrac": pg["clipfrac"].detach()}
    if value_model is None:
        loss = pg_loss - entropy_term
    else:
        values = value_slice(value_model, roll, idx)
        vf_loss, vf = rl.value_loss(values, roll.values[idx], shaped.returns[idx], mask, p.cliprange_value, reduce)
        loss = pg_loss + p.vf_coef * vf_loss - entropy_term
        stats |= {"value_loss": vf_loss.detach(), "vf_clipfrac": vf["vf_clipfrac"].detach()}
    if p.kl_penalty == "loss" and roll.ref_logprobs is not None:
        kl_loss = reduce(rl.kl_per_token(logp, roll.ref_logprobs[idx], p.kl_estimator), mask)
        loss = loss + shaped.kl_loss_coef * kl_loss
        stats["kl_loss"] = kl_loss.detach()
    return loss, stats


def iteration_metrics(roll: Rollout, shaped: Shaped, stats: list[dict], kl_coef: float, gold, seconds: dict,
                      p: PPOAlgoConfig, d: dist.Dist, device: torch.device) -> dict:
    """The iteration's numbers over all ranks, reduced by name: per-response means of the rollout (score, KL,
    length, ...), the mean of every micro-batch statistic of the update, the approx-KL of the first minibatch (0
    when the rollout's and the update's log-probs share their numerics), the value model's explained variance, and
    response tokens per second of the rollout and of the update (tokens x epochs); with reward functions, each
    reward component's mean, std and share of None (engine.reward_functions.component_metrics)."""
    seq_kl = None if shaped.kl is None else (shaped.kl * roll.mask).sum(1)
    functions = set(roll.components) - {rf.REWARD_MODEL}
    parts = dist.all_sum_named(d, rf.component_stats(roll.components), device) if functions else {}
    golds = [gold(pr, rs) for pr, rs in zip(roll.prompt_text, roll.response_text)] if gold else None
    sums = dist.all_sum_named(d, {
        "n": float(len(roll.scores)), "score": float(roll.scores.sum()), "score_penalised": float(shaped.scores.sum()),
        **({"kl": float(seq_kl.sum()), "rlhf_reward": float((shaped.scores - kl_coef * seq_kl).sum())}
           if seq_kl is not None else {}),
        "response_length": float(roll.mask.sum(1).sum()), "stop_rate": float(roll.ended.sum()),
        "gold": float(sum(golds)) if golds else 0.0, "tokens": float(roll.mask.sum()),
        **({"zero_std_groups": float(shaped.zero_std.sum())} if shaped.zero_std is not None else {}),
        **({"ensemble_score": float(roll.components[rf.REWARD_MODEL].sum()), **rf.ensemble_metrics(roll.members)}
           if roll.members is not None else {})}, device)
    first = stats[:len(stats) // (p.num_ppo_epochs * p.num_mini_batches)]   # epoch 1's first minibatch: ratio 1
    means = {k: float(torch.stack([s[k] for s in stats]).mean()) for k in stats[0]}
    means["first_minibatch_approx_kl"] = float(torch.stack([s["approx_kl"] for s in first]).mean())
    means = dist.all_sum_named(d, means, device)
    n, tokens = sums.pop("n"), sums.pop("tokens")
    out = {k: v / n for k, v in sums.items() if k != "gold"}
    out |= {"kl_coef": kl_coef, **{k: v / d.world_size for k, v in means.items()},
            **({"explained_variance": float(rl.explained_variance(roll.values, shaped.returns, roll.mask))}
               if roll.values is not None else {}),
            "rollout_tokens_per_s": tokens / seconds["rollout"],
            "update_tokens_per_s": tokens * p.num_ppo_epochs / seconds["update"]}
    if golds:
        out["gold"] = sums["gold"] / n
    return out | rf.component_metrics(parts, n)


def record(loop: Counters, roll: Rollout, gold, log: MetricsLog, cfg: PPOConfig, work_dir: Path, d) -> None:
    """metrics.jsonl at the log cadence; a few samples to samples.jsonl at the sample cadence (and iteration 1)."""
    t = cfg.train
    if train.due(loop.step, t.log_every, t.max_steps):
        log.log(loop.step, loop.last)
    if d.is_main and (train.due(loop.step, t.sample_every, t.max_steps) or loop.step == 1):
        functions = [name for name in roll.components if name != rf.REWARD_MODEL]
        rows = [{"step": loop.step, "prompt": roll.prompt_text[i], "response": roll.response_text[i],
                 "score": float(roll.scores[i]), **({"gold": gold(roll.prompt_text[i], roll.response_text[i])}
                                                    if gold else {}),
                 **({"rewards": {k: rf.value_or_none(roll.components[k][i]) for k in roll.components}}
                    if functions else {})}
                for i in range(min(4, len(roll.response_text)))]
        append_jsonl(work_dir / "samples.jsonl", rows)


def progress_text(last: dict) -> str:
    return metrics_text({"score": last["score"], **{k: last[k] for k in ("kl", "gold") if k in last},
                         "len": last["response_length"], "approx_kl": last["approx_kl"], "clip": last["clipfrac"]})


# ---- save -------------------------------------------------------------------------------------------------------

def final_metrics(loop: Counters, guard: Guard) -> dict:
    first = loop.first or {}
    return {"iterations": loop.step, "skipped_steps": guard.skipped, **{f"final_{k}": v for k, v in loop.last.items()},
            **{f"first_{k}": first[k] for k in ("score", "kl", "gold", "response_length", "stop_rate") if k in first}}


def publish(cfg: PPOConfig, paths: Upstream, roles: Roles, policy, metrics: dict, kl_coef: float, data: dict,
            work_dir: Path) -> None:
    """The policy artifact from `policy` (engine.train.published: the trained policy with its full weights)."""
    manifest = artifacts.build_manifest(
        stage="ppo", kind="policy", config=asdict(cfg), base_model=paths.policy, tokenizer=roles.tokenizer,
        metrics=metrics, parents=paths.parents,
        extra={"ppo": {"reward_model": (paths.reward[0] if len(paths.reward) == 1 else paths.reward) or None,
                       "reward_aggregation": cfg.ppo.reward_aggregation if roles.rewards.is_ensemble else None,
                       "same_tokenizer_as_reward":
                       roles.rewards.scorer.same_tokens if roles.rewards.scorer is not None else None,
                       "final_kl_coef": kl_coef},
               "rewards": {"components": roles.rewards.names, "weights": roles.rewards.weights,
                           "functions": {f.name: f.spec for f in roles.rewards.functions},
                           "aggregation": roles.rewards.aggregation}, "data": data})

    def save(tmp: Path) -> None:  # with LoRA: the adapters merged into the SFT weights (loaded again in fp32)
        policy_cfg = ModelConfig(name_or_path=paths.policy, trust_remote_code=cfg.model.trust_remote_code)
        plain = lora.merged(policy, reload=lambda: load_causal_lm(policy_cfg, torch.device("cpu"), dropout=False)[0])
        plain.save_pretrained(tmp, safe_serialization=True)
        roles.tokenizer.save_pretrained(tmp)

    artifacts.publish(work_dir, save, manifest, Path(cfg.run_dir), save_adapter=lora.adapter_writer(policy))


def show_summary(con, first: dict, last: dict, run_dir: Path, pngs: list[Path]) -> None:
    table = Table(title="ppo summary (training rollouts)", title_justify="left")
    for col in ("metric", "first iteration", "last iteration"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    components = [k for k in last if k.startswith("reward/")]
    for key in ("score", *components, "gold", "kl", "rlhf_reward", "response_length", "stop_rate", "entropy",
                "approx_kl", "first_minibatch_approx_kl", "clipfrac", "value_loss", "explained_variance", "kl_loss",
                "zero_std_groups", "rollout_tokens_per_s", "update_tokens_per_s"):
        if key in last:
            table.add_row(key, f"{first.get(key, float('nan')):.4g}", f"{last[key]:.4g}")
    con.print(table)
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()[-4:]]
    if samples:
        shown = Table(title=f"samples (iteration {samples[-1]['step']})", title_justify="left")
        for col in ("prompt", "response", "score", *(["gold"] if "gold" in samples[0] else [])):
            shown.add_column(col, justify="right" if col in ("score", "gold") else "left", overflow="fold")
        for row in samples:
            cells = [row["prompt"][-60:], row["response"][:80], f"{row['score']:.3g}"]
            shown.add_row(*cells, *([f"{row['gold']:.3g}"] if "gold" in row else []))
        con.print(shown)
    con.print(summary_table("artifact", {"policy": str(run_dir / "model"), "samples": str(run_dir / "samples.jsonl"),
                                         **charts_row(pngs, run_dir)}))
