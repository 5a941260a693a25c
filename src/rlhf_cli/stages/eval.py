"""`rlhf eval`: compare policies on held-out prompts (the measurement after stage 3 of InstructGPT).

Reads top to bottom: set up (load the reward functions and resolve every model before anything loads, check
that the policies share the reference's tokenizer, load the reference and the reward model, encode the held-out
prompts), loop over policies (one seeded rollout each, then per-prompt numbers; for a PPO or DPO run directory also
its kept checkpoints), save (eval.json, the tables).

Every policy answers the same prompts, n = samples_per_prompt responses each (each prompt repeated n times in a
row), sampled with the same seed (`torch.manual_seed(seed)` before each rollout) as PPO samples: plain
temperature sampling with the KV cache, at most response_length tokens, everything after EOS dropped. Per
response:
- reward/<name>: each component of the reward (engine.reward_functions.Rewards): `reward_model`, the learned
  reward model's score of prompt + response (the proxy PPO optimised; re-tokenised text when the reward model's
  tokenizer is not the policy's), and each function of reward.functions (NaN where it returned None);
- score: the components combined as PPO combines them, rl.reward.COMBINE[reward.aggregation] with
  reward.weights (sum: score = sum_c w_c * r_c over the components that apply);
- gold: the built-in task's hidden gold score (data.path=null only), what the proxy stands in for;
- kl: sum over response tokens of logp_policy - logp_ref (k1), both at the sampling temperature, on the policy's
  own samples: an unbiased estimate of the sequence-level KL(policy || reference);
- response_length: response tokens (EOS included); stop_rate: 1 if the response ended with EOS.
Per prompt, each is the mean over the prompt's n responses (a function's over those it applied to; a prompt where
it applied to none is left out of that mean), and win_rate is 1 if the prompt's mean score > the first policy's,
0.5 on a tie, else 0. Each metric is reported as the mean over prompts with its standard error std / sqrt(m)
(sample std, m prompts).

pass@k: for a per-response quantity that is 0/1 wherever it applies (a checker such as exact_match, the arith
task's gold), pass@k/<name> for k = 1, 2, 4, ... and n: per prompt the unbiased estimator of Chen et al. (2021)
from its c correct of n responses (`pass_at_k`), then mean and standard error over prompts.

Over-optimisation curve (Gao et al. 2022): a PPO or DPO run directory keeps `train.keep_checkpoints` checkpoints
(checkpoints/step-N/policy.safetensors); once the policy itself is measured, each is loaded into its module
(safetensors, through engine.checkpoint) and evaluated like a policy, giving (KL, proxy score, gold score) per
step, with the reference (the SFT policy) as step 0 at KL 0. As the KL grows the proxy keeps rising while gold
rises, then falls: the reward model is being exploited.

eval.json is a report, not a model artifact: a re-run replaces it (there is no overwrite=true to pass).
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from omegaconf import OmegaConf
from rich import box
from rich.console import Console
from rich.table import Table

from rlhf_cli import artifacts, charts
from rlhf_cli.charts import abbreviate
from rlhf_cli.config import EvalConfig, LoraConfig, ModelConfig, absolute_path
from rlhf_cli.data import tasks
from rlhf_cli.data.prompts import encode_prompts
from rlhf_cli.engine import batches, checkpoint, device as dev, dist, rundir, train
from rlhf_cli.engine.logging import charts_row, console, metrics_text, progress_bar, summary_table
from rlhf_cli.engine.reward_functions import (REWARD_MODEL, RewardFunction, Rewards, check_ensemble_stats,
                                              ensemble_spread, load_all, make_rewards, value_or_none,
                                              wants_reward_model, weights_for)
from rlhf_cli.engine.reward_functions import find_reward_models as find_reward_paths
from rlhf_cli.engine.trackers import Trackers
from rlhf_cli.engine.rollout import Scorer, decode, response_logprobs, sample
from rlhf_cli.errors import ArtifactError, RewardFunctionError
from rlhf_cli.models import lora
from rlhf_cli.models.loading import check_source, load_causal_lm, load_frozen_lm, load_tokenizer, same_tokenizer
from rlhf_cli.models.reward import load_frozen_reward_model
from rlhf_cli.rl.reward import COMBINE
from rlhf_cli.stagespec import SPECS, pipeline_order

NUM_SAMPLES = 4  # responses per policy kept in eval.json, to read what the numbers mean


def run(cfg: EvalConfig) -> dict:
    """Under torchrun each process measures its share of the prompts (`strategy=fsdp`: with every model sharded)
    and rank 0 writes the report."""
    with train.process(cfg.device, "auto", cfg.strategy) as (d, device):
        report = compare(cfg, d, device)
        dist.barrier(d)
        return report


def compare(cfg: EvalConfig, d: dist.Dist, device) -> dict:
    con = console(d.is_main)
    # ---- set up: the reward functions loaded and every model resolved before anything loads (a missing one names
    # the command to run, in the pipeline's order: sft, reward, ppo), then tokenizers checked, then the judge
    # (reference, reward model, reward functions) ----------------------------------------------------------------
    functions = load_all(cfg.reward.functions) or gold_instead(cfg)  # the user's code: a bad spec stops us here
    reference_path, _ = find_upstream(cfg.reference, cfg, "sft", "policy", "reference")
    reward_paths = find_reward_models(cfg, functions)
    policies = resolve_policies(cfg)
    check_tokenizers(policies, reference_path)
    judge = load_judge(cfg, reference_path, reward_paths, functions, device, d)
    prompts, columns, source = tasks.eval_prompts(cfg.data, cfg.num_prompts, judge.tokenizer)
    prompt_ids, cut = encode_prompts(prompts, judge.tokenizer, cfg.data.max_seq_len - cfg.response_length)
    if d.is_main:
        open_run_dir(Path(cfg.run_dir), cfg)
    curve_points = {pol["name"]: kept_checkpoints(pol) if cfg.checkpoints else [] for pol in policies}
    con.print(f"[bold]rlhf eval[/bold] -> {cfg.run_dir}")
    con.print(f"{len(policies)} policies (baseline {policies[0]['name']}) on {len(prompts)} held-out prompts from "
              f"{source} ({cut} cut to {cfg.data.max_seq_len - cfg.response_length} tokens): "
              f"{responses_each(cfg.samples_per_prompt)}, seed {cfg.seed}, temperature {cfg.temperature}, at most "
              f"{cfg.response_length} tokens; {device}, {str(judge.reference.dtype).removeprefix('torch.')}" +
              (f", {d.world_size} processes ({cfg.strategy})" if d.enabled else ""))
    con.print(f"{describe_rewards(judge.rewards, reward_paths)}; KL to the reference {reference_path}")

    # ---- loop over policies (and a PPO run's checkpoints) --------------------------------------------------
    distinct = {pol["model"] for pol in policies} | {str(path) for pts in curve_points.values() for _, path in pts}
    distinct |= {reference_path} if any(curve_points.values()) else set()
    with progress_bar(con) as bar:
        task = bar.add_task("eval", total=len(distinct), metrics="")

        def shown(label: str, per_prompt: dict) -> None:
            means = {k: float(v.mean()) for k, v in per_prompt.items() if k in ("score", "gold", "kl")}
            bar.update(task, advance=1, metrics=f"{label}: {metrics_text(means)}")

        results, curves = measure_policies(policies, curve_points, judge, (prompt_ids, columns), reference_path,
                                           cfg, device, d, shown)

    # ---- save: eval.json (replaced on every run), the tables ----------------------------------------------
    scorer = judge.rewards.scorer
    report = {"stage": "eval", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "experiment": cfg.experiment,
              "baseline": policies[0]["name"], "reference": reference_path,
              "reward_model": reward_paths[0] if len(reward_paths) == 1 else (reward_paths or None),
              "reward_same_tokenizer": scorer.same_tokens if scorer is not None else None,
              "rewards": {"functions": [rf.spec for rf in judge.rewards.functions], "weights": judge.rewards.weights,
                          "aggregation": judge.rewards.aggregation,
                          **({"ensemble_members": judge.rewards.members, "ensemble_aggregation":
                              judge.rewards.ensemble, "uwo_coef": judge.rewards.uwo_coef}
                             if judge.rewards.is_ensemble else {})},
              "prompts": {"source": str(source), "count": len(prompts), "cut": cut,
                          "samples_per_prompt": cfg.samples_per_prompt},
              "policies": results, "curves": curves, "config": asdict(cfg), "versions": artifacts.package_versions()}
    if d.is_main:
        save_report(con, cfg, report, judge.gold is not None)
    return report


# ---- set up -----------------------------------------------------------------------------------------------------

def find_upstream(name: str | None, cfg: EvalConfig, stage: str, kind: str, key: str,
                  value: str = "<model or run directory>") -> tuple[str, dict | None]:
    """artifacts.upstream with the path made absolute (against the cwd), its hints naming eval's own `key`."""
    model, parent = artifacts.upstream(absolute_path(name), cfg.root, cfg.experiment, stage, kind, cfg.artifact_check,
                                       key, value)
    check_source(model, key)   # a model directory or hub id given instead must be there
    return model, parent


