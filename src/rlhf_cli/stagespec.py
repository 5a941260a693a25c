"""Every stage, declared once, as plain data: `SPECS[name]`.

The CLI (its stage list, help and dispatch), the config (which schema a stage composes onto, which keys hold paths
to make absolute), `rlhf pipeline` (which stages it runs, in which order, and the headline of each), `rlhf report`
(sections, headline numbers, samples), the sweep table (columns, the metric it ranks by and its direction), the
charts (which series each chart draws) and eval's default policies all read this table; none keeps a list of its own.

Adding a stage touches its spec here, its recipe in `stages/<name>.py` (a `run(cfg)`, or `main(args)` for a command
that is no Hydra app), its `conf/<name>.yaml` (which lists `<name>_schema` first in its defaults), its tests and its
README section. `check` refuses a spec that lacks something a reader needs, when this module is imported.

Import-light on purpose: no torch, no Hydra. Schemas and recipes are named by string and imported where used
(`schema_class`, `module` through importlib).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

SCHEMAS_MODULE = "rlhf_cli.config.schemas"


@dataclass(frozen=True)
class Metric:
    """A final number of a stage: a manifest metric (eval: a field of each policy's row in eval.json)."""

    key: str
    label: str  # as the report shows it
    short: str = ""  # the sweep table's column header (80 columns); "" = not a sweep column
    best: str = ""  # "high" | "low": the direction that ranks a sweep's jobs; "" = none


@dataclass(frozen=True)
class Chart:
    """One PNG in <run dir>/charts/<stem>.png. kind "lines": `series` of metrics.jsonl against the step; any other
    kind is a drawing of the stage's results file that charts.DRAWERS names (eval's "comparison", "curve")."""

    stem: str
    title: str
    series: tuple[tuple[str, str], ...] = ()  # (metrics.jsonl key, legend label)
    ylabel: str = ""
    kind: str = "lines"
    prefix: str = ""  # also one line per metrics.jsonl key that starts with it, labelled by the rest (reward/<name>)


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str  # the recipe: run(cfg) for a Hydra stage, main(args) otherwise
    help: str  # one line, for `rlhf --help` and the stage's own --help header
    schema: Optional[str] = None  # class name in rlhf_cli.config.schemas; None: no Hydra app (pipeline)
    artifact: Optional[str] = None  # the artifact kind in its manifest (policy, reward_model); None: no artifact
    results: str = ""  # "manifest" (manifest.json's metrics) | "eval.json" (one row per policy) | "" (nothing)
    pipeline: Optional[int] = None  # place in `rlhf pipeline` (and in the report); None: not a pipeline stage
    pipeline_default: bool = True  # run by a plain `rlhf pipeline`; False: only when `stages=` names it (dpo)
    path_keys: tuple[str, ...] = ()  # config keys that hold local paths, made absolute once at compose time
    metrics: tuple[str, ...] = ()  # every number its results record: what `objective=` may name (a sweeper's target)
    variant_metrics: tuple[str, ...] = ()  # those of `metrics` that only some settings record (a critic-free PPO run's)
    metric_prefixes: tuple[str, ...] = ()  # families of metrics named at run time (final_reward/<function>)
    headline: tuple[Metric, ...] = ()  # the report's first numbers, in order; the sweep table's columns
    rank_by: tuple[str, ...] = ()  # a sweep's ranking metric: the first of these any job has
    summary: tuple[str, ...] = ()  # the pipeline's one line: str.format pieces, a piece naming an absent key dropped
    charts: tuple[Chart, ...] = ()
    step_unit: str = "optimizer step"  # the charts' x axis
    samples: str = ""  # the samples file in the run directory ("" = none)
    samples_last_step: bool = False  # the report shows the samples of the last step that wrote any
    eval_policy: bool = False  # one of eval's default policies (in pipeline order)

    @property
    def hydra(self) -> bool:
        return self.schema is not None

    def metric(self, key: str) -> Metric:
        return next(m for m in self.headline if m.key == key)


LOOP_PATHS = ("data.path", "data.eval_path")
# PPO's per-iteration quantities (metrics.jsonl); its manifest holds the last iteration's as final_<name>
# reward.ensemble=K's: the members (their mean held-out accuracies) and the ensemble's held-out accuracy as each
# aggregation combines them (min, uwo at λ 0.5; mean is ensemble_eval_accuracy)
ENSEMBLE_METRICS = ("ensemble", "member_eval_accuracy", "member_eval_gold_accuracy", "ensemble_eval_accuracy",
                    "ensemble_eval_gold_accuracy", "ensemble_eval_accuracy_min", "ensemble_eval_accuracy_uwo")
PPO_LOGGED = ("score", "score_penalised", "kl", "rlhf_reward", "response_length", "stop_rate", "kl_coef", "policy_loss",
              "value_loss", "entropy", "approx_kl", "clipfrac", "vf_clipfrac", "first_minibatch_approx_kl",
              "explained_variance", "rollout_tokens_per_s", "update_tokens_per_s", "gold", "lr", "kl_loss",
              "zero_std_groups", "ensemble_score", "ensemble_mean", "ensemble_std")
# ... of which these only with some settings: the value model's (ppo.advantage=gae), the KL loss term
# (ppo.kl_penalty=loss), the share of groups whose k responses all scored alike (ppo.samples_per_prompt > 1), the
# KL and the KL-penalised reward (not without a reference: ppo.kl_coef=0), a reward ensemble's (several reward models)
PPO_VARIANT = ("value_loss", "vf_clipfrac", "explained_variance", "kl_loss", "zero_std_groups", "kl", "rlhf_reward",
               "ensemble_score", "ensemble_mean", "ensemble_std")

SPECS: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec(
        name="sft", module="rlhf_cli.stages.sft", help="fine-tune a pretrained causal LM on demonstrations",
        schema="SFTConfig", artifact="policy", results="manifest", pipeline=1,
        path_keys=("model.name_or_path", *LOOP_PATHS),
        metrics=("steps", "train_loss", "eval_loss_start", "eval_loss", "tokens_per_s", "train_rows", "truncated_rows",
                 "skipped_steps", "gold_score"),
        headline=(Metric("eval_loss_start", "held-out loss before"),
                  Metric("eval_loss", "held-out loss after", "eval loss", "low"),
                  Metric("train_loss", "train loss (last step)", "train loss", "low"),
                  Metric("gold_score", "gold score of samples", "gold", "high"),
                  Metric("steps", "steps")),
        rank_by=("eval_loss",),
        summary=("held-out loss {eval_loss_start:.3g} -> {eval_loss:.3g}",),
        charts=(Chart("loss", "next-token loss", (("loss", "train"), ("eval_loss", "held-out")), "cross-entropy"),
                Chart("grad_norm", "gradient norm (before clipping)", (("grad_norm", "grad norm"),), "L2 norm"),
                Chart("lr", "learning rate", (("lr", "lr"),), "lr")),
        samples="samples.jsonl", eval_policy=True),
    StageSpec(
        name="reward", module="rlhf_cli.stages.reward",
        help="train a reward model on ranked pairs (backbone: the SFT artifact)",
        schema="RewardConfig", artifact="reward_model", results="manifest", pipeline=2,
        path_keys=("model.name_or_path", *LOOP_PATHS),
        metrics=("steps", "train_accuracy", "eval_accuracy", "eval_gold_accuracy", "eval_margin", "eval_loss",
                 "reward_mean", "reward_std", "train_pairs", "eval_pairs", "pairs_per_s", "truncated_pairs",
                 "skipped_steps", "label_noise_ceiling", *ENSEMBLE_METRICS),
        variant_metrics=ENSEMBLE_METRICS,
        headline=(Metric("eval_accuracy", "held-out accuracy", "eval acc", "high"),
                  Metric("eval_gold_accuracy", "held-out accuracy vs gold", "gold acc", "high"),
                  Metric("train_accuracy", "train accuracy", "train acc", "high"),
                  Metric("eval_margin", "held-out margin"),
                  Metric("eval_loss", "held-out loss", "eval loss", "low")),
        rank_by=("eval_accuracy",),
        summary=("held-out accuracy {eval_accuracy:.3g}",),
        charts=(Chart("loss", "pairwise loss -log σ(r_chosen - r_rejected)",
                      (("loss", "train"), ("eval_loss", "held-out")), "loss"),
                Chart("accuracy", "pairwise accuracy", (("accuracy", "train"), ("eval_accuracy", "held-out"),
                                                        ("eval_gold_accuracy", "held-out vs gold")), "accuracy"),
                Chart("margin", "reward margin r_chosen - r_rejected", (("margin", "train"),
                                                                        ("eval_margin", "held-out")), "margin"))),
    StageSpec(
        name="ppo", module="rlhf_cli.stages.ppo", help="optimise the SFT policy against the reward model with PPO",
        schema="PPOConfig", artifact="policy", results="manifest", pipeline=3,
        path_keys=("model.policy", "model.reward", "model.value", *LOOP_PATHS),
        metrics=("iterations", "skipped_steps", *(f"final_{k}" for k in PPO_LOGGED),
                 *(f"first_{k}" for k in ("score", "kl", "gold", "response_length", "stop_rate"))),
        variant_metrics=(*(f"final_{k}" for k in PPO_VARIANT), "first_kl"),
        metric_prefixes=("final_reward/", "final_reward_std/", "final_reward_none/"),
        headline=(Metric("first_score", "score, first iteration"),
                  Metric("final_score", "score, last iteration", "score", "high"),
                  Metric("first_gold", "gold, first iteration"),
                  Metric("final_gold", "gold, last iteration", "gold", "high"),
                  Metric("final_kl", "KL, last iteration", "KL"),
                  Metric("iterations", "iterations")),
        rank_by=("final_gold", "final_score"),
        summary=("score {first_score:.3g} -> {final_score:.3g}", ", kl {final_kl:.3g}"),
        charts=(Chart("score", "score of the training rollouts", (("score", "reward model (proxy)"),
                                                                  ("rlhf_reward", "score - β·KL")), "score"),
                Chart("gold", "gold score of the training rollouts (built-in task)", (("gold", "gold"),),
                      "gold score"),
                Chart("kl", "KL to the reference (per response)", (("kl", "KL"),), "nats"),
                Chart("entropy", "policy entropy (per token)", (("entropy", "entropy"),), "nats"),
                Chart("clipfrac", "clip fractions", (("clipfrac", "policy"), ("vf_clipfrac", "value")), "fraction"),
                Chart("value", "value model", (("value_loss", "value loss"),
                                               ("explained_variance", "explained variance"))),
                Chart("groups", "groups whose k responses all scored alike", (("zero_std_groups", "zero-std groups"),),
                      "fraction"),
                Chart("kl_loss", "KL term of the loss (ppo.kl_penalty=loss)", (("kl_loss", "KL loss"),), "nats"),
                Chart("ensemble", "reward ensemble: standardised members (ppo.reward_aggregation)",
                      (("ensemble_score", "aggregated"), ("ensemble_mean", "members' mean"),
                       ("ensemble_std", "members' std")), "standardised score"),
                Chart("rewards", "reward components of the training rollouts (reward.functions; mean)", (),
                      "raw value", prefix="reward/")),
        step_unit="iteration", samples="samples.jsonl", samples_last_step=True, eval_policy=True),
    StageSpec(
        name="dpo", module="rlhf_cli.stages.dpo",
        help="optimise the SFT policy on ranked pairs with DPO (no reward model)",
        schema="DPOConfig", artifact="policy", results="manifest", pipeline=4, pipeline_default=False,
        path_keys=("model.name_or_path", "model.reference", *LOOP_PATHS),
        metrics=("steps", "train_loss", "train_accuracy", "eval_loss", "eval_accuracy", "eval_margin",
                 "eval_logp_chosen", "eval_logp_rejected", "eval_logp_chosen_start", "kl", "gold", "gold_start",
                 "tokens_per_s", "train_pairs", "eval_pairs", "truncated_pairs", "skipped_steps"),
        variant_metrics=("gold", "gold_start"),
        headline=(Metric("eval_accuracy", "held-out implicit-reward accuracy", "eval acc", "high"),
                  Metric("eval_margin", "held-out implicit-reward margin", "margin", "high"),
                  Metric("kl", "KL to the reference (sampled, held-out prompts)", "KL"),
                  Metric("gold", "gold score of samples", "gold", "high"),
                  Metric("eval_logp_chosen", "held-out log-prob of chosen responses"),
                  Metric("eval_loss", "held-out loss", "eval loss", "low")),
        rank_by=("gold", "eval_accuracy"),
        summary=("held-out accuracy {eval_accuracy:.3g}", ", kl {kl:.3g}", ", gold {gold_start:.3g} -> {gold:.3g}"),
        charts=(Chart("loss", "DPO loss", (("loss", "train"), ("eval_loss", "held-out")), "loss"),
                Chart("accuracy", "implicit-reward accuracy (r_chosen > r_rejected)",
                      (("accuracy", "train"), ("eval_accuracy", "held-out")), "accuracy"),
                Chart("logps", "log-probabilities of the responses (summed over tokens)",
                      (("logp_chosen", "chosen, train"), ("logp_rejected", "rejected, train"),
                       ("eval_logp_chosen", "chosen, held-out"), ("eval_logp_rejected", "rejected, held-out")),
                      "nats"),
                Chart("margin", "implicit-reward margin r_chosen − r_rejected",
                      (("margin", "train"), ("eval_margin", "held-out")), "β·nats"),
                Chart("kl", "KL to the reference on held-out prompts (sampled)", (("kl", "KL"),), "nats"),
                Chart("gold", "gold score of held-out samples (built-in task)", (("gold", "gold"),), "gold score")),
        samples="samples.jsonl", samples_last_step=True, eval_policy=True),
    StageSpec(
        name="eval", module="rlhf_cli.stages.eval",
        help="compare policies on held-out prompts: score, gold, KL, win rate",
        schema="EvalConfig", results="eval.json", pipeline=5,
        path_keys=("reward.model", "reference", *LOOP_PATHS),  # policies stay as typed: they name the table's rows
        headline=(Metric("gold", "gold score", "gold", "high"), Metric("score", "reward-model score", "score", "high"),
                  Metric("kl", "KL to the reference", "KL"), Metric("win_rate", "win rate", "win rate")),
        rank_by=("gold", "score"),
        summary=("{label}: score {score:.3g}", " gold {gold:.3g}±{gold_se:.2g}", " kl {kl:.3g}"),
        charts=(Chart("comparison", "policies on held-out prompts (mean ± standard error)", kind="comparison"),
                Chart("overoptimisation",
                      "over-optimisation: score against KL over PPO iterations and DPO steps (points: step)",
                      kind="curve"))),
    StageSpec(
        name="report", module="rlhf_cli.stages.report",
        help="one HTML page of an experiment: numbers, config, charts, samples", schema="ReportConfig"),
    StageSpec(
        name="pipeline", module="rlhf_cli.stages.pipeline",
        help="sft -> reward -> ppo -> eval for one experiment (stage.key=value)"),
)}


