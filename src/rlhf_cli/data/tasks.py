"""What each stage reads: the built-in task or a data file, decided here and nowhere else.

`data` is a stage's data config (`config.DataConfig`). With `data.path` unset the stage runs on the built-in task
that `data.task` names (TASKS): the list task (`rlhf_cli.data.toy`, sized and seeded by `data.toy`) or the
arithmetic task (`rlhf_cli.data.arith`, `data.arith`); each brings a hidden gold score. Otherwise rows
come from `data.path`, a local file or hub dataset (`loading.load_rows`), and there is no gold score. Held-out data is
`data.eval_path` when given, else a seeded `data.eval_fraction` of `data.path` (at most `data.max_eval_rows` rows,
`splits.holdout`); the built-in task draws it from its own eval split.

The `source` returned beside rows names where they came from, for logs and errors: the `loading.Source` of
`data.path`, or a phrase for the built-in task.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rlhf_cli.data import arith, toy
from rlhf_cli.data.loading import Source, load_rows
from rlhf_cli.data.preference import normalize_preference_rows
from rlhf_cli.data.prompts import prompt_texts
from rlhf_cli.data.sft import normalize_sft_rows
from rlhf_cli.data.splits import holdout

if TYPE_CHECKING:
    from rlhf_cli.config.schemas import DataConfig


# data.task -> the module of a built-in task; each has sft_rows, preference_rows, prompt_rows, gold_score and
# label_noise_ceiling, and is sized by data.<task> (seed, num_train, num_eval, label_noise)
TASKS = {"toy": toy, "arith": arith}
# what a task's sft_rows takes beyond (num, seed, split), from its settings
SFT_OPTIONS = {"toy": lambda s: {}, "arith": lambda s: {"demo_accuracy": s.demo_accuracy}}
LABELS = {"toy": "built-in task", "arith": "built-in arith task"}


def _task(data: DataConfig):
    """(the built-in task's module, its settings data.<task>, its label)."""
    return TASKS[data.task], getattr(data, data.task), LABELS[data.task]


def is_builtin(data: DataConfig) -> bool:
    """True when the stage runs on the built-in task (no `data.path`), False for a file or hub dataset."""
    return data.path is None


def sft_rows(data: DataConfig, seed: int) -> tuple[list[dict], list[dict], Source | str]:
    """(train rows, held-out rows, source) of demonstrations.

    Built-in task: `data.<task>.num_train` rows of its train split and `num_eval` of its eval split, source its label
    ("built-in task"). A file: its rows normalised by `sft.normalize_sft_rows` (`data.format`), held out from
    `data.eval_path` or by `data.eval_fraction` with `seed`; source is the `data.path` Source.
    """
    if is_builtin(data):
        task, t, label = _task(data)
        options = SFT_OPTIONS[data.task](t)
        return (task.sft_rows(t.num_train, t.seed, "train", **options),
                task.sft_rows(t.num_eval, t.seed, "eval", **options), label)
    rows, source = load_rows(data.path, data.split, data.max_rows)
    rows = normalize_sft_rows(rows, source, data.format)
    if data.eval_path:
        eval_rows, eval_source = load_rows(data.eval_path, data.split)
        return rows, normalize_sft_rows(eval_rows, eval_source, data.format), source
    train, held = holdout(rows, data.eval_fraction, data.max_eval_rows, seed)
    return train, held, source


def preference_pairs(data: DataConfig, seed: int) -> tuple[list[dict], list[dict], Source | str, dict]:
    """(train pairs, held-out pairs, source, stats) of preference pairs.

    Built-in task: its gold-labelled pairs, flipped with probability `data.<task>.label_noise`
    (`num_train` of its train split, `num_eval` of its eval split); source its label,
    stats `{"rows": all pairs, "label_noise": noise}`. A file: its rows normalised by
    `preference.normalize_preference_rows` (`data.format`, `data.skip_invalid`), held out from `data.eval_path` or by
    `data.eval_fraction` with `seed`; stats are that function's, or `{"train": ..., "eval": ...}` with an eval_path.
    """
    if is_builtin(data):
        task, t, label = _task(data)
        train = task.preference_rows(t.num_train, t.seed, "train", t.label_noise)
        held = task.preference_rows(t.num_eval, t.seed, "eval", t.label_noise)
        return train, held, label, {"rows": len(train) + len(held), "label_noise": t.label_noise}
    rows, source = load_rows(data.path, data.split, data.max_rows)
    rows, stats = normalize_preference_rows(rows, source, data.format, data.skip_invalid)
    if data.eval_path:
        eval_rows, eval_source = load_rows(data.eval_path, data.split)
        eval_rows, eval_stats = normalize_preference_rows(eval_rows, eval_source, data.format, data.skip_invalid)
        return rows, eval_rows, source, {"train": stats, "eval": eval_stats}
    train, held = holdout(rows, data.eval_fraction, data.max_eval_rows, seed)
    return train, held, source, stats


def prompt_columns(rows: list[dict]) -> list[dict]:
    """Each row's fields other than its prompt (`prompt`, `messages`): what reward functions get as `columns`."""
    return [{k: v for k, v in row.items() if k not in ("prompt", "messages")} for row in rows]


def train_prompts(data: DataConfig, tokenizer: Any) -> tuple[list[str], list[dict], Source | str]:
    """(prompt texts, their rows' other fields, source) for PPO rollouts.

    Built-in task: `num_train` prompts of its train split in a seeded order (the arith task's rows carry an
    `answer`), source its label. A file: the prompt of every row of `data.path` (`prompts.prompt_texts`, chats
    rendered with `tokenizer`), and the row's other fields.
    """
    if is_builtin(data):
        task, t, label = _task(data)
        rows = task.prompt_rows(t.num_train, t.seed, "train")
        return [r["prompt"] for r in rows], prompt_columns(rows), label
    rows, source = load_rows(data.path, data.split, data.max_rows)
    return prompt_texts(rows, source, tokenizer), prompt_columns(rows), source


def eval_prompts(data: DataConfig, num_prompts: int, tokenizer: Any) -> tuple[list[str], list[dict], Source | str]:
    """(held-out prompt texts, their rows' other fields, source) for evaluation: at most `num_prompts` of them.

    Built-in task: `num_prompts` prompts of its eval split in a seeded order (cycled once all were used), source
    "the <task>'s held-out split". A file: the first `num_prompts` prompts of `data.eval_path`, else of
    `data.path` (`prompts.prompt_texts`, chats rendered with `tokenizer`).
    """
    if is_builtin(data):
        task, t, label = _task(data)
        rows = task.prompt_rows(num_prompts, t.seed, "eval")
        return [r["prompt"] for r in rows], prompt_columns(rows), f"the {label}'s held-out split"
    rows, source = load_rows(data.eval_path or data.path, data.split, data.max_rows)
    return prompt_texts(rows, source, tokenizer)[:num_prompts], prompt_columns(rows)[:num_prompts], source


def gold_scorer(data: DataConfig) -> Callable[[str, str], float] | None:
    """The built-in task's `gold_score(prompt, response)`; None for a file (it has no gold score)."""
    return _task(data)[0].gold_score if is_builtin(data) else None


def gold_preferences(data: DataConfig, pairs: list[dict]) -> list[bool] | None:
    """For the built-in task, whether each `{"prompt", "chosen", "rejected"}` pair's chosen response has the higher
    gold score (its noise-free label); None for a file."""
    if not is_builtin(data):
        return None
    gold = gold_scorer(data)
    return [gold(p["prompt"], p["chosen"]) > gold(p["prompt"], p["rejected"]) for p in pairs]


def label_noise_ceiling(data: DataConfig) -> dict[str, float]:
    """Metrics to merge into the reward stage's: `{"label_noise_ceiling": the best pairwise accuracy any reward model
    can reach against labels flipped with probability data.<task>.label_noise}` for the built-in task, `{}` for a file."""
    if not is_builtin(data):
        return {}
    task, t, _ = _task(data)
    return {"label_noise_ceiling": task.label_noise_ceiling(t.label_noise)}