def gold_instead(cfg: EvalConfig) -> list[RewardFunction]:
    """The built-in task's gold function as the score when nothing else can score: no reward functions, no
    reward.model, and no reward artifact in the experiment (`rlhf pipeline stages=sft,dpo,eval`); else []."""
    if not tasks.is_builtin(cfg.data) or cfg.reward.model is not None or \
            wants_reward_model(None, ["gold"], cfg.root, cfg.experiment):
        return []
    from rlhf_cli import rewards

    return [RewardFunction("gold", "rlhf_cli.rewards:gold (no reward model in the experiment)", rewards.gold)]


def find_reward_models(cfg: EvalConfig, functions: list[RewardFunction]) -> list[str]:
    """The reward models' paths (one; an ensemble's members, from an ensemble artifact or a list in reward.model),
    or [] when none scores (reward.model=none, or reward functions alone and no reward artifact in the experiment);
    reward.weights checked against the components, all before anything loads."""
    wanted = wants_reward_model(cfg.reward.model, [f.spec for f in functions], cfg.root, cfg.experiment)
    configured = cfg.reward.model
    configured = [absolute_path(v) for v in configured] if isinstance(configured, list) else absolute_path(configured)
    paths = find_reward_paths(configured, cfg.root, cfg.experiment, cfg.artifact_check, "reward.model",
                              together=cfg.strategy != "fsdp")[0] if wanted else []
    weights_for([*([REWARD_MODEL] if wanted else []), *(rf.name for rf in functions)], cfg.reward.weights)
    return paths


