"""Constants and plain helpers shared by the test files (`from helpers import ...`); pytest fixtures and the
environment set-up (offline hubs, the test cache) live in conftest.py, which pytest loads first."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HH_FILE = SHARED_DATA / "hh-rlhf-harmless-base-test.jsonl.gz"

# A few seconds of SFT on the built-in task: enough to see the loss fall, short enough for many runs.
FAST_SFT = [
    "data.toy.num_train=256", "data.toy.num_eval=32", "train.max_steps=24", "train.examples_per_step=16",
    "train.micro_batch_size=8", "train.eval_every=12", "train.checkpoint_every=12", "train.log_every=4",
    "train.num_samples=2", "train.sample_max_new_tokens=8",
]

# The same for the reward stage (pairs instead of demonstrations).
FAST_REWARD = [
    "data.toy.num_train=256", "data.toy.num_eval=64", "train.max_steps=24", "train.examples_per_step=16",
    "train.micro_batch_size=8", "train.eval_every=12", "train.checkpoint_every=12", "train.log_every=4",
]

# A few seconds of PPO: 16 prompts per rollout, 2 minibatches of 8, short responses.
FAST_PPO = [
    "ppo.prompts_per_rollout=16", "ppo.num_mini_batches=2", "train.micro_batch_size=8",
    "train.rollout_micro_batch_size=16", "ppo.response_length=8", "ppo.num_ppo_epochs=2", "train.max_steps=4",
    "train.checkpoint_every=2", "train.sample_every=2",
]

# The shared experiment `demo` that conftest's `trained_experiment` trains once per pytest run, stage by stage:
# an SFT policy that has learnt the task's vocabulary (held-out loss at steps 75 and 150), a reward model, and PPO
# from both (checkpoints kept at iterations 2 and 4).
EXPERIMENT = {
    "sft": [*FAST_SFT, "train.max_steps=150", "train.eval_every=75"],
    "reward": [*FAST_REWARD, "train.max_steps=40"],
    "ppo": FAST_PPO,
}


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`rlhf <args>` in `cwd` in a process of its own, captured: forked from engine.launch's preloaded server as
    `rlhf pipeline` starts its stages (a fresh `python -m rlhf_cli` with RLHF_CLI_FRESH_PROCESSES=1, or where
    `env` changes what the libraries read at import)."""
    from rlhf_cli.engine import launch

    full_env = {**os.environ, **(env or {}), "COLUMNS": "200"}
    with tempfile.TemporaryDirectory(prefix="rlhf-cli-out-") as out:
        stdout, stderr = Path(out) / "stdout", Path(out) / "stderr"
        code = launch.run_cli(args, cwd=cwd, env=full_env, stdout=stdout, stderr=stderr, timeout=timeout)
        return subprocess.CompletedProcess(["rlhf", *args], code, stdout.read_text(), stderr.read_text())


_REGISTERED: dict = {}  # the schemas compose_config registered last


def compose_config(stage: str, overrides: list[str]):
    """The DictConfig `rlhf <stage> <overrides>` composes from conf/, before `finalize`. Hydra stays initialised on
    conf/ and the schemas registered between calls: doing either again costs a third of a composition, and the tests
    compose hundreds of times (whoever initialises Hydra otherwise clears it first, as Hydra requires)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rlhf_cli.config import SCHEMAS, register_configs

    if _REGISTERED != SCHEMAS:  # storing every schema again costs another third
        register_configs()
        _REGISTERED.clear()
        _REGISTERED.update(SCHEMAS)
    hydra = GlobalHydra.instance()
    if not (hydra.is_initialized() and getattr(hydra.config_loader(), "_tests_conf", None) == REPO / "conf"):
        hydra.clear()
        initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3")
        hydra.config_loader()._tests_conf = REPO / "conf"
    return compose(config_name=stage, overrides=overrides)


def compose_stage(stage: str, overrides: list[str], run_dir: Path | None = None):
    """The typed config a stage would get from `rlhf <stage> <overrides>` (run_dir given, since no Hydra run)."""
    from rlhf_cli.config import finalize

    extra = [f"run_dir={run_dir}"] if run_dir is not None else []
    return finalize(compose_config(stage, [*overrides, *extra]))
