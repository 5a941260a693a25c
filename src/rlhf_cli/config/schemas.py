"""Every knob of every stage as a typed dataclass field, its default here, and the rules of each schema beside it.

Hydra composes `conf/<stage>.yaml` on top of the stage's schema (SCHEMAS, registered by config.compose), and
`finalize` turns the result into one of these objects and calls its `validate()` once. A rule lives with the fields
it reads:
- per-class tables, `CHOICES` (a field's allowed values), `POSITIVE` (> 0) and `NON_NEGATIVE` (>= 0), checked by
  `check_fields` wherever the class sits in a stage's tree, so a message names the key as the user types it
  (`train.device` for sft, reward and ppo, `device` at eval's top level); a subclass adds to its bases' tables;
- cross-field rules in a `validate` method; a stage's `validate` calls its parts'.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar, Optional

from omegaconf import MISSING

from rlhf_cli.artifacts import check_experiment
from rlhf_cli.errors import ConfigError
from rlhf_cli.stagespec import SPECS

BUILTIN_TINY = "builtin:tiny"
NO_REWARD_MODEL = "none"  # model.reward=none (ppo), reward.model=none (eval): reward functions alone


@dataclass
class TinyModelConfig:
    """Size of the built-in tiny Llama (used when `model.name_or_path=builtin:tiny`)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 256
    seed: int = 0


@dataclass
class LoraConfig:
    """LoRA adapters (peft): train low-rank updates W + (alpha / r) * B A of the chosen linear layers instead of
    every weight; the base weights stay frozen. r = 0: off (full fine-tuning)."""

    r: int = 0
    alpha: float = 16.0
    # Dropout on the adapters' input while training (sft and reward; PPO's models must be deterministic: 0 there).
    dropout: float = 0.0
    # Which linear layers get adapters: all-linear = every linear layer of the attention and MLP blocks (not the
    # LM head or a reward head); or module names, e.g. [q_proj,k_proj,v_proj,o_proj].
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])

    def validate(self) -> None:
        if self.r < 0:
            raise ConfigError(f"model.lora.r={self.r} must be >= 0", hint="0 turns LoRA off; 8-64 are common ranks")
        if self.r == 0:
            return
        if self.alpha <= 0:
            raise ConfigError(f"model.lora.alpha={self.alpha} must be > 0", hint="a common choice is 2 x model.lora.r")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout={self.dropout} must be in [0, 1)")
        if not self.target_modules or any(not str(m).strip() for m in self.target_modules):
            raise ConfigError(f"model.lora.target_modules={self.target_modules} names no module",
                              hint="model.lora.target_modules=[all-linear] or e.g. [q_proj,v_proj]")


@dataclass
class ModelConfig:
    # A hub id, a local directory in Hugging Face format, or `builtin:tiny` (built on first use and cached).
    name_or_path: str = BUILTIN_TINY
    revision: Optional[str] = None
    # Executes code shipped with the model: off unless you trust its source.
    trust_remote_code: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self) -> None:
        self.lora.validate()


@dataclass
class ToyDataConfig:
    """The built-in synthetic task (`data=toy`): sizes, seed and annotator noise."""

    seed: int = 0
    num_train: int = 4000
    num_eval: int = 200
    label_noise: float = 0.2

    def validate(self) -> None:
        if not 0.0 <= self.label_noise < 0.5:
            raise ConfigError(f"data.toy.label_noise={self.label_noise} must be in [0, 0.5)")


@dataclass
class ArithDataConfig:
    """The built-in arithmetic task (`data=arith`, rlhf_cli.data.arith): sizes, seed, how often a demonstration is
    right, and annotator noise of its preference pairs."""

    seed: int = 0
    num_train: int = 4000
    num_eval: int = 200
    # The share of SFT demonstrations whose answer is right (the others are off by 1 or 2).
    demo_accuracy: float = 0.4
    label_noise: float = 0.2

    def validate(self) -> None:
        if not 0.0 <= self.demo_accuracy <= 1.0:
            raise ConfigError(f"data.arith.demo_accuracy={self.demo_accuracy} must be in [0, 1]")
        if not 0.0 <= self.label_noise < 0.5:
            raise ConfigError(f"data.arith.label_noise={self.label_noise} must be in [0, 0.5)")