def pipeline_order() -> tuple[str, ...]:
    """The stages `rlhf pipeline` runs (and the report shows), in order."""
    return tuple(s.name for s in sorted((s for s in SPECS.values() if s.pipeline is not None),
                                        key=lambda s: s.pipeline))


def hydra_stages() -> tuple[str, ...]:
    return tuple(name for name, s in SPECS.items() if s.hydra)


def schema_class(name: str) -> type:
    """The dataclass a Hydra stage composes onto."""
    import importlib

    return getattr(importlib.import_module(SCHEMAS_MODULE), SPECS[name].schema)


def check(spec: StageSpec) -> None:
    """A spec that lacks something a reader needs fails here, at import, rather than as a silent gap (a stage with
    no charts, an empty sweep table, no pipeline headline)."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise TypeError(f"stage spec {spec.name!r}: {what}")

    need(spec.name.isidentifier() and spec.module.startswith("rlhf_cli.") and spec.help, "name, module and help")
    need(spec.results in ("", "manifest", "eval.json"), f"results={spec.results!r} is no known results file")
    need(spec.artifact is None or spec.results == "manifest", "an artifact's results are its manifest's metrics")
    need(spec.pipeline is None or (spec.hydra and spec.results), "a pipeline stage is a Hydra stage with results")
    need(spec.results != "manifest" or bool(spec.metrics), "a stage whose manifest records metrics names them")
    need(set(spec.variant_metrics) <= set(spec.metrics), "its variant metrics are among its metrics")
    need(spec.results != "manifest" or {m.key for m in spec.headline} <= set(spec.metrics),
         "its headline metrics are among its metrics")
    if spec.results:
        keys = {m.key for m in spec.headline}
        need(bool(spec.headline) and bool(spec.summary) and bool(spec.charts),
             "a stage with results declares its headline metrics, its pipeline summary and its charts")
        need(any(m.short for m in spec.headline), "a stage with results has sweep columns (Metric.short)")
        need(bool(spec.rank_by) and all(k in keys and spec.metric(k).best in ("high", "low") for k in spec.rank_by),
             "rank_by names headline metrics that have a direction (best=high|low)")
    need(all(m.best in ("", "high", "low") for m in spec.headline), "Metric.best is high, low or empty")
    need(all(c.kind != "lines" or c.series or c.prefix for c in spec.charts), "a line chart has series")
    need(not spec.samples_last_step or bool(spec.samples), "samples_last_step needs a samples file")
    need(not spec.eval_policy or spec.artifact == "policy", "eval's default policies are policy artifacts")


for _spec in SPECS.values():
    check(_spec)
if len({s.pipeline for s in SPECS.values() if s.pipeline is not None}) != len(pipeline_order()):
    raise TypeError("two stage specs share a pipeline position")
