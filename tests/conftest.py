"""Shared test set-up: offline hubs, one cache for the built-in tiny model, the pytest fixtures (among them the
experiment trained once per run, `trained_experiment`) and the `slow` marker of every test that needs it. Constants
and plain helpers (FAST_SFT, run_cli, compose_stage, ...) live in helpers.py: `from helpers import ...`."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("RLHF_CLI_CACHE", str(Path(tempfile.gettempdir()) / "rlhf_cli_test_cache"))
os.environ.pop("HYDRA_FULL_ERROR", None)
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # the workers share the cores: each its share of torch's threads,
    # set before torch's import and inherited by every process a test starts
    os.environ["OMP_NUM_THREADS"] = str(max(1, CORES // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

from helpers import EXPERIMENT, HH_FILE, compose_stage  # noqa: E402  (after the environment is set)

SHARED = "trained_experiment"
MAX_WORKERS = 8
# The files that take longest (their tests start several processes or train for tens of seconds), first: a
# pytest-xdist worker takes whole files in collection order (`--dist loadfile --no-loadscope-reorder`), and the
# workers end together when the longest files do not start last. Seconds measured in one 2-worker run, in order:
# 231, 69, 51, 45, 34, 32, 29, 26, 24, 23, 20, 19.
LONGEST_FIRST = ("test_distributed.py", "test_resume_ddp.py", "test_critic_free.py", "test_reward_functions_stage.py",
                 "test_reward_ensembles.py",
                 "test_bench_ppo.py", "test_pipeline.py", "test_cli_safety.py", "test_shipped_config.py",
                 "test_trackers.py", "test_dpo_stage.py", "test_wheel.py", "test_bench_dpo.py")


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject's addopts): one worker per core this process may use, at most MAX_WORKERS. Measured on
    2 cores: the whole suite 819 s in one process, 405-482 s with 2 workers, 430-444 s with 3 or 4; the inner loop
    61-67 s, 46-53 s with 2 workers, 59-60 s with 3."""
    return max(1, min(MAX_WORKERS, CORES))


def pytest_collection_modifyitems(items):
    """A test that needs the shared experiment costs its training when it runs alone: it is `slow`. The files in
    LONGEST_FIRST come first (an order, not a filter: a run of some files keeps them)."""
    for item in items:
        if SHARED in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    missing = [name for name in LONGEST_FIRST if not (Path(__file__).parent / name).is_file()]
    assert not missing, f"conftest.LONGEST_FIRST names files that are not in tests/: {missing}"
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the files' own order otherwise


def shared_once(tmp_path_factory, name: str, build) -> Path:
    """A session fixture's directory built once per pytest run: with pytest-xdist each worker is a session of its
    own, so the first worker to ask builds it (`build(directory)`) under a lock in the directory the workers share,
    and the others wait for it and read it."""
    from filelock import FileLock

    if "PYTEST_XDIST_WORKER" not in os.environ:
        root = tmp_path_factory.mktemp(name)
        build(root)
        return root
    root = tmp_path_factory.getbasetemp().parent / name
    with FileLock(f"{root}.lock"):
        if not (root.parent / f"{name}.built").is_file():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            build(root)
            (root.parent / f"{name}.built").touch()
    return root


def _listing(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="session")
def trained_experiment(tmp_path_factory):
    """The root of experiment `demo` with finished sft, reward and ppo artifacts (helpers.EXPERIMENT's settings),
    trained in-process once per pytest run for every test that needs upstream artifacts. Read it, never write into
    it: a stage under test gets a run_dir under its tmp_path (upstream artifacts are found through root= and
    experiment=), and a test that changes artifacts works on `experiment_copy`. The session checks at its end that
    nothing in it changed."""
    from rlhf_cli.stages import ppo, reward, sft

    def train(root: Path) -> None:
        for stage, module in (("sft", sft), ("reward", reward), ("ppo", ppo)):
            module.run(compose_stage(stage, [*EXPERIMENT[stage], "experiment=demo", f"root={root}"],
                                     root / "demo" / stage))

    root = shared_once(tmp_path_factory, "trained", train)
    before = _listing(root)
    yield root
    assert _listing(root) == before, f"a test wrote into the shared {root}: use experiment_copy or its own run_dir"


@pytest.fixture
def experiment_copy(trained_experiment, tmp_path) -> Path:
    """A test's own copy of `trained_experiment` (the same layout, root/demo/<stage>), free to change."""
    root = tmp_path / "trained"
    shutil.copytree(trained_experiment, root, symlinks=True)
    return root


@pytest.fixture
def hh_file() -> Path:
    if not HH_FILE.is_file():
        pytest.skip(f"{HH_FILE} is absent (CI always has ../shared/data beside the checkout)")
    return HH_FILE


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised BERT encoder with a WordPiece tokenizer, saved like a hub model: the stand-in
    for an encoder reward model (all-MiniLM-style) in tests."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from rlhf_cli.data import toy

    out = tmp_path_factory.mktemp("tiny-bert")
    words = sorted({w for text in toy.corpus() for w in text.split()} | {"human", "assistant", "hello", "no"})
    (out / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(out / "vocab.txt"))  # transformers 5 ignores vocab_file=
    assert tokenizer.unk_token_id not in tokenizer("give fig").input_ids
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.1,
                        attention_probs_dropout_prob=0.1)
    BertModel(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