@dataclass
class DataConfig:
    CHOICES: ClassVar[dict] = {"format": ("auto", "prompt_completion", "messages", "hh", "preference"),
                               "task": ("toy", "arith")}
    POSITIVE: ClassVar[tuple] = ("max_seq_len",)

    # null: the built-in task named by `task`. Otherwise a local json/jsonl(.gz)/parquet/csv file or a hub dataset
    # name.
    path: Optional[str] = None
    # The built-in task when `path` is null (data=toy, data=arith set it): toy = the list task with a hidden gold
    # score (data.toy.*), arith = sums and differences with an `answer` column (data.arith.*).
    task: str = "toy"
    # auto | prompt_completion | messages | hh
    format: str = "auto"
    split: str = "train"
    # Held-out data: a separate file, or else this fraction of `path` (at most `max_eval_rows` rows).
    eval_path: Optional[str] = None
    eval_fraction: float = 0.05
    max_eval_rows: int = 500
    # Keep only the first N rows of `path` (null: all).
    max_rows: Optional[int] = None
    # Longer rows are truncated (prompt from the left, completion from the right) and counted, never dropped.
    max_seq_len: int = 512
    # Preference data: drop (and count) pairs with chosen == rejected or two empty responses instead of failing.
    skip_invalid: bool = False
    # sft and reward: each micro-batch's examples in one row without padding (positions restart per example and
    # attention never crosses one), instead of rows padded to the longest. The same loss, fewer FLOPs. auto: on
    # where the model keeps packed examples apart (checked on the loaded model), else off with the reason printed;
    # true: on or refused; false: off. PPO's rollouts share one layout and ignore it.
    packing: Any = "auto"
    toy: ToyDataConfig = field(default_factory=ToyDataConfig)
    arith: ArithDataConfig = field(default_factory=ArithDataConfig)

    def validate(self) -> None:
        if not (isinstance(self.packing, bool) or self.packing == "auto"):
            raise ConfigError(f"data.packing={self.packing!r} is not one of auto, true, false",
                              hint="data.packing=auto (the default) packs where the model allows it")
        if self.path is None and self.format != "auto":
            raise ConfigError(f"data.path is required with data.format={self.format} (the built-in task has no file)",
                              hint="data.path=/path/to/file.jsonl on the command line")
        self.toy.validate()
        self.arith.validate()
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction={self.eval_fraction} must be in [0, 1)")


@dataclass
class OptimConfig:
    CHOICES: ClassVar[dict] = {"schedule": ("cosine", "linear", "constant")}
    POSITIVE: ClassVar[tuple] = ("lr",)

    lr: float = 1e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # linear warmup for this many optimizer steps, then `schedule` down to lr * min_lr_ratio
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0


@dataclass
class FSDPConfig:
    """train.strategy=fsdp: FSDP2 (torch.distributed.fsdp.fully_shard) shards each transformer block and the rest
    of every model over the processes; parameters, gradients and optimizer state each take 1/world_size of the
    memory per process, and a block's weights are gathered only while it runs."""

    # Keep the shards (parameters, gradients, optimizer state) in host memory and step the optimizer there:
    # larger models fit in less GPU memory, at the price of host-device copies every step. CUDA only.
    cpu_offload: bool = False
    # Free each block's gathered weights after its forward pass (the backward gathers them again): the least
    # memory. false keeps them until the backward (one all-gather fewer per block and step, more memory). A
    # single process always keeps them: its shard is the whole block.
    reshard_after_forward: bool = True


@dataclass
class ComputeConfig:
    """Where a stage's models run and how its processes share them: the knobs of every stage that runs models
    (`train.*` in sft, reward and ppo; the top level of eval). engine.train's `load_device` and `hold_frozen` take
    it."""

    CHOICES: ClassVar[dict] = {"device": ("auto", "cpu", "cuda"), "strategy": ("ddp", "fsdp")}
    POSITIVE: ClassVar[tuple] = ("micro_batch_size",)

    # auto: CUDA when present (bf16 autocast where supported), else CPU fp32.
    device: str = "auto"
    # Sequences per forward (and backward) pass on each process: a memory knob. Training uses the largest
    # micro-batch up to this size that divides each process's share of an optimizer step (printed at start).
    micro_batch_size: int = 32
    # How the processes of a torchrun (or SLURM) launch share the work: ddp = a full copy of every model on each
    # process, gradients averaged; fsdp = every model sharded over the processes (train.fsdp), for models whose
    # weights, gradients and AdamW state do not fit one device. One process: the same numbers either way.
    strategy: str = "ddp"
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)


@dataclass
class LoopConfig(ComputeConfig):
    """The knobs of a training loop that sft, reward and ppo share (`train.*`); engine.train's
    `wrap_for_training` takes it."""

    CHOICES: ClassVar[dict] = {"precision": ("auto", "fp32", "bf16")}
    POSITIVE: ClassVar[tuple] = ("max_steps", "log_every", "checkpoint_every", "keep_checkpoints")
    NON_NEGATIVE: ClassVar[tuple] = ("max_skipped_steps",)

    # Length of the run in optimizer steps (ppo: iterations).
    max_steps: int = 1000
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    # Precision of the training forward passes (and of PPO's rollout passes, which must match them): auto = bf16
    # autocast on a CUDA device that supports it, else fp32; fp32; bf16 = bf16 autocast on CUDA or CPU (CPUs with
    # AVX512-BF16 or AMX run its matmuls 2-4x faster). Weights, gradients, log-probs and losses stay fp32.
    precision: str = "auto"
    # torch.compile the trained models (forward and backward; the first steps compile). Helps most on CUDA.
    compile: bool = False
    # An optimizer step whose loss or gradient norm is NaN/inf is skipped (no update) at most this many times over
    # the run; one more stops the stage (exit code 3). 0: stop at the first.
    max_skipped_steps: int = 0
    # Recompute each layer's activations in the backward pass instead of keeping them (the trained models: policy
    # and value model in ppo): much less activation memory for one more forward pass, the same loss and gradients.
    gradient_checkpointing: bool = False


