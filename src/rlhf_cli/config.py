"""Typed configuration: every knob is a dataclass field, and its default lives here.

Hydra composes `conf/<stage>.yaml` (which only picks groups such as `model=tiny`, `data=toy`, `optim=adamw` and
sets presets) on top of the stage's schema registered below, so a misspelled key or a wrong type fails at compose
time with the key's name. After composition, `finalize` turns the DictConfig into the dataclass instance the stage
runs on, checks required values and cross-field rules, and makes every path absolute once.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import re
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from rlhf_cli.artifacts import check_experiment, stage_dir
from rlhf_cli.errors import ConfigError

BUILTIN_TINY = "builtin:tiny"


def conf_dir() -> Path:
    """conf/ shipped inside the wheel, else the checkout's top-level conf/ (editable installs, source trees)."""
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "conf"


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


@dataclass
class ModelConfig:
    # A hub id, a local directory in Hugging Face format, or `builtin:tiny` (built on first use and cached).
    name_or_path: str = BUILTIN_TINY
    revision: Optional[str] = None
    # Executes code shipped with the model: off unless you trust its source.
    trust_remote_code: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class ToyDataConfig:
    """The built-in synthetic task (`data=toy`): sizes, seed and annotator noise."""

    seed: int = 0
    num_train: int = 4000
    num_eval: int = 200
    label_noise: float = 0.2


@dataclass
class DataConfig:
    # null: the built-in task. Otherwise a local json/jsonl(.gz)/parquet/csv file or a hub dataset name.
    path: Optional[str] = None
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
    # attention never crosses one), instead of rows padded to the longest. The same loss, fewer FLOPs. PPO's
    # rollouts share one layout and ignore it.
    packing: bool = False
    toy: ToyDataConfig = field(default_factory=ToyDataConfig)


@dataclass
class OptimConfig:
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
class TrainConfig:
    """The loop knobs every training stage shares."""

    # Length of the run in optimizer steps; when `epochs` > 0 it wins and max_steps is derived from the data.
    max_steps: int = 1000
    epochs: float = 0.0
    # Batch arithmetic: examples_per_step = micro_batch_size * grad_accum_steps * world_size (grad_accum derived).
    # An example is one demonstration (sft) or one ranked pair (reward).
    examples_per_step: int = 32
    micro_batch_size: int = 32
    log_every: int = 10
    eval_every: int = 200
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    # auto: CUDA when present (bf16 autocast where supported), else CPU fp32.
    device: str = "auto"
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
    # How the processes of a torchrun (or SLURM) launch share the work: ddp = a full copy of every model on each
    # process, gradients averaged; fsdp = every model sharded over the processes (train.fsdp), for models whose
    # weights, gradients and AdamW state do not fit one device. One process: the same numbers either way.
    strategy: str = "ddp"
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)


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
    """loss = -log σ(r_chosen - r_rejected - margin) + center_coef * (r_chosen + r_rejected)²"""

    # Use a row's `margin` field when the data has one.
    use_margin: bool = True
    # Reward centering (Eisenstein et al. 2023): pulls the mean reward towards 0. 0 turns it off.
    center_coef: float = 0.0


@dataclass
class RewardModelConfig(ModelConfig):
    # null: the SFT artifact of this experiment (runs/<experiment>/sft). Otherwise a run directory holding a
    # finished artifact, a Hugging Face model directory, a hub id, or builtin:tiny.
    name_or_path: Optional[str] = None
    # How one hidden state is picked per sequence: auto (last token for causal LMs, [CLS] for encoders that have
    # one, else mean) | last | first | mean
    pooling: str = "auto"


