"""The project's exceptions for user mistakes.

Raise one of these when the *user* got something wrong (a config value, a data row, a missing upstream artifact).
`rlhf_cli.cli` turns them into one red line plus a hint and exit code 2. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class RlhfError(Exception):
    """A user mistake: `message` says what and where, `hint` says how to fix it."""

    kind = "error"

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