@dataclass
class TrainConfig(LoopConfig):
    """The loop knobs of the stages that step over a dataset (sft, reward)."""

    POSITIVE: ClassVar[tuple] = ("examples_per_step", "eval_every")

    # max_steps is the length of the run; when `epochs` > 0 it wins and max_steps is derived from the data.
    epochs: float = 0.0
    # Batch arithmetic: examples_per_step = micro-batch x grad_accum_steps x world_size, the micro-batch being the
    # largest size up to micro_batch_size that divides examples_per_step / world_size (grad_accum derived).
    # An example is one demonstration (sft) or one ranked pair (reward).
    examples_per_step: int = 32
    eval_every: int = 200


@dataclass
class SFTTrainConfig(TrainConfig):
    # Loss on completion tokens only (false: on every token).
    completion_only: bool = True
    # How many held-out prompts to sample from at the end (shown in a table).
    num_samples: int = 4
    sample_max_new_tokens: int = 32


@dataclass
class RewardTrainConfig(TrainConfig):
    max_steps: int = 500
    eval_every: int = 100
    checkpoint_every: int = 100


@dataclass
class RewardLossConfig:
    """loss = -log σ(r_chosen - r_rejected - margin) + center_coef * (r_chosen + r_rejected)², and the ensemble of
    reward models one run trains (`reward.*` of the reward stage)."""

    CHOICES: ClassVar[dict] = {"ensemble_merge": ("none", "weight_average")}
    POSITIVE: ClassVar[tuple] = ("ensemble",)

    # Use a row's `margin` field when the data has one.
    use_margin: bool = True
    # Reward centering (Eisenstein et al. 2023): pulls the mean reward towards 0. 0 turns it off.
    center_coef: float = 0.0
    # An ensemble of this many reward models in one run and one artifact (1: a single reward model). Member k
    # trains with seed + k (its head, adapters and data order), one member after another (LoRA members: fresh
    # adapters and a fresh head on the same frozen base, which `rlhf ppo` and `rlhf eval` then hold once for all
    # K); they score with every member and combine them (ppo.reward_aggregation: mean, min, uwo).
    ensemble: int = 1
    # Each member trains on its own bootstrap resample of the training pairs (drawn with replacement, as many as
    # there are): members then differ in more than their seed, which is where ensembles help (Eisenstein et al.
    # 2023). Only with ensemble >= 2.
    ensemble_bootstrap: bool = True
    # none: the artifact holds the K members. weight_average: the members' weights averaged into one reward model
    # (WARM, Ramé et al. 2024); every member then starts from the same head, and the artifact is that one model.
    ensemble_merge: str = "none"

    def validate(self) -> None:
        if self.ensemble_merge != "none" and self.ensemble < 2:
            raise ConfigError(f"reward.ensemble_merge={self.ensemble_merge} averages the members of an ensemble, but "
                              f"reward.ensemble={self.ensemble}", hint="set reward.ensemble=2 or more (e.g. 4)")


@dataclass
class RewardModelConfig(ModelConfig):
    CHOICES: ClassVar[dict] = {"pooling": ("auto", "last", "first", "mean")}

    # null: the SFT artifact of this experiment (runs/<experiment>/sft). Otherwise a run directory holding a
    # finished artifact, a Hugging Face model directory, a hub id, or builtin:tiny.
    name_or_path: Optional[str] = None
    # How one hidden state is picked per sequence: auto (last token for causal LMs, [CLS] for encoders that have
    # one, else mean) | last | first | mean
    pooling: str = "auto"


@dataclass
class RewardFunctionsConfig:
    """Rewards written as code (`reward.*` of ppo and eval; engine/reward_functions.py): Python functions beside or
    instead of the learned reward model. Each is `package.module:function` or `path/to/file.py:function`, called as
    `fn(prompts, completions, **columns) -> list[float | None]` once per micro-batch of responses (columns: the
    prompt rows' other fields, e.g. `answer`). They run as code with your rights: only the modules and files named
    here are imported."""

    CHOICES: ClassVar[dict] = {"aggregation": ("sum", "normalize_then_sum")}

    functions: list[str] = field(default_factory=list)
    # One weight per component, the learned reward model first when one is used; empty: 1.0 each.
    weights: list[float] = field(default_factory=list)
    # How the components become the score: sum = sum of weight x raw value (a None adds nothing; TRL's default);
    # normalize_then_sum = each component standardised within its prompt's group of k responses first, then
    # weighted and summed (GDPO, Liu et al. 2026; TRL's multi_objective_aggregation=normalize_then_sum), so that
    # one component's scale cannot drown another's; needs ppo.samples_per_prompt >= 2.
    aggregation: str = "sum"

    def validate(self) -> None:
        from rlhf_cli.engine.reward_functions import check_specs

        check_specs(self.functions)
        if any(not math.isfinite(w) for w in self.weights):
            raise ConfigError(f"reward.weights={list(self.weights)} holds a value that is not a finite number")