def resolve_policies(cfg: EvalConfig) -> list[dict]:
    """Each policy: name (as shown), path (as given, made absolute), model (what from_pretrained loads), stage
    and run_dir when it is a finished run directory. Default: this experiment's policy stages
    that stagespec marks eval_policy (sft, then ppo and dpo), in pipeline order: the first always, the others
    that the experiment has finished (ppo when it has none: the missing artifact names the command to run)."""
    if cfg.policies:  # (name, path, the stage a wrong-kind hint points at)
        specs = [(spec, spec, "ppo") for spec in cfg.policies]
    else:
        first, *later = [stage for stage in pipeline_order() if SPECS[stage].eval_policy]  # sft; ppo, dpo
        done = [s for s in later if artifacts.is_finished(artifacts.stage_dir(cfg.root, cfg.experiment, s))]
        specs = [(f"{cfg.experiment}/{stage}", None, stage) for stage in [first, *(done or later[:1])]]
    policies, names = [], set()
    for name, spec, stage in specs:
        path = absolute_path(spec)
        if path is not None and Path(path).is_dir() and not (Path(path) / artifacts.MANIFEST).is_file() \
                and not (Path(path) / "config.json").is_file():
            raise ArtifactError(f"policy {name}: {path} holds neither a finished artifact (no "
                                f"{artifacts.MANIFEST}) nor a Hugging Face model (no config.json)",
                                hint="finish that run first (`rlhf <stage> ... resume=true`), or pass a finished run "
                                     "directory, a model directory or builtin:tiny")
        model, parent = find_upstream(path, cfg, stage, "policy", "policies", "[<run directory>,...]")
        name = name if name not in names else f"{name} #{len(policies) + 1}"
        names.add(name)
        policies.append({"name": name, "path": parent["path"] if parent else path, "model": model,
                         "stage": parent["stage"] if parent else None,
                         "run_dir": parent["path"] if parent else None})
    return policies


CURVE_STAGES = ("ppo", "dpo")  # the stages whose kept checkpoints hold a `policy`: an over-optimisation curve each


def kept_checkpoints(pol: dict) -> list[tuple[int, Path]]:
    """(step, directory) of the kept checkpoints of a PPO or DPO run directory that hold the policy's weights,
    oldest first (none for other policies)."""
    if pol["stage"] not in CURVE_STAGES:
        return []
    root = Path(pol["run_dir"]) / "checkpoints"
    steps = [(s, root / f"step-{s}") for s in checkpoint.list_steps(root)]
    return [(s, path) for s, path in steps
            if (path / "policy.safetensors").is_file() or (path / checkpoint.SHARDS).is_dir()]