@dataclass
class PPOAlgoConfig:
    """PPO for language models (names as in TRL / InstructGPT; see ../shared/ppo-notes.md and the README)."""

    # KL penalty to the frozen reference, per token: r_t = -kl_coef * kl_t, plus the score on the last token.
    kl_coef: float = 0.05
    kl_estimator: str = "k1"  # k1 = logp - logp_ref | k3 = (r - 1) - log r, r = p_ref / p
    # Adaptive KL controller (Ziegler et al.): steer the per-sequence KL towards kl_target over kl_horizon samples.
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    # A response that hit response_length without a stop token gets its score lowered by this much (0: off).
    missing_eos_penalty: float = 1.0
    # Scale scores to mean 0 / std 1 with the reward artifact's held-out statistics.
    normalize_scores: bool = False
    # Clip scores to [-score_clip, score_clip] after normalisation (null: no clipping).
    score_clip: Optional[float] = None
    # Rollout: plain temperature sampling (no top-k/top-p or other logits processors), at most response_length
    # new tokens, stopped at EOS. The same temperature divides the logits at rollout, for the reference and in
    # training.
    response_length: int = 16
    temperature: float = 1.0
    # Batch arithmetic: each iteration samples prompts_per_rollout responses (over all processes), then runs
    # num_ppo_epochs passes over them in num_mini_batches minibatches (one optimizer step each); a minibatch is
    # split into micro-batches of train.micro_batch_size per process (gradient accumulation).
    prompts_per_rollout: int = 64
    num_ppo_epochs: int = 4
    num_mini_batches: int = 2
    # How rollouts are sampled: auto = compiled on CUDA (a static KV cache whose decoding step transformers
    # compiles with torch.compile / CUDA graphs), eager elsewhere (transformers' generate, dynamic cache).
    rollout_backend: str = "auto"


@dataclass
class PPOTrainConfig:
    # PPO iterations (one rollout + its update each).
    max_steps: int = 60
    micro_batch_size: int = 32
    # Forward passes over rollouts (generation, reference, reward, value) use this many sequences at a time.
    rollout_micro_batch_size: int = 64
    log_every: int = 1
    # Write a few prompt/response/score rows to samples.jsonl every N iterations.
    sample_every: int = 10
    checkpoint_every: int = 10
    # PPO keeps more checkpoints than the other stages: `rlhf eval` draws the over-optimisation curve from them.
    keep_checkpoints: int = 6
    device: str = "auto"
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
    # How the processes of a torchrun (or SLURM) launch share the work: ddp = a full copy of every model on each
    # process, gradients averaged; fsdp = every model sharded over the processes (train.fsdp), for models whose
    # weights, gradients and AdamW state do not fit one device. One process: the same numbers either way.
    strategy: str = "ddp"
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)


@dataclass
class PPOModelConfig:
    # The policy (and its frozen reference): null = the SFT artifact of this experiment; else a run directory,
    # a causal-LM directory or hub id.
    policy: Optional[str] = None
    # The reward model (and the value model's initialisation): null = this experiment's reward artifact.
    reward: Optional[str] = None
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


@dataclass
class StageConfig:
    """Knobs every stage shares."""

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


@dataclass
class SFTConfig(StageConfig):
    stage: str = "sft"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)


@dataclass
class RewardConfig(StageConfig):
    stage: str = "reward"
    model: RewardModelConfig = field(default_factory=RewardModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RewardTrainConfig = field(default_factory=RewardTrainConfig)
    reward: RewardLossConfig = field(default_factory=RewardLossConfig)


@dataclass
class PPOConfig(StageConfig):
    stage: str = "ppo"
    model: PPOModelConfig = field(default_factory=PPOModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, warmup_steps=0, schedule="linear",
                                                                   min_lr_ratio=0.0))
    train: PPOTrainConfig = field(default_factory=PPOTrainConfig)
    ppo: PPOAlgoConfig = field(default_factory=PPOAlgoConfig)


SCHEMAS: dict[str, type] = {"sft": SFTConfig, "reward": RewardConfig, "ppo": PPOConfig}


