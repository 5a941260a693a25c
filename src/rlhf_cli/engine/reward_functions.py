"""Rewards written as code: loading the functions `reward.functions` names, calling them, checking what they return.

A spec is `package.module:function` (imported as Python imports it) or `path/to/file.py:function` (that file,
loaded as a module of its own; relative to the working directory). Only what the user names is imported, and it
runs with the user's rights, as any Python the user runs would.

Call convention (TRL's): `fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]`, once per
micro-batch of responses. `columns` holds every other field of the prompt rows, one list per field aligned with
the rows (e.g. `answer`). A number per completion; None means "not applicable to this row".

A function that raises, returns the wrong number of values, or a value that is not a finite number stops the stage
with a RewardFunctionError (exit code 2) naming the function, the row (its prompt, cut short) and the error. A spec
that does not load is refused the same way at start-up, before any model loads (`load_all`); `check_specs` checks
the form and that a named file exists, at compose time.
"""

from __future__ import annotations

import importlib
import importlib.util
import numbers
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rlhf_cli.errors import ConfigError, RewardFunctionError
from rlhf_cli.rl.reward import ENSEMBLE, standardize_members

KEY = "reward.functions"
REWARD_MODEL = "reward_model"  # the learned reward model's component name
EXAMPLE = "'reward.functions=[rlhf_cli.rewards:exact_match]' or 'reward.functions=[my_rewards.py:brevity]'"


@dataclass(frozen=True)
class RewardFunction:
    name: str                        # the component's name in metrics (reward/<name>): the function's own
    spec: str                        # as the user wrote it
    fn: Callable


def split_spec(spec: str) -> tuple[str, str]:
    """(module or file, function name) of a spec, or a ConfigError naming the form."""
    target, sep, name = str(spec).rpartition(":")
    if not sep or not target.strip() or not name.isidentifier():
        raise ConfigError(f"{KEY}: {spec!r} is not <module>:<function> or <file.py>:<function>", hint=f"e.g. {EXAMPLE}")
    return target.strip(), name


def is_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def check_specs(specs: list[str]) -> None:
    """The cheap checks, at compose time: the form of each spec, a named file that exists, no name twice."""
    names = []
    for spec in specs:
        target, name = split_spec(spec)
        if is_file(target) and not Path(target).expanduser().is_file():
            raise ConfigError(f"{KEY}: {spec!r} names the file {target}, which does not exist "
                              f"(relative paths start at {Path.cwd()})", hint="give the path of a .py file that exists")
        names.append(name)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{KEY}: two functions are named {twice[0]} (each component's metrics carry its name)",
                          hint="rename one of them")
    if REWARD_MODEL in names:
        raise ConfigError(f"{KEY}: a function named {REWARD_MODEL} would share the learned reward model's metrics",
                          hint="rename it")


def load(spec: str) -> RewardFunction:
    """Import the module or file of `spec` and return its function, or a ConfigError saying why not."""
    target, name = split_spec(spec)
    try:
        module = _load_file(target) if is_file(target) else importlib.import_module(target)
    except ConfigError:
        raise
    except ModuleNotFoundError as exc:
        if is_file(target) or not target.startswith(str(exc.name)):  # the module itself imports something missing
            raise ConfigError(f"{KEY}: importing {target!r} for {spec!r} failed: ModuleNotFoundError: {exc}",
                              hint="install what it imports, or fix the import") from exc
        raise ConfigError(f"{KEY}: cannot import {target!r} for {spec!r} ({exc})",
                          hint="a module must be importable (installed, or on PYTHONPATH); a file is named by its "
                               "path ending in .py") from exc
    except Exception as exc:  # noqa: BLE001 -- the user's module failed while it was imported: say so, once
        raise ConfigError(f"{KEY}: importing {target!r} for {spec!r} failed: {type(exc).__name__}: {exc}",
                          hint="fix the module; it is imported as `python -c 'import ...'` would") from exc
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise ConfigError(f"{KEY}: {target} has no function {name!r}" + (" (it is not callable)" if fn else ""),
                          hint=f"its functions: {', '.join(found) or 'none'}")
    return RewardFunction(name, spec, fn)


def _load_file(target: str):
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"{KEY}: the file {target} does not exist", hint="give the path of a .py file")
    module_name = f"rlhf_reward_{path.stem}_{abs(hash(str(path))) % 10**8}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{KEY}: {target} cannot be loaded as a Python module", hint="name a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look a module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def load_all(specs: list[str]) -> list[RewardFunction]:
    check_specs(specs)
    return [load(spec) for spec in specs]


