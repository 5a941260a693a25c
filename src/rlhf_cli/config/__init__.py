"""Typed configuration: every knob is a dataclass field, and its default lives there.

- `schemas`: the dataclasses of every stage (SCHEMAS) and the rules of each, beside its fields;
- `compose`: Hydra plumbing (register_configs, the resolvers, compose_stage, finalize) and config differences;
- `paths`: where conf/ is, and the keys whose paths are made absolute at compose time;
- `hydra_errors`: Hydra's and OmegaConf's complaints reworded as one ConfigError naming the key and the stage.

Hydra composes `conf/<stage>.yaml` (which only picks groups such as `model=tiny`, `data=toy`, `optim=adamw` and
sets presets) on top of the stage's schema, so a misspelled key or a wrong type fails at compose time with the
key's name. `finalize` then turns the DictConfig into the dataclass instance the stage runs on, checks its rules and
makes every path absolute once. The names below are re-exported for `from rlhf_cli.config import X`.
"""

from rlhf_cli.config.compose import (RUN_KEYS, compose_stage, config_diff, describe_diff, finalize, flatten,
                                     logger_word, register_configs)
from rlhf_cli.config.hydra_errors import close_keys, compose_error, schema_keys, stage_groups, unknown_key_error
from rlhf_cli.config.paths import absolute_path, conf_dir
from rlhf_cli.config.schemas import (BUILTIN_TINY, LOGGERS, NO_REWARD_MODEL, SCHEMAS, ArithDataConfig, ComputeConfig,
                                     DPOConfig, DataConfig, EvalConfig, EvalRewardConfig, FSDPConfig, LoopConfig, LoraConfig,
                                     ModelConfig, OptimConfig, PPOAlgoConfig, PPOConfig, PPOModelConfig, PPOTrainConfig,
                                     ReportConfig, RewardConfig, RewardFunctionsConfig, RewardLossConfig,
                                     RewardModelConfig, RewardTrainConfig, SFTConfig, SFTTrainConfig, StageConfig,
                                     TinyModelConfig, ToyDataConfig, TrainConfig, check_loggers)

__all__ = [
    "ArithDataConfig", "BUILTIN_TINY", "ComputeConfig", "DPOConfig", "DataConfig", "EvalConfig", "EvalRewardConfig",
    "FSDPConfig", "LOGGERS", "LoopConfig", "LoraConfig", "ModelConfig", "NO_REWARD_MODEL", "OptimConfig",
    "PPOAlgoConfig", "PPOConfig", "PPOModelConfig", "PPOTrainConfig", "RUN_KEYS", "ReportConfig", "RewardConfig",
    "RewardFunctionsConfig", "RewardLossConfig", "RewardModelConfig", "RewardTrainConfig", "SCHEMAS", "SFTConfig",
    "SFTTrainConfig", "StageConfig", "TinyModelConfig", "ToyDataConfig", "TrainConfig", "absolute_path",
    "check_loggers", "close_keys", "compose_error", "compose_stage", "conf_dir", "config_diff", "describe_diff",
    "finalize", "flatten", "logger_word", "register_configs", "schema_keys", "stage_groups", "unknown_key_error",
]