def check_tokenizers(policies: list[dict], reference_path: str) -> None:
    """Every policy must use the reference's tokenizer: the KL to the reference is per token."""
    reference = load_tokenizer(ModelConfig(name_or_path=reference_path), key="reference")
    for pol in policies:
        other = load_tokenizer(ModelConfig(name_or_path=pol["model"]), key="policies")
        if not same_tokenizer(reference, other):
            raise ArtifactError(
                f"policy {pol['name']} does not share the reference's tokenizer ({pol['model']}: vocab "
                f"{len(other)}, eos {other.eos_token_id}; reference {reference_path}: vocab "
                f"{len(reference)}, eos {reference.eos_token_id})",
                hint="the KL to the reference is per token, so every policy must use the reference's tokenizer: "
                     "pass reference=<the SFT run directory the policies started from>")


@dataclass(frozen=True)
class Judge:
    """What measures a policy's responses: the rewards (reward model and reward functions), the KL to the
    reference, and on the built-in task the hidden gold score."""
    reference: torch.nn.Module       # the frozen SFT policy
    tokenizer: object                # the reference's (and so every policy's) tokenizer
    rewards: Rewards                 # the frozen reward model (or None), the reward functions, their weights
    gold: Callable[[str, str], float] | None

    @property
    def checkable(self) -> list[str]:
        """The per-response keys that may be 0/1 checks, for pass@k: every function's component, the gold score."""
        return [*(f"reward/{rf.name}" for rf in self.rewards.functions), *(["gold"] if self.gold else [])]


def load_judge(cfg: EvalConfig, reference_path: str, reward_paths: list[str], functions: list[RewardFunction],
               device, d: dist.Dist) -> Judge:
    """The reference and the reward models (none, one, or an ensemble's members), frozen, held as `strategy` says
    (sharded under fsdp), with the loaded reward functions."""
    frozen, at = dev.frozen_dtype(cfg.dtype, device), train.load_device(device, cfg)
    reference, tokenizer = load_frozen_lm(reference_path, at, frozen, key="reference")
    train.hold_frozen(reference, d, device, cfg)
    scorers = []
    for path in reward_paths:
        reward_model, reward_tokenizer = load_frozen_reward_model(path, at, frozen, key="reward.model")
        train.hold_frozen(reward_model, d, device, cfg)
        scorers.append(Scorer(reward_model, reward_tokenizer, same_tokenizer(tokenizer, reward_tokenizer),
                              cfg.data.max_seq_len))
    check_ensemble_stats(scorers, reward_paths)
    rewards = make_rewards(scorers, [f.spec for f in functions], cfg.reward.weights, cfg.reward.aggregation, functions,
                           cfg.reward.ensemble_aggregation, cfg.reward.uwo_coef)
    return Judge(reference, tokenizer, rewards, tasks.gold_scorer(cfg.data))


def describe_rewards(rewards: Rewards, reward_paths: list[str]) -> str:
    """What makes the score, as printed: `score = 1 x reward_model + 0.5 x exact_match; reward model <path> (same
    tokens); functions rlhf_cli.rewards:exact_match` (an ensemble: its members' paths)."""
    scorer = rewards.scorer
    how = "same tokens" if scorer is not None and scorer.same_tokens else "re-tokenised text"
    models = (f"{len(reward_paths)} reward models " + ", ".join(reward_paths) if len(reward_paths) > 1 else
              f"{rewards.members} LoRA reward models on one base, {reward_paths[0]}," if rewards.is_ensemble else
              f"reward model {reward_paths[0]}" if reward_paths else "")
    return "; ".join([f"score = {rewards.describe()}",
                      *([f"{models} ({how})"] if scorer is not None else []),
                      *([f"functions {', '.join(rf.spec for rf in rewards.functions)}"] if rewards.functions else [])])


def responses_each(n: int) -> str:
    return "one response each" if n == 1 else f"{n} responses each"