@dataclass
class EvalConfig(StageConfig):
    """`rlhf eval`: sample every policy on the same held-out prompts and compare them (see stages/eval.py)."""

    stage: str = "eval"
    # Run directories of finished sft/ppo runs, Hugging Face causal-LM directories or hub ids, or builtin:tiny;
    # the first is the baseline of the win rate. Empty: this experiment's SFT policy, then its PPO policy.
    policies: list[str] = field(default_factory=list)
    # The reward model that scores the responses: null = this experiment's reward artifact.
    reward: Optional[str] = None
    # The policy the KL is measured against: null = this experiment's SFT artifact.
    reference: Optional[str] = None
    # Held-out prompts: the built-in task's eval split (cycled when more are asked for), else data.eval_path or
    # data.path (the first num_prompts).
    num_prompts: int = 256
    # Sampling, as in PPO: plain temperature sampling, at most response_length new tokens, stopped at EOS.
    response_length: int = 16
    temperature: float = 1.0
    # Sequences per forward pass.
    micro_batch_size: int = 64
    # auto: CUDA when present, else CPU.
    device: str = "auto"
    # Every model here is frozen: auto = bf16 on a CUDA device that supports it, else fp32; or float32 / bfloat16.
    dtype: str = "auto"
    # Also evaluate the checkpoints a PPO run kept (checkpoints/step-N/): the over-optimisation curve.
    checkpoints: bool = True
    # Under torchrun each process samples and measures its share of the prompts (seed + rank): ddp = every model
    # whole on every process; fsdp = every model sharded (as train.strategy, `fsdp` as train.fsdp).
    strategy: str = "ddp"
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    data: DataConfig = field(default_factory=DataConfig)


SCHEMAS["eval"] = EvalConfig


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


SCHEMAS["report"] = ReportConfig


def register_configs() -> None:
    """Register each stage's schema as `<stage>_schema`; conf/<stage>.yaml lists it first in its defaults."""
    cs = ConfigStore.instance()
    for stage, schema in SCHEMAS.items():
        cs.store(name=f"{stage}_schema", node=schema)


def _slug(text: str, num: Any = 0) -> str:
    """Directory name for one multirun job: its swept overrides made filesystem-safe (`job<N>` when there are none;
    long names keep a readable head and a hash, so two jobs never share a directory)."""
    safe = re.sub(r"[^A-Za-z0-9._+-]+", "_", str(text)).strip("_")
    if len(safe) > 100:
        safe = f"{safe[:80]}-{hashlib.sha1(str(text).encode()).hexdigest()[:10]}"
    return safe or f"job{num}"


if not OmegaConf.has_resolver("rlhf_slug"):
    OmegaConf.register_new_resolver("rlhf_slug", _slug)
if not OmegaConf.has_resolver("rlhf_stage_dir"):  # Hydra's run directory: refuses unsafe experiment names
    OmegaConf.register_new_resolver("rlhf_stage_dir", lambda root, exp, stage: str(stage_dir(root, exp, stage)))

