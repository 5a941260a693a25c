"""What each stage reads: the built-in task or a data file, decided here and nowhere else.

`data` is a stage's data config (`config.DataConfig`). With `data.path` unset the stage runs on the built-in list
task (`rlhf_cli.data.toy`, sized and seeded by `data.toy`), which also brings a hidden gold score. Otherwise rows
come from `data.path`, a local file or hub dataset (`loading.load_rows`), and there is no gold score. Held-out data is
`data.eval_path` when given, else a seeded `data.eval_fraction` of `data.path` (at most `data.max_eval_rows` rows,
`splits.holdout`); the built-in task draws it from its own eval split.

The `source` returned beside rows names where they came from, for logs and errors: the `loading.Source` of
`data.path`, or a phrase for the built-in task.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rlhf_cli.data import toy
from rlhf_cli.data.loading import Source, load_rows
from rlhf_cli.data.preference import normalize_preference_rows
from rlhf_cli.data.prompts import prompt_texts
from rlhf_cli.data.sft import normalize_sft_rows
from rlhf_cli.data.splits import holdout

if TYPE_CHECKING:
    from rlhf_cli.config.schemas import DataConfig


def is_builtin(data: DataConfig) -> bool:
    """True when the stage runs on the built-in task (no `data.path`), False for a file or hub dataset."""
    return data.path is None


def sft_rows(data: DataConfig, seed: int) -> tuple[list[dict], list[dict], Source | str]:
    """(train rows, held-out rows, source) of demonstrations.

    Built-in task: `data.toy.num_train` rows of its train split and `data.toy.num_eval` of its eval split, source
    "built-in task". A file: its rows normalised by `sft.normalize_sft_rows` (`data.format`), held out from
    `data.eval_path` or by `data.eval_fraction` with `seed`; source is the `data.path` Source.
    """
    if is_builtin(data):
        return (toy.sft_rows(data.toy.num_train, data.toy.seed, "train"),
                toy.sft_rows(data.toy.num_eval, data.toy.seed, "eval"), "built-in task")
    rows, source = load_rows(data.path, data.split, data.max_rows)
    rows = normalize_sft_rows(rows, source, data.format)
    if data.eval_path:
        eval_rows, eval_source = load_rows(data.eval_path, data.split)
        return rows, normalize_sft_rows(eval_rows, eval_source, data.format), source
    train, held = holdout(rows, data.eval_fraction, data.max_eval_rows, seed)
    return train, held, source


def preference_pairs(data: DataConfig, seed: int) -> tuple[list[dict], list[dict], Source | str, dict]:
    """(train pairs, held-out pairs, source, stats) of preference pairs.

    Built-in task: the toy's gold-labelled pairs, flipped with probability `data.toy.label_noise`
    (`data.toy.num_train` of its train split, `data.toy.num_eval` of its eval split); source "built-in task",
    stats `{"rows": all pairs, "label_noise": noise}`. A file: its rows normalised by
    `preference.normalize_preference_rows` (`data.format`, `data.skip_invalid`), held out from `data.eval_path` or by
    `data.eval_fraction` with `seed`; stats are that function's, or `{"train": ..., "eval": ...}` with an eval_path.
    """
    if is_builtin(data):
        noise = data.toy.label_noise
        train = toy.preference_rows(data.toy.num_train, data.toy.seed, "train", noise)
        held = toy.preference_rows(data.toy.num_eval, data.toy.seed, "eval", noise)
        return train, held, "built-in task", {"rows": len(train) + len(held), "label_noise": noise}
    rows, source = load_rows(data.path, data.split, data.max_rows)
    rows, stats = normalize_preference_rows(rows, source, data.format, data.skip_invalid)
    if data.eval_path:
        eval_rows, eval_source = load_rows(data.eval_path, data.split)
        eval_rows, eval_stats = normalize_preference_rows(eval_rows, eval_source, data.format, data.skip_invalid)
        return rows, eval_rows, source, {"train": stats, "eval": eval_stats}
    train, held = holdout(rows, data.eval_fraction, data.max_eval_rows, seed)
    return train, held, source, stats


def train_prompts(data: DataConfig, tokenizer: Any) -> tuple[list[str], Source | str]:
    """(prompt texts, source) for PPO rollouts.

    Built-in task: `data.toy.num_train` prompts of its train split in a seeded order, source "built-in task". A file:
    the prompt of every row of `data.path` (`prompts.prompt_texts`, chats rendered with `tokenizer`).
    """
    if is_builtin(data):
        return [r["prompt"] for r in toy.prompt_rows(data.toy.num_train, data.toy.seed, "train")], "built-in task"
    rows, source = load_rows(data.path, data.split, data.max_rows)
    return prompt_texts(rows, source, tokenizer), source


def eval_prompts(data: DataConfig, num_prompts: int, tokenizer: Any) -> tuple[list[str], Source | str]:
    """(held-out prompt texts, source) for evaluation: at most `num_prompts` of them.

    Built-in task: `num_prompts` prompts of its eval split in a seeded order (cycled once all were used), source
    "the built-in task's held-out split". A file: the first `num_prompts` prompts of `data.eval_path`, else of
    `data.path` (`prompts.prompt_texts`, chats rendered with `tokenizer`).
    """
    if is_builtin(data):
        rows = toy.prompt_rows(num_prompts, data.toy.seed, "eval")
        return [r["prompt"] for r in rows], "the built-in task's held-out split"
    rows, source = load_rows(data.eval_path or data.path, data.split, data.max_rows)
    return prompt_texts(rows, source, tokenizer)[:num_prompts], source


def gold_scorer(data: DataConfig) -> Callable[[str, str], float] | None:
    """`toy.gold_score(prompt, response)` for the built-in task; None for a file (it has no gold score)."""
    return toy.gold_score if is_builtin(data) else None


def gold_preferences(data: DataConfig, pairs: list[dict]) -> list[bool] | None:
    """For the built-in task, whether each `{"prompt", "chosen", "rejected"}` pair's chosen response has the higher
    gold score (its noise-free label); None for a file."""
    if not is_builtin(data):
        return None
    return [toy.gold_score(p["prompt"], p["chosen"]) > toy.gold_score(p["prompt"], p["rejected"]) for p in pairs]


def label_noise_ceiling(data: DataConfig) -> dict[str, float]:
    """Metrics to merge into the reward stage's: `{"label_noise_ceiling": the best pairwise accuracy any reward model
    can reach against labels flipped with probability data.toy.label_noise}` for the built-in task, `{}` for a file."""
    if not is_builtin(data):
        return {}
    return {"label_noise_ceiling": toy.label_noise_ceiling(data.toy.label_noise)}
