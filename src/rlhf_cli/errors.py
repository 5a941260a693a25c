"""The project's exceptions for problems a user can fix, and the exit code of each.

Raise one of these when the *user* got something wrong or must act (a config value, a data row, a missing or
damaged artifact, a full disk, a run that diverged). `rlhf_cli.cli` turns them into one red line plus a hint and
the class's exit code. Anything else is a bug and keeps its traceback.

Exit codes: 0 success; 1 a bug (with its traceback); 2 a config, data, artifact or storage problem; 3 training
diverged (a NaN or inf loss, gradient norm, score or KL).
"""

from __future__ import annotations


class RlhfError(Exception):
    """A problem the user can fix: `message` says what and where, `hint` says how to fix it."""

    kind = "error"
    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(RlhfError):
    kind = "config error"


class DataError(RlhfError):
    kind = "data error"


class ArtifactError(RlhfError):
    kind = "artifact error"


class StorageError(RlhfError):
    """A file could not be written or read back: disk full, read-only directory, permissions."""

    kind = "storage error"


class RewardFunctionError(RlhfError):
    """A reward function (`reward.functions`) raised, or returned something that is not one number or None per
    completion: the user's code to fix, so exit code 2 like bad data."""

    kind = "reward function error"


class DivergedError(RlhfError):
    """Training produced a non-finite number; the stage stopped before it could reach the weights or a file."""

    kind = "training diverged"
    exit_code = 3


def in_chain(exc: BaseException | None) -> RlhfError | None:
    """The project's own exception in exc's chain of causes (a resolver's ConfigError arrives wrapped by
    OmegaConf and Hydra), or None."""
    while exc is not None:
        if isinstance(exc, RlhfError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None