CHOICES = {
    "optim.schedule": ("cosine", "linear", "constant"),
    "data.format": ("auto", "prompt_completion", "messages", "hh", "preference"),
    "model.pooling": ("auto", "last", "first", "mean"),
    "ppo.kl_estimator": ("k1", "k3"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.strategy": ("ddp", "fsdp"),
    "ppo.rollout_backend": ("auto", "eager", "compiled"),
    "model.dtype": ("auto", "float32", "bfloat16"),
    "dtype": ("auto", "float32", "bfloat16"),
    "artifact_check": ("auto", "full", "sizes"),
}

# Keys that say how to run, not what is trained: a difference in them neither makes a finished artifact stale
# (`rlhf pipeline`) nor stops an interrupted run from resuming. Micro-batch sizes only split the same step.
RUN_KEYS = ("run_dir", "root", "experiment", "resume", "overwrite", "force_resume", "logger", "artifact_check",
            "objective", "train.device", "train.log_every", "train.eval_every", "train.checkpoint_every",
            "train.keep_checkpoints", "train.sample_every", "train.micro_batch_size",
            "train.rollout_micro_batch_size", "train.compile", "ppo.rollout_backend", "train.strategy",
            "train.fsdp.cpu_offload", "train.fsdp.reshard_after_forward", "strategy", "fsdp.cpu_offload",
            "fsdp.reshard_after_forward")


# logger=[...] names -> (the module each needs, the extra that installs it)
LOGGERS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


def logger_word(word: str) -> str:
    """`logger=tensorboard` (one name, as before the logger list) -> `logger=[tensorboard]`; `logger=none` ->
    `logger=[]`; any other word unchanged."""
    found = re.fullmatch(r"logger=([A-Za-z_]+)", word)
    if found is None:
        return word
    return "logger=[]" if found.group(1) == "none" else f"logger=[{found.group(1)}]"


def check_loggers(names: list[str]) -> None:
    """Every name is a known tracker whose package is installed, or a ConfigError naming the extra to install."""
    import importlib.util

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


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old value, new value)} for the keys that differ, RUN_KEYS aside."""
    a, b = flatten(old), flatten(new)
    changed = {}
    for key in sorted(set(a) | set(b)):
        if key in RUN_KEYS or key.split(".")[0] in RUN_KEYS:
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            changed[key] = (a.get(key, "<absent>"), b.get(key, "<absent>"))
    return changed


def describe_diff(changed: dict[str, tuple[Any, Any]], limit: int = 6) -> str:
    """optim.lr 0.001 -> 0.0001, train.max_steps 300 -> 600 (and 2 more)"""
    parts = [f"{k} {old} -> {new}" for k, (old, new) in list(changed.items())[:limit]]
    more = len(changed) - limit
    return ", ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _check_finite(obj: Any, prefix: str = "") -> None:
    """Every float knob is a real number: `optim.lr=nan` or `inf` would only surface deep inside torch."""
    for f in fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if is_dataclass(value):
            _check_finite(value, f"{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value} is not a finite number", hint=f"set {key} to a real number")


def _check(cfg: Any) -> None:
    """Cross-field rules that a type alone cannot express."""
    _check_finite(cfg)
    check_experiment(cfg.experiment)
    check_loggers(getattr(cfg, "logger", []))
    for key, allowed in CHOICES.items():
        try:
            value = _get(cfg, key)
        except AttributeError:
            continue
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}", hint=f"set {key}=<one of those>")
    positive = ["train.max_steps", "train.examples_per_step", "train.micro_batch_size", "train.log_every",
                "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints", "data.max_seq_len",
                "optim.lr"]
    for key in positive:
        try:
            value = _get(cfg, key)
        except AttributeError:
            continue
        if value <= 0:
            raise ConfigError(f"{key}={value} must be > 0")
    train = getattr(cfg, "train", None)
    if train is not None and hasattr(train, "examples_per_step") and train.examples_per_step % train.micro_batch_size:
        raise ConfigError(
            f"train.examples_per_step={train.examples_per_step} is not a multiple of "
            f"train.micro_batch_size={train.micro_batch_size}",
            hint="examples_per_step = micro_batch_size x grad_accum_steps x world_size",
        )
    ppo = getattr(cfg, "ppo", None)
    if ppo is not None:
        _check_ppo(ppo, cfg.train)
    data = getattr(cfg, "data", None)
    if data is not None and data.path is None and data.format != "auto":
        raise ConfigError(f"data.path is required with data.format={data.format} (the built-in task has no file)",
                          hint="data.path=/path/to/file.jsonl on the command line")
    if data is not None and not 0.0 <= data.toy.label_noise < 0.5:
        raise ConfigError(f"data.toy.label_noise={data.toy.label_noise} must be in [0, 0.5)")
    if data is not None and not 0.0 <= data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={data.eval_fraction} must be in [0, 1)")
    if train is not None and getattr(train, "max_skipped_steps", 0) < 0:
        raise ConfigError(f"train.max_skipped_steps={train.max_skipped_steps} must be >= 0")
    lora = getattr(getattr(cfg, "model", None), "lora", None)
    if lora is not None:
        _check_lora(lora, cfg.stage)


def _check_lora(lora: LoraConfig, stage: str) -> None:
    if lora.r < 0:
        raise ConfigError(f"model.lora.r={lora.r} must be >= 0", hint="0 turns LoRA off; 8-64 are common ranks")
    if lora.r == 0:
        return
    if lora.alpha <= 0:
        raise ConfigError(f"model.lora.alpha={lora.alpha} must be > 0", hint="a common choice is 2 x model.lora.r")
    if not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"model.lora.dropout={lora.dropout} must be in [0, 1)")
    if stage == "ppo" and lora.dropout:
        raise ConfigError(f"model.lora.dropout={lora.dropout}: PPO's policy and value model must be deterministic "
                          f"(the ratio of new to old log-probs is 1 before the first update only without dropout)",
                          hint="set model.lora.dropout=0 for ppo")
    if not lora.target_modules or any(not str(m).strip() for m in lora.target_modules):
        raise ConfigError(f"model.lora.target_modules={lora.target_modules} names no module",
                          hint="model.lora.target_modules=[all-linear] or e.g. [q_proj,v_proj]")


def _check_ppo(ppo: PPOAlgoConfig, train: PPOTrainConfig) -> None:
    """Impossible PPO batch arithmetic and out-of-range knobs, caught at compose time."""
    for key in ("prompts_per_rollout", "num_ppo_epochs", "num_mini_batches", "response_length", "temperature",
                "cliprange", "cliprange_value", "kl_horizon", "kl_target"):
        if getattr(ppo, key) <= 0:
            raise ConfigError(f"ppo.{key}={getattr(ppo, key)} must be > 0")
    for key in ("kl_coef", "vf_coef", "entropy_coef", "missing_eos_penalty"):
        if getattr(ppo, key) < 0:
            raise ConfigError(f"ppo.{key}={getattr(ppo, key)} must be >= 0")
    if not (0 <= ppo.gamma <= 1 and 0 <= ppo.lam <= 1):
        raise ConfigError(f"ppo.gamma={ppo.gamma} and ppo.lam={ppo.lam} must lie in [0, 1]")
    if ppo.prompts_per_rollout % ppo.num_mini_batches:
        raise ConfigError(
            f"ppo.prompts_per_rollout={ppo.prompts_per_rollout} does not split into "
            f"ppo.num_mini_batches={ppo.num_mini_batches} equal minibatches",
            hint="make prompts_per_rollout a multiple of num_mini_batches")
    minibatch = ppo.prompts_per_rollout // ppo.num_mini_batches
    if minibatch % train.micro_batch_size:
        raise ConfigError(
            f"a minibatch of {minibatch} sequences (prompts_per_rollout / num_mini_batches) is not a multiple of "
            f"train.micro_batch_size={train.micro_batch_size}",
            hint="minibatch = micro_batch_size x grad_accum_steps x world_size")
    for key in ("max_steps", "micro_batch_size", "rollout_micro_batch_size", "log_every", "sample_every",
                "checkpoint_every", "keep_checkpoints"):
        if getattr(train, key) <= 0:
            raise ConfigError(f"train.{key}={getattr(train, key)} must be > 0")


def absolute_path(path: Optional[str]) -> Optional[str]:
    """Absolute form of a local path; hub ids and `builtin:` names are left alone."""
    if path is None or path.startswith("builtin:"):
        return path
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or path.startswith((".", "~")) or os.sep in path and p.parent.exists():
        return str(p.resolve())
    return path  # most likely a hub id such as "Qwen/Qwen2.5-0.5B"


def compose_stage(stage: str, overrides: list[str]) -> DictConfig:
    """The config `rlhf <stage> <overrides>` composes, with run_dir=. (no Hydra run sets it), before `finalize`:
    inside a running Hydra app (`rlhf report`) through that app's Hydra, else from conf/, leaving Hydra as it was.
    `logger=name` is read as `logger=[name]` (logger_word)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    words = [*map(logger_word, overrides), "run_dir=."]
    if GlobalHydra.instance().is_initialized():
        return compose(config_name=stage, overrides=words)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name=stage, overrides=words)


