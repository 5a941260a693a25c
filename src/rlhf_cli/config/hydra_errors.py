"""The friendly wording of Hydra's and OmegaConf's complaints about a stage's overrides.

Hydra reports a misspelled key as "Key 'lrr' not in 'OptimConfig'" and advises `+optim.lrr=...`, which a structured
config would silently drop; these name the key, the stage and the closest valid keys (or a group's options, or the
type expected) instead, as one ConfigError.
"""

from __future__ import annotations

import difflib
import re
import typing
from dataclasses import fields, is_dataclass
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf

from rlhf_cli.artifacts import check_experiment
from rlhf_cli.config.paths import conf_dir
from rlhf_cli.config.schemas import SCHEMAS
from rlhf_cli.errors import ConfigError


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _hints(schema: type) -> dict[str, Any]:
    """A dataclass's field types, resolved (schemas.py postpones annotations); its class tables left out."""
    names = {f.name for f in fields(schema)}
    return {k: v for k, v in typing.get_type_hints(schema).items() if k in names}


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


def unreadable_override(word: str) -> ConfigError:
    """An override Hydra's lexer cannot read (a non-ASCII letter, a space or a special character in a bare value):
    an experiment name gets the rule it breaks; any other value, how to quote it."""
    key, _, value = word.partition("=")
    if key.lstrip("+~") == "experiment":
        try:
            check_experiment(value)
        except ConfigError as refused:
            return refused
    return ConfigError(f"cannot read the override {word}: a value with spaces, non-ASCII letters or characters "
                       f"such as ()[]{{}}:,= must be quoted", hint=f"quote the value, with the shell's quotes around "
                                                                    f"the whole word: \"{key}='{value}'\"")


def compose_error(exc: BaseException, stage: Optional[str] = None,
                  spell: Optional[Callable[[str], str]] = None) -> ConfigError:
    """Hydra's or OmegaConf's complaint about a stage's overrides as one ConfigError: an unknown key with the
    closest valid keys, a wrong group option with the group's options, a wrong type with the type expected.
    `spell` writes a stage key the way the user types it (`rlhf pipeline` prefixes the stage)."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigTypeError, ValidationError

    spell = spell or str
    chain: list[BaseException] = []
    seen: Optional[BaseException] = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__
    inner, text = chain[-1], str(exc).strip()
    parse = next((e for e in chain if isinstance(e, OverrideParseException)), None)
    if parse is not None:
        return unreadable_override(parse.override)
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


def check_known_keys(cfg: DictConfig) -> None:
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