@dataclass
class EvalRewardConfig(RewardFunctionsConfig):
    """eval's `reward.*`: the learned reward model (`reward.model`) and the reward functions, as in ppo."""

    CHOICES: ClassVar[dict] = {**RewardFunctionsConfig.CHOICES, "ensemble_aggregation": ("mean", "min", "uwo")}
    NON_NEGATIVE: ClassVar[tuple] = ("uwo_coef",)

    # The reward model that scores the responses: null = this experiment's reward artifact (none needed when
    # reward.functions is set); `none` = no reward model; a list [a,b,c]: an ensemble of those reward models.
    model: Any = None
    # How an ensemble's standardised member scores make the reward model's score, as ppo.reward_aggregation and
    # ppo.uwo_coef: mean | min | uwo. The members' mean and disagreement (std) are reported either way.
    ensemble_aggregation: str = "mean"
    uwo_coef: float = 0.5

    def validate(self) -> None:
        super().validate()
        check_reward_models(self.model, "reward.model")


def check_reward_models(value: Any, key: str) -> None:
    """A reward-model setting is null, one path or name, or a non-empty list of them (an ensemble)."""
    from omegaconf import ListConfig

    if value is None or isinstance(value, str):
        return
    if isinstance(value, (list, tuple, ListConfig)) and value and all(isinstance(v, str) and v for v in value):
        if NO_REWARD_MODEL in value:
            raise ConfigError(f"{key}={list(value)}: `{NO_REWARD_MODEL}` cannot be a member of an ensemble",
                              hint=f"{key}={NO_REWARD_MODEL} alone, or a list of reward models")
        return
    raise ConfigError(f"{key}={value!r} is not a reward model or a list of them",
                      hint=f"e.g. {key}=runs/a/reward or {key}=[runs/a/reward,runs/b/reward]")