def finalize(cfg: DictConfig) -> Any:
    """Composed DictConfig -> typed dataclass: required values present, rules checked, paths absolute."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"missing required value{'s' if len(missing) > 1 else ''}: {', '.join(missing)}",
            hint=" ".join(f"{k}=..." for k in missing) + " on the command line",
        )
    _check_known_keys(cfg)
    obj = OmegaConf.to_object(cfg)
    obj.root = str(Path(obj.root).expanduser().resolve())
    obj.run_dir = str(Path(obj.run_dir).expanduser().resolve())
    if hasattr(obj, "model"):
        for key in ("name_or_path", "policy", "reward", "value"):
            if hasattr(obj.model, key):
                setattr(obj.model, key, absolute_path(getattr(obj.model, key)))
    if hasattr(obj, "data"):
        obj.data.path = absolute_path(obj.data.path)
        obj.data.eval_path = absolute_path(obj.data.eval_path)
    _check(obj)
    return obj


# Friendly composition errors. Hydra reports a misspelled key as "Key 'lrr' not in 'OptimConfig'" and advises
# `+optim.lrr=...`, which a structured config would silently drop; these name the key, the stage and the closest
# valid keys (or a group's options) instead.


def _hints(schema: type) -> dict[str, Any]:
    """A dataclass's field types, resolved (this module postpones annotations)."""
    return typing.get_type_hints(schema)


