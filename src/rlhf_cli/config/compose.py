"""Hydra plumbing: each stage's schema registered in the ConfigStore, the resolvers conf/ uses, one composition of
a stage's config outside a Hydra run, and `finalize`, which turns a composed DictConfig into the dataclass the stage
runs on (required values present, no unknown keys, the schema's rules checked, paths absolute). Also how two
resolved configs differ (RUN_KEYS aside), for resumes and the pipeline."""

from __future__ import annotations

import hashlib
import re
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from rlhf_cli.artifacts import stage_dir
from rlhf_cli.config.hydra_errors import check_known_keys
from rlhf_cli.config.paths import conf_dir, make_absolute
from rlhf_cli.config.schemas import SCHEMAS
from rlhf_cli.errors import ConfigError


def register_configs() -> None:
    """Register each stage's schema as `<stage>_schema`; conf/<stage>.yaml lists it first in its defaults."""
    cs = ConfigStore.instance()
    for stage, schema in SCHEMAS.items():
        cs.store(name=f"{stage}_schema", node=schema)


def slug(text: str, num: Any = 0) -> str:
    """Directory name for one multirun job: its swept overrides made filesystem-safe (`job<N>` when there are none;
    long names keep a readable head and a hash, so two jobs never share a directory)."""
    safe = re.sub(r"[^A-Za-z0-9._+-]+", "_", str(text)).strip("_")
    if len(safe) > 100:
        safe = f"{safe[:80]}-{hashlib.sha1(str(text).encode()).hexdigest()[:10]}"
    return safe or f"job{num}"


if not OmegaConf.has_resolver("rlhf_slug"):
    OmegaConf.register_new_resolver("rlhf_slug", slug)
if not OmegaConf.has_resolver("rlhf_stage_dir"):  # Hydra's run directory: refuses unsafe experiment names
    OmegaConf.register_new_resolver("rlhf_stage_dir", lambda root, exp, stage: str(stage_dir(root, exp, stage)))


def logger_word(word: str) -> str:
    """`logger=tensorboard` (one name, as before the logger list) -> `logger=[tensorboard]`; `logger=none` ->
    `logger=[]`; any other word unchanged."""
    found = re.fullmatch(r"logger=([A-Za-z_]+)", word)
    if found is None:
        return word
    return "logger=[]" if found.group(1) == "none" else f"logger=[{found.group(1)}]"


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
    """Composed DictConfig -> typed dataclass: required values present, no unknown keys, the schema's rules checked
    (its `validate`, once), paths absolute."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"missing required value{'s' if len(missing) > 1 else ''}: {', '.join(missing)}",
            hint=" ".join(f"{k}=..." for k in missing) + " on the command line",
        )
    check_known_keys(cfg)
    obj = OmegaConf.to_object(cfg)
    make_absolute(obj)
    obj.validate()
    return obj


# Keys that say how to run, not what is trained: a difference in them neither makes a finished artifact stale
# (`rlhf pipeline`) nor stops an interrupted run from resuming. Micro-batch sizes only split the same step, and
# packing lays out the same micro-batch without padding (a run records what `auto` settled to).
RUN_KEYS = ("run_dir", "root", "experiment", "resume", "overwrite", "force_resume", "logger", "artifact_check",
            "objective", "train.device", "train.log_every", "train.eval_every", "train.checkpoint_every",
            "train.keep_checkpoints", "train.sample_every", "train.micro_batch_size",
            "train.rollout_micro_batch_size", "train.compile", "ppo.rollout_backend", "train.strategy",
            "train.fsdp.cpu_offload", "train.fsdp.reshard_after_forward", "strategy", "fsdp.cpu_offload",
            "fsdp.reshard_after_forward", "data.packing")


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