@dataclass
class PPOAlgoConfig:
    """PPO for language models (names as in TRL / InstructGPT; see ../shared/ppo-notes.md and the README)."""

    CHOICES: ClassVar[dict] = {
        "kl_estimator": ("k1", "k2", "k3"), "rollout_backend": ("auto", "eager", "compiled"),
        "advantage": ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"),
        "scale_rewards": ("group", "batch", "none"), "kl_penalty": ("reward", "loss"),
        "loss_aggregation": ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"),
        "reward_aggregation": ("mean", "min", "uwo")}
    # The estimators that compare a prompt's k responses (rl.advantages.ESTIMATORS[...].grouped; tested equal).
    GROUPED: ClassVar[tuple] = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")
    POSITIVE: ClassVar[tuple] = ("prompts_per_rollout", "num_ppo_epochs", "num_mini_batches", "response_length",
                                 "temperature", "cliprange", "cliprange_value", "kl_horizon", "kl_target",
                                 "samples_per_prompt")
    NON_NEGATIVE: ClassVar[tuple] = ("kl_coef", "vf_coef", "entropy_coef", "missing_eos_penalty", "uwo_coef")

    # How scores become advantages (rl/advantages.py, ESTIMATORS): gae = GAE with a value model (PPO as in
    # InstructGPT); the critic-free ones load no value model: grpo = (r - group mean) / std (scale_rewards),
    # dr_grpo = r - group mean, rloo = r - mean of the other k - 1, reinforce_pp = per-token returns of score and
    # -kl_coef * KL whitened over the batch, reinforce_pp_baseline = the same on scores minus their group mean.
    # The presets (algo=ppo|grpo|dr_grpo|rloo|reinforce_pp) set this and the switches below together.
    advantage: str = "gae"
    # k: responses sampled per prompt (prompts_per_rollout counts prompts: an iteration has prompts_per_rollout x k
    # responses). The group estimators compare a prompt's k responses and need k >= 2.
    samples_per_prompt: int = 1
    # grpo's divisor: group = each group's std, batch = the std of all scores of the iteration, none = no division.
    scale_rewards: str = "group"
    # Leave the groups whose k responses all scored alike (zero std: no relative signal) out of the update.
    skip_zero_std_groups: bool = False
    # Where the KL to the reference goes: reward = -kl_coef * kl_t in the per-token reward (score - kl_coef * sum
    # of kl_t for the estimators of one number per response); loss = + kl_coef * kl in the loss, aggregated as the
    # policy loss (GRPO's placement).
    kl_penalty: str = "reward"
    # KL penalty to the frozen reference (see kl_penalty). kl_coef = 0 with adaptive_kl off: no reference is loaded.
    kl_coef: float = 0.05
    # k1 = logp - logp_ref | k2 = (logp - logp_ref)^2 / 2 | k3 = (r - 1) - log r, r = p_ref / p
    kl_estimator: str = "k1"
    # How per-token losses are averaged, over the whole optimizer step (every micro-batch and process):
    # token_mean = over all tokens | seq_mean_token_mean = each response's token mean, then over responses |
    # seq_mean_token_sum_norm = each response's token sum / response_length, then over responses (Dr. GRPO).
    loss_aggregation: str = "token_mean"
    # Adaptive KL controller (Ziegler et al.): steer the per-sequence KL towards kl_target over kl_horizon samples.
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    cliprange: float = 0.2
    # The upper clip of the ratio, 1 + cliprange_high (DAPO's "clip higher"); null = cliprange.
    cliprange_high: Optional[float] = None
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    # A response that hit response_length without a stop token gets its score lowered by this much (0: off).
    missing_eos_penalty: float = 1.0
    # Scale scores to mean 0 / std 1 with the reward artifact's held-out statistics. (An ensemble's members are
    # always scaled so, each with its own statistics, before they are combined.)
    normalize_scores: bool = False
    # How an ensemble of reward models (a `reward.ensemble=K` artifact, or model.reward=[a,b,...]) scores a
    # response, from its members' standardised scores z_k: mean = their mean; min = the lowest (worst case);
    # uwo = mean - uwo_coef x their variance across members (Coste et al. 2023). A single reward model: unused.
    reward_aggregation: str = "mean"
    uwo_coef: float = 0.5
    # Clip scores to [-score_clip, score_clip] after normalisation (null: no clipping).
    score_clip: Optional[float] = None
    # Rollout: plain temperature sampling (no top-k/top-p or other logits processors), at most response_length
    # new tokens, stopped at EOS. The same temperature divides the logits at rollout, for the reference and in
    # training.
    response_length: int = 16
    temperature: float = 1.0
    # Batch arithmetic: each iteration samples prompts_per_rollout responses (over all processes), then runs
    # num_ppo_epochs passes over them in num_mini_batches minibatches (one optimizer step each); each process's
    # share of a minibatch is split into micro-batches of the largest size up to train.micro_batch_size that
    # divides it (gradient accumulation).
    prompts_per_rollout: int = 64
    num_ppo_epochs: int = 4
    num_mini_batches: int = 2
    # How rollouts are sampled: auto = compiled on CUDA (a static KV cache whose decoding step transformers
    # compiles with torch.compile / CUDA graphs), eager elsewhere (transformers' generate, dynamic cache).
    rollout_backend: str = "auto"

    def validate(self) -> None:
        """Out-of-range knobs, and batch arithmetic that no number of processes makes work (the rest depends on
        the world size: stages.ppo.batch_shape)."""
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError(f"ppo.gamma={self.gamma} and ppo.lam={self.lam} must lie in [0, 1]")
        if self.prompts_per_rollout * self.samples_per_prompt % self.num_mini_batches:
            raise ConfigError(
                f"ppo.prompts_per_rollout={self.prompts_per_rollout} x samples_per_prompt={self.samples_per_prompt} "
                f"responses do not split into ppo.num_mini_batches={self.num_mini_batches} equal minibatches",
                hint="make prompts_per_rollout x samples_per_prompt a multiple of num_mini_batches")
        if self.cliprange_high is not None and not self.cliprange_high > 0:
            raise ConfigError(f"ppo.cliprange_high={self.cliprange_high} must be > 0 (or null: ppo.cliprange)")
        if self.advantage in self.GROUPED and self.samples_per_prompt < 2:
            raise ConfigError(
                f"ppo.advantage={self.advantage} compares the responses sampled for one prompt, but "
                f"ppo.samples_per_prompt={self.samples_per_prompt}",
                hint="set ppo.samples_per_prompt=2 or more (the presets use 4), or ppo.advantage=gae|reinforce_pp")
        if self.skip_zero_std_groups and self.samples_per_prompt < 2:
            raise ConfigError("ppo.skip_zero_std_groups=true needs groups: ppo.samples_per_prompt is 1",
                              hint="set ppo.samples_per_prompt=2 or more, or skip_zero_std_groups=false")


@dataclass
class PPOTrainConfig(LoopConfig):
    POSITIVE: ClassVar[tuple] = ("rollout_micro_batch_size", "sample_every")

    # PPO iterations (one rollout + its update each).
    max_steps: int = 60
    # Forward passes over rollouts (generation, reference, reward, value) use this many sequences at a time.
    rollout_micro_batch_size: int = 64
    log_every: int = 1
    # Write a few prompt/response/score rows to samples.jsonl every N iterations.
    sample_every: int = 10
    checkpoint_every: int = 10
    # PPO keeps more checkpoints than the other stages: `rlhf eval` draws the over-optimisation curve from them.
    keep_checkpoints: int = 6