def _leaf_keys(schema: type, prefix: str = "") -> list[str]:
    hints = _hints(schema)
    out: list[str] = []
    for f in fields(schema):
        kind = hints[f.name]
        out += _leaf_keys(kind, f"{prefix}{f.name}.") if is_dataclass(kind) else [f"{prefix}{f.name}"]
    return out


def schema_keys(stage: str) -> list[str]:
    """Every leaf key of a stage's schema, dotted, in declaration order (seed, ..., optim.lr, data.toy.seed)."""
    return _leaf_keys(SCHEMAS[stage])


def _field_type(schema: type, dotted: str) -> Any:
    """The declared type of a dotted key (a dataclass for a group of keys); None when the schema has no such key."""
    kind: Any = schema
    for part in dotted.split("."):
        if not is_dataclass(kind) or part not in {f.name for f in fields(kind)}:
            return None
        kind = _hints(kind)[part]
    return kind


def close_keys(stage: str, key: str, n: int = 3) -> list[str]:
    """The stage's valid keys nearest a misspelled one, best first: difflib over their last parts (over the whole
    dotted names too when the part before the last dot is itself wrong), so optim.lrr -> optim.lr,
    train.max_step -> train.max_steps, lr -> optim.lr, optm.lr -> optim.lr."""
    keys = schema_keys(stage)
    parent, _, tail = key.rpartition(".")
    parent_ok = not parent or is_dataclass(_field_type(SCHEMAS[stage], parent))
    by_tail: dict[str, list[str]] = {}
    for k in keys:
        by_tail.setdefault(k.rpartition(".")[2], []).append(k)
    found = [] if parent_ok else difflib.get_close_matches(key, keys, n=n)
    for near in difflib.get_close_matches(tail, list(by_tail), n=n):
        found += by_tail[near]

    def score(k: str) -> float:
        whole = 0.0 if parent_ok else difflib.SequenceMatcher(None, key, k).ratio()
        return max(whole, difflib.SequenceMatcher(None, tail, k.rpartition(".")[2]).ratio())

    ranked = sorted(dict.fromkeys(found), key=score, reverse=True)
    ranked = [k for k in ranked if score(k) >= score(ranked[0]) - 0.1] if ranked else []
    siblings = [k for k in ranked if parent and k.rpartition(".")[0] == parent]  # data.toy.sed: data.toy.seed only
    return (siblings or ranked)[:n]