def _cut(text: str, width: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 3] + "..."


def call(rf: RewardFunction, prompts: list[str], completions: list[str], columns: list[dict],
         where: str | Callable[[], str] = "") -> list[float | None]:
    """One call of `rf` on these rows, its values checked: floats or None, one per completion. `where` ends every
    error message (the iteration, the last checkpoint); a callable is asked only when there is an error."""
    kwargs = {key: [row.get(key) for row in columns] for key in dict.fromkeys(k for row in columns for k in row)}

    def fail(what: str, row: int | None) -> RewardFunctionError:
        at = f" on row {row} (prompt {_cut(prompts[row])!r})" if row is not None else ""
        said = where() if callable(where) else where
        return RewardFunctionError(f"reward function {rf.name} ({rf.spec}) {what}{at}{said}",
                                   hint="fix the function: it must return one number (or None) per completion")

    try:
        values = rf.fn(prompts, completions, **kwargs)
    except Exception as exc:  # noqa: BLE001 -- the user's code: name it, the row and the error
        row = _failing_row(rf, prompts, completions, kwargs)
        raise fail(f"raised {type(exc).__name__}: {_cut(exc, 200)}", row) from exc
    try:
        values = list(values.tolist() if hasattr(values, "tolist") else values)
    except TypeError:
        raise fail(f"returned {type(values).__name__}, not a list", None) from None
    if len(values) != len(completions):
        raise fail(f"returned {len(values)} values for {len(completions)} completions", None)
    out: list[float | None] = []
    for i, value in enumerate(values):
        if value is None:
            out.append(None)
            continue
        if hasattr(value, "item") and not isinstance(value, numbers.Real):
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise fail(f"returned {value!r} ({type(value).__name__}), not a number or None", i)
        if value != value or value in (float("inf"), float("-inf")):
            raise fail(f"returned {value}, not a finite number", i)
        out.append(float(value))
    return out


def _failing_row(rf: RewardFunction, prompts, completions, kwargs) -> int | None:
    """The first row on which `rf` raises when called on that row alone (None: it raises on none alone)."""
    for i in range(len(completions)):
        try:
            rf.fn(prompts[i:i + 1], completions[i:i + 1], **{k: v[i:i + 1] for k, v in kwargs.items()})
        except Exception:  # noqa: BLE001
            return i
    return None


def score(functions: list[RewardFunction], prompts: list[str], completions: list[str], columns: list[dict],
          micro: int, where: str | Callable[[], str] = "") -> dict[str, torch.Tensor]:
    """name -> [B] float64 values of each function (NaN where it returned None), calling each once per
    micro-batch of `micro` rows."""
    out = {}
    for rf in functions:
        values: list[float | None] = []
        for start in range(0, len(completions), micro):
            rows = slice(start, start + micro)
            values += call(rf, prompts[rows], completions[rows], columns[rows], where)
        out[rf.name] = torch.tensor([float("nan") if v is None else v for v in values], dtype=torch.float64)
    return out


def value_or_none(value: torch.Tensor) -> float | None:
    """One component's value as samples files keep it: None where the function returned None (NaN here)."""
    v = float(value)
    return None if v != v else v


def weights_for(names: list[str], weights: list[float], key: str = "reward.weights") -> dict[str, float]:
    """name -> weight, `weights` given in `names`' order (empty: 1.0 each), or a ConfigError naming the
    components."""
    if not weights:
        return dict.fromkeys(names, 1.0)
    if len(weights) != len(names):
        raise ConfigError(f"{key}={list(weights)} gives {len(weights)} weights for {len(names)} components "
                          f"({', '.join(names)})",
                          hint=f"one weight per component, in that order (the learned reward model first when one "
                               f"is used), e.g. {key}=[{','.join('1.0' for _ in names)}]")
    return dict(zip(names, map(float, weights)))


def member_stats(scorer) -> list[dict]:
    """The held-out score statistics of each reward model a Scorer scores with: one, or a LoraEnsemble's members."""
    return getattr(scorer.model, "member_stats", None) or [scorer.model.score_stats]