@dataclass
class PPOModelConfig:
    CHOICES: ClassVar[dict] = {"dtype": ("auto", "float32", "bfloat16")}

    # The policy (and its frozen reference): null = the SFT artifact of this experiment; else a run directory,
    # a causal-LM directory or hub id.
    policy: Optional[str] = None
    # The reward model (and the value model's initialisation): null = this experiment's reward artifact (with
    # reward.functions: only when the experiment has one); `none` = no reward model (reward.functions alone); or
    # a list, model.reward=[a,b,c]: an ensemble of those reward models (run directories or sequence classifiers),
    # combined as ppo.reward_aggregation says. A `reward.ensemble=K` artifact is an ensemble by itself. The value
    # model starts from the first member.
    reward: Any = None
    # The value model's initialisation when it should not be the reward model (a reward artifact's run directory).
    value: Optional[str] = None
    trust_remote_code: bool = False
    # The frozen roles (reference, reward model): auto = bf16 on a CUDA device that supports it (half the memory),
    # else fp32; or float32 / bfloat16. The trained policy and value model keep fp32 weights (bf16 autocast on CUDA).
    # With LoRA the frozen base weights of the policy and value model are held in this dtype too (the reference
    # is the policy's base with its adapters off); the adapters and the value head stay fp32.
    dtype: str = "auto"
    # LoRA on the policy (from the SFT weights) and the value model (on the reward model's backbone; its head
    # trains in full). The reference is then the policy with its adapters off: no second copy of the weights.
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self) -> None:
        self.lora.validate()
        check_reward_models(self.reward, "model.reward")
        if self.lora.r and self.lora.dropout:
            raise ConfigError(f"model.lora.dropout={self.lora.dropout}: PPO's policy and value model must be "
                              f"deterministic (the ratio of new to old log-probs is 1 before the first update only "
                              f"without dropout)", hint="set model.lora.dropout=0 for ppo")


@dataclass
class DPOModelConfig(ModelConfig):
    """The policy DPO trains and the frozen reference it is measured against."""

    # null: the SFT artifact of this experiment (runs/<experiment>/sft); else a run directory, a causal-LM directory
    # or hub id, or builtin:tiny.
    name_or_path: Optional[str] = None
    # The frozen reference: null = the policy's starting point (with LoRA: the policy with its adapters off, no
    # second copy); else a run directory or model.
    reference: Optional[str] = None


@dataclass
class DPOAlgoConfig:
    """Direct Preference Optimisation and its relatives (rl/dpo.py, LOSSES): β, the loss, label smoothing, an SFT
    term, and the held-out diagnostics."""

    CHOICES: ClassVar[dict] = {"loss": ("sigmoid", "ipo", "hinge", "robust")}
    POSITIVE: ClassVar[tuple] = ("beta", "kl_prompts", "response_length")
    NON_NEGATIVE: ClassVar[tuple] = ("label_smoothing", "nll_coef", "warn_chosen_drop")

    # The KL strength: implicit reward r = β (log π(y|x) − log π_ref(y|x)); smaller moves further from the reference.
    beta: float = 0.1
    # sigmoid = DPO (Rafailov et al. 2023) | ipo (Azar et al. 2023) | hinge (SLiC, Zhao et al. 2023) | robust
    # (rDPO, Chowdhury et al. 2024); each a function in rl/dpo.py with its formula.
    loss: str = "sigmoid"
    # ε, the assumed rate of flipped labels: cDPO smoothing for sigmoid, the noise rate of robust (< 0.5).
    label_smoothing: float = 0.0
    # + nll_coef x the chosen response's mean NLL per token (RPO, Pang et al. 2024; Llama 3.1's DPO): 0 = off.
    nll_coef: float = 0.0
    # The reference's log-probs of every pair computed once, before training, in one pass; the reference model is
    # then not held during training (only loaded again for the held-out KL). false: held, scored per micro-batch.
    precompute_reference: bool = True
    # Every train.eval_every steps: this many held-out prompts sampled (temperature 1, at most response_length
    # tokens) for the KL to the reference, as rlhf eval measures it, and the gold score on the built-in task.
    kl_prompts: int = 64
    response_length: int = 16
    # The summary warns when the chosen responses' mean log-prob fell by more than this (nats) from the start.
    warn_chosen_drop: float = 1.0

    def validate(self) -> None:
        if self.loss == "robust" and not self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.loss=robust needs dpo.label_smoothing < 0.5 (got {self.label_smoothing})",
                              hint="ε is the assumed rate of flipped labels; the built-in task's is 0.2")


@dataclass
class DPOTrainConfig(TrainConfig):
    """The loop knobs of rlhf dpo; an example is one preference pair."""

    max_steps: int = 200
    eval_every: int = 40
    checkpoint_every: int = 40
    # DPO keeps as many checkpoints as PPO: `rlhf eval` draws its over-optimisation curve from them.
    keep_checkpoints: int = 6


# logger=[...] names -> (the module each needs, the extra that installs it)
LOGGERS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


def check_loggers(names: list[str]) -> None:
    """Every name is a known tracker whose package is installed, or a ConfigError naming the extra to install."""
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"logger={list(names)}: {name!r} is not one of {', '.join(LOGGERS)}",
                              hint="e.g. logger=[tensorboard,mlflow]; logger=[] for metrics.jsonl only")
        module, extra = LOGGERS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"logger {name} needs the {module} package, which is not installed",
                              hint=f"pip install 'rlhf-cli[{extra}]', or drop {name} from logger")
    if len(set(names)) < len(names):
        raise ConfigError(f"logger={list(names)} names a tracker twice", hint="name each tracker once")