def _either(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _as_value(value: Any) -> str:
    """A default as one would type it on the command line."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _type_name(kind: Any) -> str:
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) is typing.Union and len(args) == 1:
        return f"{_type_name(args[0])} or null"
    if typing.get_origin(kind) is list:
        return f"a list of {_type_name(args[0]) if args else 'values'}"
    return {int: "an integer", float: "a float", bool: "true or false", str: "a string"}.get(kind, str(kind))


def _help(stage: str) -> str:
    return f"`rlhf {stage} --help` lists every key and its default"


def _example(stage: str, key: str, spell: Callable[[str], str]) -> str:
    """`key=<its default>` as the user would type it, e.g. optim.lr=0.001."""
    try:
        return f"{spell(key)}={_as_value(_get(SCHEMAS[stage](), key))}"
    except Exception:  # noqa: BLE001 - an example is a nicety
        return f"{spell(key)}=..."


def unknown_key_error(stage: str, key: str, spell: Optional[Callable[[str], str]] = None) -> ConfigError:
    """`key` is not in the stage's schema: say so, with the closest valid keys as the user would type them."""
    near = [(spell or str)(k) for k in close_keys(stage, key)]
    parent = key.rpartition(".")[0]
    group = _field_type(SCHEMAS[stage], parent) if parent else None
    if near:
        guess = f"; did you mean {_either(near)}?"
    elif is_dataclass(group):
        guess = f"; the keys of {parent} are {', '.join(f.name for f in fields(group))}"
    else:
        guess = " (no valid key has a similar name)"
    return ConfigError(f"unknown key {key} in the {stage} config{guess}", hint=_help(stage))


def stage_groups(stage: str) -> dict[str, list[str]]:
    """{group: its options} for the config groups conf/<stage>.yaml composes (model, data, optim)."""
    defaults = OmegaConf.load(conf_dir() / f"{stage}.yaml").get("defaults") or []
    groups = [str(next(iter(d))) for d in defaults if isinstance(d, DictConfig)]
    return {g: sorted(p.stem for p in (conf_dir() / g).glob("*.yaml")) for g in groups if "/" not in g and " " not in g}


def _plain(exc: BaseException) -> str:
    """Hydra's own text on one line, less its `+key=` advice and its config search path."""
    parts = [str(exc).strip()]
    if exc.__cause__ is not None and str(exc.__cause__).strip() not in parts[0]:
        parts.append(str(exc.__cause__).strip())
    lines = []
    for line in "\n".join(parts).splitlines():
        line = line.strip()
        if line.startswith("Config search path"):
            break
        if not re.match(r"(To append to your|Either remove \+|Or add a second \+)", line):
            lines.append(line)
    return " ".join(" ".join(lines).split())


def compose_error(exc: BaseException, stage: Optional[str] = None,
                  spell: Optional[Callable[[str], str]] = None) -> ConfigError:
    """Hydra's or OmegaConf's complaint about a stage's overrides as one ConfigError: an unknown key with the
    closest valid keys, a wrong group option with the group's options, a wrong type with the type expected.
    `spell` writes a stage key the way the user types it (`rlhf pipeline` prefixes the stage)."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigTypeError, ValidationError

    spell = spell or str
    chain: list[BaseException] = []
    seen: Optional[BaseException] = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__
    inner, text = chain[-1], str(exc).strip()
    if stage not in SCHEMAS:
        return ConfigError(_plain(exc), hint=_help(stage or "<stage>"))
    schema, groups = SCHEMAS[stage], stage_groups(stage)

    missing = next((e for e in chain if isinstance(e, MissingConfigException)), None)
    if missing is not None and "/" in (missing.missing_cfg_file or ""):
        group, option = missing.missing_cfg_file.rsplit("/", 1)
        options = list(missing.options or groups.get(group, []))
        return ConfigError(f"{group}={option} is not an option of group {group} in the {stage} config (no "
                           f"{group}/{option}.yaml); available: {', '.join(options)}",
                           hint=f"e.g. {spell(group)}={options[0] if options else '...'}; {_help(stage)}")
    if isinstance(exc, ValueError) and text.startswith("Config group override must be"):
        got = re.search(r"Got (\w+)", text)
        listed = "; ".join(f"{g}: {', '.join(opts)}" for g, opts in groups.items())
        return ConfigError(f"a config group needs the name of an option (got a value of type "
                           f"{got.group(1) if got else 'other than string'}); the {stage} config's groups and their "
                           f"options: {listed}", hint=_help(stage))

    tried = re.search(r"Could not override '([^']+)'", text)
    if tried and "No match in the defaults list" in text:
        key, kind = tried.group(1), _field_type(schema, tried.group(1))
        message = f"{key} is not a config group of the {stage} config (its groups: {', '.join(groups) or 'none'})"
        if is_dataclass(kind):
            keys = _leaf_keys(kind, f"{key}.")
            message += f"; here {key} is a set of keys: {', '.join(keys)}"
            return ConfigError(message, hint=f"set one of those, e.g. {spell(keys[0])}=...; {_help(stage)}")
        return ConfigError(message, hint=_help(stage))
    merging = re.match(r"Error merging override (\S[^\n]*)", text)
    word = merging.group(1) if merging else ""
    key = (tried.group(1) if tried else word.partition("=")[0]).lstrip("+~")
    if key and not key.startswith(("hydra.", "hydra/")):
        kind = _field_type(schema, key)
        if kind is None:
            return unknown_key_error(stage, key, spell)
        if word.startswith("~") and isinstance(inner, ConfigTypeError):
            return ConfigError(f"{word}: the keys of the {stage} config cannot be removed",
                               hint=f"set it instead, e.g. {_example(stage, key, spell)}")
        if is_dataclass(kind):
            keys = _leaf_keys(kind, f"{key}.")
            return ConfigError(f"{word}: {key} in the {stage} config is a set of keys ({', '.join(keys[:6])}"
                               f"{', ...' if len(keys) > 6 else ''}), not one value",
                               hint=f"set one of them, e.g. {_example(stage, keys[0], spell)}; {_help(stage)}")
        if isinstance(inner, ValidationError):
            return ConfigError(f"{word}: {key} in the {stage} config takes {_type_name(kind)}",
                               hint=f"e.g. {_example(stage, key, spell)}; {_help(stage)}")
    present = re.search(r"An item is already at '([^']+)'", text)
    if present:
        return ConfigError(f"{present.group(1)} is already a key of the {stage} config: set it without a `+`",
                           hint=f"e.g. {_example(stage, present.group(1), spell)}")
    return ConfigError(_plain(exc), hint=_help(stage))


def _unknown_keys(node: Any, schema: type, prefix: str = "") -> list[str]:
    hints = _hints(schema)
    out: list[str] = []
    for key, value in node.items():
        if key not in hints:  # the first leaf under it: `++optm.lr=1` adds optm.lr
            while isinstance(value, dict) and value:
                key, value = f"{key}.{next(iter(value))}", next(iter(value.values()))
            out.append(f"{prefix}{key}")
        elif is_dataclass(hints[key]) and isinstance(value, dict):
            out += _unknown_keys(value, hints[key], f"{prefix}{key}.")
    return out


def _check_known_keys(cfg: DictConfig) -> None:
    """Refuse keys the schema lacks: `+key=value` forces them into a structured config, whose dataclass would then
    drop them without a word."""
    schema = OmegaConf.get_type(cfg)
    if not is_dataclass(schema):
        return
    unknown = _unknown_keys(OmegaConf.to_container(cfg, resolve=False), schema)
    stage = next((name for name, known in SCHEMAS.items() if known is schema), None)
    if unknown and stage is not None:
        raise unknown_key_error(stage, unknown[0])
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]}")