@dataclass(frozen=True)
class Rewards:
    """Everything that scores a response: the learned reward model (engine.rollout.Scorer; several: an ensemble,
    none: reward functions alone) and the reward functions, each component with its weight. An ensemble counts as
    one component, `reward_model`: its members' scores, each standardised with its own held-out statistics, then
    combined by rl.reward.ENSEMBLE[ensemble] (mean, min, uwo)."""
    scorers: list                    # engine.rollout.Scorer of each frozen reward model ([] for none)
    functions: list[RewardFunction]
    weights: dict[str, float]        # component name -> weight (the reward model's is REWARD_MODEL)
    aggregation: str = "sum"         # rl.reward.COMBINE's key (reward.aggregation)
    ensemble: str = "mean"           # rl.reward.ENSEMBLE's key (ppo.reward_aggregation), for 2+ reward models
    uwo_coef: float = 0.5            # λ of ensemble=uwo

    @property
    def scorer(self):
        """The reward model's Scorer (an ensemble's first member), or None."""
        return self.scorers[0] if self.scorers else None

    @property
    def members(self) -> int:
        """How many reward models score (an ensemble's members, a LoraEnsemble's each counted)."""
        return sum(len(member_stats(s)) for s in self.scorers)

    @property
    def is_ensemble(self) -> bool:
        return self.members > 1

    @property
    def names(self) -> list[str]:
        return [*([REWARD_MODEL] if self.scorers else []), *(rf.name for rf in self.functions)]

    def describe(self) -> str:
        """One line of what scores a response, as the stages print it."""
        parts = [f"{self.weights[n]:g} x {n}" for n in self.names]
        if self.is_ensemble:
            how = f"{self.ensemble}, λ {self.uwo_coef:g}" if self.ensemble == "uwo" else self.ensemble
            parts[0] += f" ({how} of {self.members} standardised members)"
        return " + ".join(parts) + ("" if self.aggregation == "sum" else f" ({self.aggregation})")

    def model_scores(self, samples, prompt_text: list[str], response_text: list[str], micro: int) -> torch.Tensor:
        """[K, B] float32: each reward model's raw score of each response (K = 1 for one reward model; a
        LoraEnsemble's [B, K] scores are its members' rows)."""
        from rlhf_cli.engine.rollout import score_responses

        b = len(response_text)
        return torch.cat([score_responses(s, samples, prompt_text, response_text, micro).reshape(b, -1).T
                          for s in self.scorers])

    def standardised(self, scores: torch.Tensor) -> torch.Tensor:
        """[K, B] raw member scores -> each on its own held-out scale (rl.reward.standardize_members)."""
        stats = torch.tensor([[st["mean"], st["std"]] for s in self.scorers for st in member_stats(s)],
                             dtype=scores.dtype, device=scores.device)
        return standardize_members(scores, stats[:, 0], stats[:, 1])

    def reward_model_score(self, scores: torch.Tensor) -> torch.Tensor:
        """The `reward_model` component from [K, B] raw scores: the one model's raw score, or the ensemble's
        members standardised and combined."""
        if not self.is_ensemble:
            return scores[0]
        return ENSEMBLE[self.ensemble](self.standardised(scores), self.uwo_coef)

    def components(self, samples, prompt_text: list[str], response_text: list[str], columns: list[dict],
                   micro: int, where: str | Callable[[], str] = "",
                   model_scores: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """name -> [B] raw values on the samples' device (float32; NaN where a function returned None): the reward
        model's score first (`model_scores` when already computed), then each function's."""
        out = {}
        if self.scorers:
            if model_scores is None:
                model_scores = self.model_scores(samples, prompt_text, response_text, micro)
            out[REWARD_MODEL] = self.reward_model_score(model_scores)
        device = samples.input_ids.device
        for name, values in score(self.functions, prompt_text, response_text, columns, micro, where).items():
            out[name] = values.to(device=device, dtype=torch.float32)
        return out


def make_rewards(scorers: list, specs: list[str], weights: list[float], aggregation: str = "sum",
                 functions: list[RewardFunction] | None = None, ensemble: str = "mean",
                 uwo_coef: float = 0.5) -> Rewards:
    """Rewards from the loaded reward models (an ensemble when several; [] for none) and the functions of `specs`
    (loaded here unless given), the weights checked against the components."""
    functions = load_all(specs) if functions is None else functions
    names = [*([REWARD_MODEL] if scorers else []), *(rf.name for rf in functions)]
    return Rewards(list(scorers), functions, weights_for(names, weights), aggregation, ensemble, uwo_coef)


def ensemble_spread(standardised: torch.Tensor) -> dict[str, torch.Tensor]:
    """What an ensemble's [K, B] standardised member scores say of each response: the members' mean and their
    disagreement (population standard deviation across members), [B] each."""
    return {"ensemble_mean": standardised.mean(0), "ensemble_std": standardised.std(0, unbiased=False)}


def ensemble_metrics(standardised: torch.Tensor) -> dict[str, float]:
    """ensemble_spread summed over the rows (divide by the rows for the means), as a rollout's metrics add up."""
    return {k: float(v.sum()) for k, v in ensemble_spread(standardised).items()}


def component_stats(components: dict[str, torch.Tensor]) -> dict[str, float]:
    """Sums to reduce over processes, per component: n (rows it applies to), sum, sum of squares, none (rows it
    returned None for); `component_metrics` turns them into metrics."""
    out = {}
    for name, values in components.items():
        present = ~torch.isnan(values)
        v = values[present].double()
        out |= {f"{name}:n": float(present.sum()), f"{name}:sum": float(v.sum()),
                f"{name}:sumsq": float((v * v).sum()), f"{name}:none": float((~present).sum())}
    return out


def component_metrics(sums: dict[str, float], rows: float) -> dict[str, float]:
    """reward/<name> (mean over the rows it applies to), reward_std/<name> (population std over them) and
    reward_none/<name> (the share of rows it returned None for; only when it did) from `component_stats`' sums
    over every process."""
    out = {}
    for name in dict.fromkeys(k.rsplit(":", 1)[0] for k in sums):
        n = sums[f"{name}:n"]
        if n:  # a function that returned None on every row has no mean
            mean = sums[f"{name}:sum"] / n
            var = max(sums[f"{name}:sumsq"] / n - mean * mean, 0.0)
            out |= {f"reward/{name}": mean, f"reward_std/{name}": var ** 0.5}
        if sums[f"{name}:none"]:
            out[f"reward_none/{name}"] = sums[f"{name}:none"] / rows
    return out


def wants_reward_model(configured: str | None, specs: list[str], root: str, experiment: str) -> bool:
    """Whether a stage scores with a learned reward model (ppo's model.reward, eval's reward.model): `none`: no;
    a path: yes; null: yes without reward functions, else only when the experiment has a finished reward
    artifact."""
    from rlhf_cli import artifacts
    from rlhf_cli.config.schemas import NO_REWARD_MODEL

    if configured == NO_REWARD_MODEL:
        return False
    if configured is not None or not specs:
        return True
    run_dir = artifacts.stage_dir(root, experiment, "reward")
    artifacts.settle_if_possible(run_dir)
    return artifacts.is_finished(run_dir)


def find_reward_models(configured, root: str, experiment: str, check: str, key: str,
                       together: bool = True) -> tuple[list[str], list]:
    """(the reward models' directories, the parent artifacts the manifest records) that `configured` names (ppo's
    model.reward, eval's reward.model), checked before anything loads: null = this experiment's reward artifact;
    a path = that one; a list = each of them, an ensemble. An ensemble artifact (`reward.ensemble=K`) stands for
    its members, in order, or, when they are LoRA adapters on a base that is still there and `together` (not
    under fsdp), for itself: models.reward.LoraEnsemble scores them in one pass over the base."""
    from rlhf_cli import artifacts
    from rlhf_cli.models.loading import check_source
    from rlhf_cli.models.reward import ensemble_members, shared_base

    items = [configured] if configured is None or isinstance(configured, str) else list(configured)
    paths, parents = [], []
    for item in items:
        path, parent = artifacts.upstream(item, root, experiment, "reward", "reward_model", check, key=key)
        check_source(path, key)
        paths += [path] if together and shared_base(path) else ensemble_members(path) or [path]
        parents += [parent] if parent else []
    return paths, parents


def check_ensemble_stats(scorers: list, paths: list[str]) -> None:
    """An ensemble standardises each member with its own held-out statistics: every member must record them (a
    reward artifact of `rlhf reward` does; an off-the-shelf classifier does not)."""
    from rlhf_cli.errors import ArtifactError

    if sum(len(member_stats(s)) for s in scorers) < 2:
        return
    for scorer, path in zip(scorers, paths):
        if not all(stats.get("std") for stats in member_stats(scorer)):
            raise ArtifactError(
                f"the ensemble member {path} records no held-out score statistics, which an ensemble standardises "
                f"each member's score with", hint='train it with `rlhf reward`, or add "score_stats": {"mean": m, '
                                                   '"std": s} (its scores on held-out data) to its reward_config.json')