def open_run_dir(run_dir: Path, cfg: EvalConfig) -> None:
    """The eval directory with the resolved config.yaml and Hydra's record, or a StorageError."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        artifacts.write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(asdict(cfg)))
        rundir.write_hydra_record(run_dir)
    except OSError as exc:
        raise artifacts.storage_error(f"the eval directory {run_dir}", exc,
                                      hint="check that it is writable and the disk has free space") from exc


# ---- the loop ---------------------------------------------------------------------------------------------------

class Measured(NamedTuple):
    """One model's numbers: per response ([m * n], a prompt's n responses in a row), per prompt (their means,
    [m]), and the first few samples."""
    per_response: dict[str, torch.Tensor]
    per_prompt: dict[str, torch.Tensor]
    samples: list[dict]


def measure_policies(policies: list[dict], curve_points: dict, judge: Judge, prompts: tuple[list, list],
                     reference_path: str, cfg: EvalConfig, device, d: dist.Dist,
                     shown: Callable[[str, dict], None]) -> tuple:
    """(one result per policy, the over-optimisation curve per PPO run). Each model is measured once (`measured`
    holds them by path; `shown(label, per_prompt)` after each). For a curve, the policy's module (the same
    architecture) takes each checkpoint's weights in turn; the reference is step 0. `prompts`: (token ids, the
    rows' other fields)."""
    measured: dict[str, Measured] = {}

    def measure(key: str, model, label: str) -> Measured:
        if key not in measured:
            measured[key] = evaluate(model, judge, prompts, cfg, device, d, label)
            shown(label, measured[key].per_prompt)
        return measured[key]

    results, curves, baseline = [], {}, None
    for pol in policies:
        model = None if pol["model"] in measured else load_policy(pol["model"], cfg, device, d)
        m = measure(pol["model"], model, pol["name"])
        baseline = m.per_prompt["score"] if baseline is None else baseline
        results.append({k: pol[k] for k in ("name", "path", "model", "stage")} | summarise(m.per_prompt, baseline)
                       | pass_rates(m.per_response, cfg.samples_per_prompt, judge.checkable) | {"samples": m.samples})
        if not curve_points[pol["name"]]:
            continue
        curve = [{"step": 0, "model": reference_path} | summarise(
            measure(reference_path, judge.reference, "reference").per_prompt, baseline)]
        model = curve_model(pol, model, cfg, device, d)
        for step, path in curve_points[pol["name"]]:
            checkpoint.load(path, {"policy": model}, restore_rng=False, check=cfg.artifact_check)
            curve.append({"step": step, "model": str(path)} | summarise(
                measure(str(path), model, f"{pol['name']} step {step}").per_prompt, baseline))
        curves[pol["name"]] = curve
        del model
    return results, curves


def curve_model(pol: dict, model, cfg: EvalConfig, device, d: dist.Dist) -> torch.nn.Module:
    """The module a PPO run's checkpoints load into: the policy's own architecture (loaded when its numbers came
    from the cache); for a LoRA run, whose checkpoints hold only the adapters, its base (the SFT policy the run
    started from) with fresh adapters of the run's shape."""
    manifest = artifacts.read_manifest(Path(pol["run_dir"]))
    lora_cfg = LoraConfig(**manifest["config"]["model"].get("lora", {}))
    if not lora_cfg.r:
        return model or load_policy(pol["model"], cfg, device, d)
    return load_policy(manifest["base_model"], cfg, device, d, lora_cfg)  # the checkpoint sets the adapters


def load_policy(path: str, cfg: EvalConfig, device, d: dist.Dist, lora_cfg: LoraConfig | None = None):
    """A policy to sample from, frozen (with fresh adapters of `lora_cfg`'s shape, for a LoRA run's checkpoints),
    held as `strategy` says."""
    model = load_causal_lm(ModelConfig(name_or_path=path), train.load_device(device, cfg), dropout=False,
                           key="policies")[0]
    model.to(dev.frozen_dtype(cfg.dtype, device))
    if lora_cfg is not None:
        lora.add_adapters(model, lora_cfg, 0)
    return train.hold_frozen(model, d, device, cfg)