@dataclass
class StageConfig:
    """Knobs every stage shares."""

    CHOICES: ClassVar[dict] = {"artifact_check": ("auto", "full", "sizes")}

    stage: str = MISSING
    # runs/<experiment>/<stage>/ holds the artifact; `root` is made absolute at compose time.
    experiment: str = "default"
    root: str = "runs"
    # Set by Hydra to runs/<experiment>/<stage> (or a sub-directory for multirun jobs).
    run_dir: str = "${hydra:runtime.output_dir}"
    seed: int = 0
    # Replace a finished artifact in run_dir (otherwise the stage refuses to overwrite it).
    overwrite: bool = False
    # Continue an unfinished run from its latest checkpoint (the config and data must be the ones it started with).
    resume: bool = False
    # Resume even though the config or the training data differ from the interrupted run's (the differences are
    # printed); e.g. a lower optim.lr after a divergence.
    force_resume: bool = False
    # How upstream models and checkpoints are checked against what was recorded when they were written: auto (names
    # and sizes, plus a sha256 of the content when it is under 1 GiB) | full (always the sha256) | sizes.
    artifact_check: str = "auto"
    # Experiment trackers to report to besides metrics.jsonl (always written): any of tensorboard, mlflow, wandb,
    # e.g. logger=[tensorboard,mlflow]; each is an extra (rlhf-cli[mlflow]). See engine/trackers.py.
    logger: list[str] = field(default_factory=list)
    # The metric of the stage's manifest (e.g. eval_accuracy of reward, final_gold of ppo) that a Hydra sweeper
    # optimises: the run returns it to Hydra (`hydra/sweeper=maximize`). null: the run returns nothing.
    objective: Optional[str] = None

    def validate(self) -> None:
        """Every field's table rules (finite numbers, choices, ranges) over the whole tree, the experiment's name
        and the trackers; a stage's schema adds its parts' cross-field rules."""
        check_fields(self)
        check_experiment(self.experiment)
        check_loggers(self.logger)


@dataclass
class SFTConfig(StageConfig):
    stage: str = "sft"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)

    def validate(self) -> None:
        super().validate()
        self.model.validate()
        self.data.validate()


@dataclass
class RewardConfig(StageConfig):
    stage: str = "reward"
    model: RewardModelConfig = field(default_factory=RewardModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RewardTrainConfig = field(default_factory=RewardTrainConfig)
    reward: RewardLossConfig = field(default_factory=RewardLossConfig)

    def validate(self) -> None:
        super().validate()
        self.model.validate()
        self.data.validate()
        self.reward.validate()


@dataclass
class PPOConfig(StageConfig):
    stage: str = "ppo"
    # The preset the ppo.* switches started from (conf/algo/<name>.yaml, set with algo=<name>): ppo, grpo, dr_grpo,
    # rloo, reinforce_pp. A record for the manifest and sweep tables; the switches themselves decide.
    algo: str = "ppo"
    model: PPOModelConfig = field(default_factory=PPOModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, warmup_steps=0, schedule="linear",
                                                                   min_lr_ratio=0.0))
    train: PPOTrainConfig = field(default_factory=PPOTrainConfig)
    ppo: PPOAlgoConfig = field(default_factory=PPOAlgoConfig)
    reward: RewardFunctionsConfig = field(default_factory=RewardFunctionsConfig)

    def validate(self) -> None:
        super().validate()
        self.model.validate()
        self.data.validate()
        self.ppo.validate()
        self.reward.validate()
        if self.model.reward == NO_REWARD_MODEL and not self.reward.functions:
            raise ConfigError("model.reward=none leaves nothing to reward the policy",
                              hint="name reward functions: 'reward.functions=[rlhf_cli.rewards:exact_match]'")
        if self.reward.aggregation == "normalize_then_sum" and self.ppo.samples_per_prompt < 2:
            raise ConfigError("reward.aggregation=normalize_then_sum standardises each component within a prompt's "
                              f"group of responses, but ppo.samples_per_prompt={self.ppo.samples_per_prompt}",
                              hint="set ppo.samples_per_prompt=2 or more (algo=grpo does), or reward.aggregation=sum")


@dataclass
class DPOConfig(StageConfig):
    stage: str = "dpo"
    model: DPOModelConfig = field(default_factory=DPOModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=10))
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)
    dpo: DPOAlgoConfig = field(default_factory=DPOAlgoConfig)

    def validate(self) -> None:
        super().validate()
        self.model.validate()
        self.data.validate()
        self.dpo.validate()
        if self.dpo.response_length >= self.data.max_seq_len:
            raise ConfigError(f"dpo.response_length={self.dpo.response_length} leaves no room for the prompt in "
                              f"data.max_seq_len={self.data.max_seq_len}", hint="raise data.max_seq_len")


