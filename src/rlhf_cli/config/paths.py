"""Paths: where the shipped YAML lives, and the config keys that hold local paths, made absolute once at compose
time (Hydra does not change the working directory, and neither does anything after `finalize`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional



def conf_dir() -> Path:
    """conf/ shipped inside the wheel (rlhf_cli/conf), else the checkout's top-level conf/ (editable installs,
    source trees)."""
    package = Path(__file__).resolve().parents[1]  # rlhf_cli/
    packaged = package / "conf"
    return packaged if packaged.is_dir() else package.parents[1] / "conf"


def absolute_path(path: Optional[str]) -> Optional[str]:
    """Absolute form of a local path; hub ids and `builtin:` names are left alone."""
    if path is None or path.startswith("builtin:"):
        return path
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or path.startswith((".", "~")) or os.sep in path and p.parent.exists():
        return str(p.resolve())
    return path  # most likely a hub id such as "Qwen/Qwen2.5-0.5B"


def make_absolute(obj: Any) -> None:
    """`root` and `run_dir` resolved, and every value of the stage's path keys (its spec's `path_keys`) made
    absolute, in place."""
    from rlhf_cli.stagespec import SPECS

    obj.root = str(Path(obj.root).expanduser().resolve())
    obj.run_dir = str(Path(obj.run_dir).expanduser().resolve())
    for key in SPECS[obj.stage].path_keys:
        *parents, name = key.split(".")
        node = obj
        for part in parents:
            node = getattr(node, part)
        value = getattr(node, name)
        if isinstance(value, str) or value is None:
            setattr(node, name, absolute_path(value))
        else:  # a list of paths (model.reward=[a,b]: an ensemble)
            setattr(node, name, [absolute_path(v) for v in value])