def evaluate(model, judge: Judge, prompts: tuple[list, list], cfg: EvalConfig, device, d: dist.Dist,
             label: str) -> Measured:
    """The numbers of one policy (`label` in a reward function's error): per response (1-D CPU tensors: score,
    reward/<component>, gold, kl, response_length, stop_rate), per prompt, and the first few samples. The seed is
    reset first (to seed + rank), so every policy draws the same random numbers. Each process measures a contiguous
    share of the prompts, padded to the same length on every rank (sharded models run their passes together), each
    prompt repeated n = samples_per_prompt times in a row; the numbers come back over all prompts, in order."""
    model.eval()
    torch.manual_seed(cfg.seed + d.rank)
    micro, tok, n = cfg.micro_batch_size, judge.tokenizer, cfg.samples_per_prompt
    share, real = batches.padded_share(list(zip(*prompts)), d.rank, d.world_size)
    prompt_ids, columns = [ids for ids, _ in share for _ in range(n)], [row for _, row in share for _ in range(n)]
    with train.generating(model):
        samples = sample(model, prompt_ids, cfg.response_length, cfg.temperature, micro, tok.pad_token_id,
                         tok.eos_token_id, device)
    prompt_text, response_text = decode(samples, tok)
    with torch.no_grad():
        logp = response_logprobs(model, samples, cfg.temperature, micro)
        ref_logp = response_logprobs(judge.reference, samples, cfg.temperature, micro)
        components, spread = scored(judge.rewards, samples, (prompt_text, response_text, columns), micro,
                                    f" (policy {label})", d)
    score = COMBINE[judge.rewards.aggregation](components, judge.rewards.weights, n)
    mask = samples.mask
    gold = ({"gold": torch.tensor([judge.gold(p, r) for p, r in zip(prompt_text, response_text)],
                                  dtype=torch.float64)} if judge.gold else {})
    per_response = {"score": score.cpu(), **{f"reward/{k}": v.cpu() for k, v in components.items()},
                    **{k: v.cpu() for k, v in spread.items()}, **gold,
                    "kl": ((logp - ref_logp) * mask).sum(1).cpu(), "response_length": mask.sum(1).cpu(),
                    "stop_rate": samples.ended.float().cpu()}
    per_response = dist.concat_over_ranks(d, {k: v[:real * n] for k, v in per_response.items()})
    kept = ["score", *(f"reward/{k}" for k in components), *spread, *gold]
    shown = [{"prompt": prompt_text[i], "response": response_text[i],
              **{k: value_or_none(per_response[k][i]) for k in kept}}
             for i in range(min(NUM_SAMPLES, real * n))]
    return Measured(per_response, by_prompt(per_response, n), shown)