@dataclass
class EvalConfig(ComputeConfig, StageConfig):
    """`rlhf eval`: sample every policy on the same held-out prompts and compare them (see stages/eval.py).

    Its compute knobs sit at the top level (`device=`, `micro_batch_size=`, `strategy=`, `fsdp.*`): under torchrun
    each process samples and measures its share of the prompts (seed + rank); strategy ddp = every model whole on
    every process, fsdp = every model sharded (as train.strategy, `fsdp` as train.fsdp). Every model here is frozen:
    micro_batch_size is the number of sequences per forward pass."""

    CHOICES: ClassVar[dict] = {"dtype": ("auto", "float32", "bfloat16")}
    POSITIVE: ClassVar[tuple] = ("num_prompts", "response_length", "temperature", "samples_per_prompt")

    stage: str = "eval"
    # Run directories of finished sft/ppo runs, Hugging Face causal-LM directories or hub ids, or builtin:tiny;
    # the first is the baseline of the win rate. Empty: this experiment's SFT policy, then its PPO policy.
    policies: list[str] = field(default_factory=list)
    # The reward model (reward.model) and the reward functions that score the responses (reward.*, as in ppo).
    reward: EvalRewardConfig = field(default_factory=EvalRewardConfig)
    # The policy the KL is measured against: null = this experiment's SFT artifact.
    reference: Optional[str] = None
    # Responses sampled per prompt (n): every number is the mean over a prompt's n responses, and pass@k is
    # reported for k = 1, 2, 4, ... up to n for every 0/1 component (a checker such as exact_match, the arith
    # task's gold), with the unbiased estimator of Chen et al. (2021).
    samples_per_prompt: int = 1
    # Held-out prompts: the built-in task's eval split (cycled when more are asked for), else data.eval_path or
    # data.path (the first num_prompts).
    num_prompts: int = 256
    # Sampling, as in PPO: plain temperature sampling, at most response_length new tokens, stopped at EOS.
    response_length: int = 16
    temperature: float = 1.0
    # Sequences per forward pass.
    micro_batch_size: int = 64
    # Every model here is frozen: auto = bf16 on a CUDA device that supports it, else fp32; or float32 / bfloat16.
    dtype: str = "auto"
    # Also evaluate the checkpoints a PPO run kept (checkpoints/step-N/): the over-optimisation curve.
    checkpoints: bool = True
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> None:
        StageConfig.validate(self)
        self.data.validate()
        self.reward.validate()
        if self.reward.aggregation == "normalize_then_sum" and self.samples_per_prompt < 2:
            raise ConfigError("reward.aggregation=normalize_then_sum standardises each component within a prompt's "
                              f"samples, but samples_per_prompt={self.samples_per_prompt}",
                              hint="set samples_per_prompt=2 or more, or reward.aggregation=sum")
        if self.reward.model == NO_REWARD_MODEL and not self.reward.functions:
            raise ConfigError("reward.model=none leaves nothing to score the responses",
                              hint="name reward functions: 'reward.functions=[rlhf_cli.rewards:exact_match]'")
        if self.response_length >= self.data.max_seq_len:
            raise ConfigError(f"response_length={self.response_length} leaves no room for the prompt in "
                              f"data.max_seq_len={self.data.max_seq_len}", hint="raise data.max_seq_len")
        if any(not p.strip() for p in self.policies):
            raise ConfigError("policies holds an empty entry", hint="policies=[runs/demo/sft,runs/demo/ppo]")


@dataclass
class ReportConfig:
    """`rlhf report`: one self-contained HTML page of an experiment's run directories (see stages/report.py)."""

    stage: str = "report"
    experiment: str = "default"
    root: str = "runs"
    # Set by Hydra to <root>/<experiment>: the page is report.html there.
    run_dir: str = "${hydra:runtime.output_dir}"
    # Sample responses shown per stage (and per policy of eval).
    samples: int = 4

    def validate(self) -> None:
        check_fields(self)
        check_experiment(self.experiment)


# stage -> the schema `rlhf <stage>` composes onto (registered in Hydra's ConfigStore as `<stage>_schema`), as
# each stage's spec names it (stagespec.SPECS)
SCHEMAS: dict[str, type] = {name: globals()[spec.schema] for name, spec in SPECS.items() if spec.hydra}


def rules(schema: type, table: str) -> list:
    """A class's table (CHOICES, POSITIVE, NON_NEGATIVE) with its bases' entries first."""
    out: dict = {}
    for cls in reversed(schema.__mro__):
        own = vars(cls).get(table)
        if own:
            out.update(own if isinstance(own, dict) else dict.fromkeys(own))
    return list(out.items())


def check_fields(obj: Any, prefix: str = "") -> None:
    """The table rules of `obj` and of every dataclass under it, each key named as the user types it (`prefix`):
    every float knob a real number (`optim.lr=nan` or `inf` would only surface deep inside torch), every choice one
    of its values, every POSITIVE field > 0, every NON_NEGATIVE one >= 0."""
    for f in fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value} is not a finite number", hint=f"set {key} to a real number")
    for name, allowed in rules(type(obj), "CHOICES"):
        value = getattr(obj, name)
        if value not in allowed:
            raise ConfigError(f"{prefix}{name}={value!r} is not one of {', '.join(allowed)}",
                              hint=f"set {prefix}{name}=<one of those>")
    for name, _ in rules(type(obj), "POSITIVE"):
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{prefix}{name}={getattr(obj, name)} must be > 0")
    for name, _ in rules(type(obj), "NON_NEGATIVE"):
        if getattr(obj, name) < 0:
            raise ConfigError(f"{prefix}{name}={getattr(obj, name)} must be >= 0")
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            check_fields(value, f"{prefix}{f.name}.")