def scored(rewards: Rewards, samples, texts: tuple[list, list, list], micro: int, where: str,
           d: dist.Dist) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(rewards.components, float32; for an ensemble its members' mean and disagreement per response, else {}):
    texts: prompts, responses, the rows' other fields. Every process stops when a reward function failed on any of
    them (one that raised alone would leave the others waiting)."""
    failure, components, spread = None, {}, {}
    raw = rewards.model_scores(samples, *texts[:2], micro) if rewards.scorers else None
    if rewards.is_ensemble:
        spread = {k: v.float() for k, v in ensemble_spread(rewards.standardised(raw)).items()}
    try:
        components = rewards.components(samples, *texts, micro, where, model_scores=raw)
    except RewardFunctionError as exc:
        failure = exc
    if not dist.all_ok(d, failure is None):
        raise failure or RewardFunctionError(f"a reward function failed on another process{where}",
                                             hint="that process's log names the function and the row")
    return {k: v.float() for k, v in components.items()}, spread


def by_prompt(per_response: dict, n: int) -> dict:
    """Per-prompt means of the per-response numbers ([m * n], a prompt's n responses in a row), in float64:

        x_p = (1 / n_p) * sum_j x_pj      over the n_p responses j of prompt p where x applies (not NaN)

    NaN where it applied to none. With n = 1 every number is its response's own."""
    return {k: v.double().reshape(-1, n).nanmean(1) for k, v in per_response.items()}


def mean_se(key: str, values: torch.Tensor) -> dict:
    """{key: mean, key_se: sample std / sqrt(m)} over the m values that are not NaN (NaN when none, 0 error when
    fewer than two)."""
    v = values.double()
    v = v[~torch.isnan(v)]
    return {key: float(v.mean()) if len(v) else math.nan,
            f"{key}_se": float(v.std() / math.sqrt(len(v))) if len(v) > 1 else 0.0}


def summarise(per_prompt: dict, baseline: torch.Tensor) -> dict:
    """Mean and standard error (sample std / sqrt(m)) over prompts of every per-prompt number (over the prompts it
    applies to), plus the win rate against the baseline's per-prompt scores on the same prompts (ties count
    half)."""
    score = per_prompt["score"]
    wins = (score > baseline).double() + 0.5 * (score == baseline).double()
    out = {}
    for key, values in {**per_prompt, "win_rate": wins}.items():
        out |= mean_se(key, values)
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"):
    the chance that at least one of k responses drawn without replacement from n, c of them correct, is correct:

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

    the product form stays finite and accurate where the binomials, as floats, would overflow. 1 when n - c < k
    (every draw holds a correct one); needs 1 <= k <= n."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_ks(n: int) -> list[int]:
    """The k of pass@k reported for n responses per prompt: 1, 2, 4, ... up to n, and n itself."""
    return sorted({2 ** j for j in range(n.bit_length())} | {n})


def pass_rates(per_response: dict, n: int, keys: list[str]) -> dict:
    """pass@k/<name> and pass@k/<name>_se (mean and standard error over prompts of `pass_at_k`, k in pass_ks(n))
    for each per-response quantity of `keys` (reward/<name> or gold) that is 0/1 on every response it applies to:
    per prompt, c correct of the n_p responses where it applies; a prompt with n_p < k is left out of pass@k."""
    out = {}
    for key in keys:
        g = per_response[key].double().reshape(-1, n)
        applies = ~torch.isnan(g)
        values = g[applies]
        if not len(values) or not ((values == 0) | (values == 1)).all():
            continue
        counts, correct = applies.sum(1).tolist(), torch.nan_to_num(g).sum(1).round().long().tolist()
        for k in pass_ks(n):
            per = [pass_at_k(m, c, k) for m, c in zip(counts, correct) if m >= k]
            out |= mean_se(f"pass@{k}/{key.removeprefix('reward/')}", torch.tensor(per, dtype=torch.float64))
    return out


# ---- save -------------------------------------------------------------------------------------------------------

def save_report(con, cfg: EvalConfig, report: dict, with_gold: bool) -> None:
    """eval.json, its charts (engine: rlhf_cli.charts), the trackers of `logger`, the tables."""
    run_dir = Path(cfg.run_dir)
    try:
        artifacts.write_text_atomic(run_dir / "eval.json", artifacts.dumps(report, indent=2) + "\n")
    except OSError as exc:
        raise artifacts.storage_error("eval.json", exc, hint="check that the eval directory is writable and the disk "
                                                              "has free space") from exc
    pngs = charts.draw("eval", run_dir)
    track(cfg, report, run_dir, pngs)
    show_tables(con, report, with_gold, run_dir, pngs)


def track(cfg: EvalConfig, report: dict, run_dir: Path, pngs: list[Path]) -> None:
    """The trackers of `logger`: each over-optimisation curve point at its PPO iteration (<policy>/kl, /score,
    /gold), and every policy's means as the summary (<policy>/<metric>; pass@k as pass_at_k, since MLflow refuses
    an @ in a metric's name)."""
    trackers = Trackers(cfg, run_dir, enabled=True)
    if not trackers.open:
        return
    for name, curve in report["curves"].items():
        for point in curve:
            trackers.log(point["step"], {f"{name}/{k}": point[k] for k in ("kl", "score", "gold") if k in point})
    summary = {f"{row['name']}/{k.replace('@', '_at_')}": v for row in report["policies"] for k, v in row.items()}
    trackers.finish(summary, {"eval": run_dir / "eval.json", "charts": pngs})


def _pm(row: dict, key: str) -> str:
    """mean±standard error: the mean to 3 significant digits, the error to 2 (3.63±0.094); "-" where the row has
    no such number (a function that applied to none of the policy's responses, a quantity that is not 0/1)."""
    if not isinstance(row.get(key), (int, float)) or math.isnan(row[key]):
        return "-"
    return f"{row[key]:#.3g}±{row[key + '_se']:.2g}"


def rendered_width(table: Table) -> int:
    """The characters of the longest line of `table` drawn without a width limit."""
    probe = Console(width=10_000, file=io.StringIO())
    probe.print(table)
    return max(len(line.rstrip()) for line in probe.file.getvalue().splitlines())


def show_tables(con, report: dict, with_gold: bool, run_dir: Path, pngs: list[Path]) -> None:
    """The comparison, the rewards (components and pass@k) and each over-optimisation curve, within the console's
    width (80 columns in a log): the numbers are never cut; the policy names get the room left, a long one losing
    its middle, never its ends (exp_a/ppo and exp_b/ppo stay apart)."""
    columns = ["score", *(["gold"] if with_gold else []), "KL", "length", "stop", "win rate"]
    cells = [[_pm(row, "score"), *([_pm(row, "gold")] if with_gold else []), _pm(row, "kl"),
              f"{row['response_length']:.3g}", f"{row['stop_rate']:.3g}", _pm(row, "win_rate")]
             for row in report["policies"]]
    n = report["prompts"].get("samples_per_prompt", 1)
    con.print(fitted(con, report, lambda names: policy_table(
        f"eval: {report['prompts']['count']} held-out prompts, {responses_each(n)} (mean±standard error); win rate "
        f"vs {names[report['baseline']]}", ["policy", *columns],
        [[names[row["name"]], *numbers] for row, numbers in zip(report["policies"], cells)])))
    rewards = rewards_table(con, report, n)
    proxy = "score" if (report.get("rewards") or {}).get("functions") else "reward model"
    if rewards is not None:
        con.print(rewards)
    ensemble = "ensemble_std" in report["policies"][0]
    if ensemble:
        con.print(ensemble_table(con, report))
    for name, curve in report["curves"].items():
        table = Table(title=f"over-optimisation curve of {abbreviate(name, 48)} (step 0: the reference)",
                      title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True)
        for col in ("step", "KL", f"proxy ({proxy})", *(["member std"] if ensemble else []),
                    *(["gold"] if with_gold else [])):
            table.add_column(col, justify="right")
        for point in curve:
            table.add_row(str(point["step"]), _pm(point, "kl"), _pm(point, "score"),
                          *([_pm(point, "ensemble_std")] if ensemble else []),
                          *([_pm(point, "gold")] if with_gold else []))
        con.print(table)
    con.print(summary_table("report", {"eval.json": str(run_dir / "eval.json"), **charts_row(pngs, run_dir)}))


def ensemble_table(con, report: dict) -> Table:
    """Per policy, what the reward ensemble says of its responses: the aggregated score (as rewards.ensemble_
    aggregation combines the standardised members), the members' mean, and their disagreement (the standard
    deviation across members, averaged over responses): a policy that exploits one member's errors shows it."""
    how = report["rewards"]["ensemble_aggregation"]
    return fitted(con, report, lambda names: policy_table(
        f"reward ensemble ({report['rewards']['ensemble_members']} members, standardised): the {how} the score uses, the "
        f"members' mean and their disagreement", ["policy", f"score ({how})", "members' mean", "member std"],
        [[names[row["name"]], _pm(row, f"reward/{REWARD_MODEL}"), _pm(row, "ensemble_mean"),
          _pm(row, "ensemble_std")] for row in report["policies"]]))


def policy_table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    """A table whose first column names the policy, the others right-aligned numbers that never wrap."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True)
    table.add_column(columns[0], no_wrap=True)
    for col in columns[1:]:
        table.add_column(col, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def fitted(con, report: dict, build: Callable[[dict], Table]) -> Table:
    """build(policy name -> name as shown) with the longest names that keep the table (without its title) within
    the console's width, each at least 12 characters."""
    longest = max(len(row["name"]) for row in report["policies"])

    def names(width: int) -> dict:
        return {row["name"]: abbreviate(row["name"], width) for row in report["policies"]}

    width = longest
    while width > 12 and rendered_width(_untitled(build(names(width)))) > con.width:
        width -= 1
    return build(names(width))


def _untitled(table: Table) -> Table:
    table.title = None
    return table


def rewards_table(con, report: dict, n: int) -> Table | None:
    """Per policy, each reward component's mean over prompts (every component, when there are reward functions)
    and, for n > 1, pass@1 and pass@n of each 0/1 quantity (a function's checks, the gold score). None when there
    is nothing to show."""
    rewards = report.get("rewards") or {}
    components = {name: f"reward/{name}" for name in rewards.get("weights", {})} if rewards.get("functions") else {}
    passing = [name for name in [*components, "gold"]
               if n > 1 and any(f"pass@1/{name}" in row for row in report["policies"])]
    quantities = components | {name: name for name in passing if name not in components}  # name -> its mean's key
    if not quantities:
        return None
    ks = [1, n] if passing else []  # (eval.json has every k of pass_ks)
    rows = [(row, name, key) for row in report["policies"] for name, key in quantities.items()]
    return fitted(con, report, lambda names: policy_table(
        f"rewards: each component's mean over the prompts it applies to"
        + (f"; pass@k (Chen et al. 2021) of the 0/1 ones, {n} responses per prompt" if ks else ""),
        ["policy", "of", "mean", *(f"pass@{k}" for k in ks)],
        [[names[row["name"]], name, _pm(row, key), *(_pm(row, f"pass@{k}/{name}") for k in ks)]
         for row, name, key in rows]))
